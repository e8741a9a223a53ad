"""Real-video trajectories in the CPU loaders (pyav, decord): the cache of ``python -m fastmam.data.trajectories``
read for each clip's tubelet starts and mapped through the same crop, resize and flip as its pixels; foreign caches
refused at startup; videos without trajectories replaced like bad files. (DALI: ``test_dali.py``.)

The videos are smooth random textures translated by a known velocity (``test_trajectories.texture_clip``), square
64 x 64 so that a centre crop at ``img_size=64`` is the whole frame with no resize, encoded as ordinary H.264."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmam.config import ConfigError, build_config
from fastmam.data import build_dataset, build_loader
from fastmam.data.sampling import sample_frame_indices
from fastmam.data.trajectories import TrajectoryCache, TrajectoryCacheError, TrajectoryParams, extract
from fastmam.data.video import collate_clips

from .test_trajectories import texture_clip

av = pytest.importorskip("av", reason="the CPU video loaders need PyAV: pip install av")
pytest.importorskip("cv2", reason="trajectory extraction needs OpenCV: pip install opencv-python-headless")

SIDE, L = 64, 4  # decord fails on frames under 64 px (FFmpeg error -9216 at 48 x 48)
G = SIDE // 8  # model-input grid points per side
#: key -> (velocity px/frame, frames). "c10": long enough for stride 2 only because sampling leaves room for the
#: last tubelet's L frames; "short7": clamped, its last tubelet starts at frame 6 > the cache's last start 2;
#: "tiny4": fewer than L + 1 frames, recorded bad in the cache.
VIDEOS = {"a/fast.mp4": ((1.5, -0.75), 24), "a/slow.mp4": ((-0.5, 1.0), 24), "b/c10.mp4": ((1.0, 0.5), 10),
          "b/short7.mp4": ((1.0, 0.0), 7), "b/tiny4.mp4": ((1.0, 0.0), 4)}
BAD = {"b/short7.mp4": "trajectories from frame 4 requested, the trajectory cache holds start frames 0..2",
       "b/tiny4.mp4": "no trajectories (bad when the cache was written: shorter than L+1 frames"}
BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(
    importlib.util.find_spec("decord") is None, reason="the decord backend needs decord: pip install decord"))]


def write_h264(path, gray: np.ndarray):
    """Gray frames (T, H, W) uint8 -> an ordinary yuv420p H.264 file, a keyframe every 4 frames (decoders seek)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = gray.shape[2], gray.shape[1], "yuv420p"
        s.options = {"g": "4", "preset": "ultrafast", "crf": "10"}
        for g in gray:
            frame = av.VideoFrame.from_ndarray(np.repeat(g[..., None], 3, axis=2), format="rgb24")
            for pkt in s.encode(frame.reformat(format="yuv420p")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The videos, their list and their trajectory cache (DIS fast, L = 4, native size)."""
    root = tmp_path_factory.mktemp("traj_loader")
    for i, (key, (velocity, frames)) in enumerate(VIDEOS.items()):
        write_h264(root / key, texture_clip(velocity, frames=frames, height=SIDE, width=SIDE, seed=i))
    lst = root / "train.txt"
    lst.write_text("".join(f"{key} {i % 2}\n" for i, key in enumerate(VIDEOS)))
    summary = extract(lst, root / "traj", TrajectoryParams(length=L), log=lambda m: None)
    assert (summary["videos"], summary["bad"]) == (5, 1)
    return root, lst, root / "traj"


def config(lst, cache, backend="pyav", *extra):
    return build_config({}, ["data.source=video", f"data.backend={backend}", f"data.train_list={lst}",
                             "data.num_frames=4", "data.stride=2", f"data.img_size={SIDE}", "data.crop=center",
                             "model.patch=16", "masking.ratio=0.75", "data.batch_size=2", "data.num_workers=0",
                             "data.max_bad_fraction=0.5", "targets.motion=trajectory",
                             f"targets.trajectory_length={L}", f"targets.trajectory_cache={cache}", *extra])


def good_keys(ds, epochs=3):
    """(index, epoch) keys of the videos with trajectories."""
    ok = [i for i, p in enumerate(ds.videos.paths) if not any(p.endswith(b) for b in BAD)]
    return [(i, e) for e in range(epochs) for i in ok]


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_carry_trajectories_in_the_synthetic_format(data, backend):
    root, lst, cache = data
    cfg = config(lst, cache, backend, "data.repeated_sampling=2", "data.batch_size=4", "data.flip=true")
    ds = build_dataset(cfg)
    assert isinstance(ds.trajectories, TrajectoryCache) and ds.spec.tubelet == 2 and ds.spec.trajectory_length == L
    batches = list(build_loader(cfg, ds, 0, 1, 0, 3, pin_memory=False))
    for b in batches:
        assert b["video"].shape == (4, 4, SIDE, SIDE, 3)
        assert b["trajectories"].shape == (4, 2, G, G, L, 2) and b["trajectories"].dtype == torch.float32
        assert b["trajectory_valid"].shape == (4, 2, G, G) and b["trajectory_valid"].dtype == torch.bool
        assert b["trajectory_valid"].any() and torch.isfinite(b["trajectories"]).all()
    # DataLoader workers (each opens its own memory map) deliver the same batches
    forked = list(build_loader(config(lst, cache, backend, "data.repeated_sampling=2", "data.batch_size=4",
                                      "data.flip=true", "data.num_workers=1"), ds, 0, 1, 0, 3, pin_memory=False))
    for a, b in zip(batches, forked, strict=True):
        assert torch.equal(a["trajectories"], b["trajectories"])
        assert torch.equal(a["trajectory_valid"], b["trajectory_valid"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_frame_without_resize_or_flip_is_the_cache_itself(data, backend):
    """Centre crop of a square frame at its own size: the loaded trajectories are exactly ``read``'s of the
    tubelets' first frames, ``indices[0::t]``."""
    root, lst, cache = data
    ds = build_dataset(config(lst, cache, backend))
    reader = TrajectoryCache.open(cache, lst)
    starts_seen = set()
    for key in good_keys(ds):
        item, plan = ds[key], ds.plan(*key, 0)
        assert item["bad"] == [] and item["index"] == key[0]
        starts = plan.indices[::2]
        want_disp, want_valid = reader.read(plan.path, starts)
        assert item["trajectories"].shape == (1, 2, G, G, L, 2)
        assert np.array_equal(item["trajectories"][0].numpy(), want_disp)
        assert np.array_equal(item["trajectory_valid"][0].numpy(), want_valid)
        starts_seen |= set(starts.tolist())
    assert len(starts_seen) > 4  # random starts, not one fixed clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_negates_dx_and_mirrors_the_columns(data, backend):
    root, lst, cache = data
    plain = build_dataset(config(lst, cache, backend))
    flipping = build_dataset(config(lst, cache, backend, "data.flip=true", "data.repeated_sampling=2",
                                    "data.batch_size=4"))
    flips = set()
    for key in good_keys(plain):
        ref, got = plain[key], flipping[key]
        plan = flipping.plan(*key, 0)
        boxes = flipping.crops(plan, SIDE, SIDE)  # the crops load() drew, from the same generator
        for c, box in enumerate(boxes):
            disp, valid = got["trajectories"][c], got["trajectory_valid"][c]
            if box.flip:
                want_disp = ref["trajectories"][0].flip(2) * torch.tensor([-1.0, 1.0])
                want_valid = ref["trajectory_valid"][0].flip(2)
                assert torch.equal(got["video"][c], ref["video"][0].flip(2))  # the pixels were flipped the same way
            else:
                want_disp, want_valid = ref["trajectories"][0], ref["trajectory_valid"][0]
            assert torch.equal(disp, want_disp) and torch.equal(valid, want_valid)
            flips.add(box.flip)
    assert flips == {False, True}


def test_crops_and_resizes_scale_the_known_motion(data):
    """Through random resized crops to 32 px, the mapped steps are the texture's velocity times the resize factor
    of the clip's own crop (dx negated when flipped): the mapping uses the boxes the pixels went through."""
    root, lst, cache = data
    ds = build_dataset(config(lst, cache, "pyav", "data.crop=random_resized", "data.rrc_scale=[0.3,1.0]",
                              "data.img_size=32", "data.flip=true", "data.repeated_sampling=2", "data.batch_size=4"))
    errors, factors = [], set()
    for key in good_keys(ds, epochs=2):
        item, plan = ds[key], ds.plan(*key, 0)
        velocity = next(v for k, (v, _) in VIDEOS.items() if plan.path.endswith(k))
        for c, box in enumerate(ds.crops(plan, SIDE, SIDE)):
            want = np.array([velocity[0] * 32 / box.w * (-1 if box.flip else 1), velocity[1] * 32 / box.h])
            disp, valid = item["trajectories"][c].numpy(), item["trajectory_valid"][c].numpy()
            assert valid.mean() > 0.3
            errors.append(np.abs(disp[valid] - want).mean(axis=(0, 1)) / np.abs(want).clip(min=0.5))
            factors.add(round(32 / box.w, 2))
    errors = np.array(errors)
    print(f"relative step error per clip: mean {errors.mean():.3f}, max {errors.max():.3f}")
    assert len(factors) > 3  # many different resize factors
    assert errors.mean() < 0.05 and errors.max() < 0.1  # measured: 0.015 and 0.03 (DIS fast on H.264, crf 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_videos_without_trajectories_are_replaced_and_reported(data, backend):
    root, lst, cache = data
    cfg = config(lst, cache, backend)
    ds = build_dataset(cfg)
    batches = list(build_loader(cfg, ds, 0, 1, 0, 10, pin_memory=False))
    assert all(b["trajectories"].shape == (2, 2, G, G, L, 2) for b in batches)
    bad = [(Path(path).relative_to(root).as_posix(), reason) for b in batches for path, reason in b["bad"]]
    assert {key for key, _ in bad} == set(BAD)  # both found (and counted), nothing else
    for key, reason in bad:
        assert BAD[key] in reason
    # the 10-frame video at stride 2 is never bad: its starts leave room for L frames after the last tubelet's first
    c10 = ds.videos.paths.index(str(root / "b/c10.mp4"))
    assert all(ds.plan(c10, e, 0).indices[2] + L <= 9 for e in range(16))


def test_sampling_leaves_room_for_the_last_trajectory():
    t, frames, length = 2, 4, 4
    for stride in (1, 2, 4):
        for n in range(frames * stride, 40):
            for seed in range(8):
                plain = sample_frame_indices(n, frames, stride, np.random.default_rng(seed))
                idx = sample_frame_indices(n, frames, stride, np.random.default_rng(seed), "clamp", t, length)
                if n >= (frames - t) * stride + length + 1:
                    assert idx[frames - t] + length <= n - 1, (stride, n, idx)
                else:  # no start can give the last trajectory: start 0, and the cache check makes it a bad video
                    assert idx[0] == 0
                if t * stride >= length + 1:  # VideoMAE's range already leaves room: the same draw
                    assert np.array_equal(idx, plain)


def test_foreign_caches_are_refused_at_startup(data, tmp_path):
    root, lst, cache = data
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{root / key} 0\n" for key in reversed(VIDEOS)))  # same videos, other order
    with pytest.raises(TrajectoryCacheError, match=r"built from another list .*python -m fastmam.data.trajectories "
                                                   r"--list .*other.txt"):
        build_dataset(config(other, cache))
    with pytest.raises(TrajectoryCacheError, match=r"holds trajectories of L=4 steps, L=3 wanted "
                                                   r"\(targets.trajectory_length\).*--length 3"):
        build_dataset(config(lst, cache, "pyav", "targets.trajectory_length=3"))
    unfinished = tmp_path / "unfinished"
    extract(lst, unfinished, TrajectoryParams(length=L), stop_after=2, commit_every=1, log=lambda m: None)
    with pytest.raises(TrajectoryCacheError, match="unfinished"):
        build_dataset(config(lst, unfinished))
    with pytest.raises(TrajectoryCacheError, match="holds no trajectory cache"):
        build_dataset(config(lst, tmp_path))
    moved = tmp_path / "moved"  # the list and its videos moved together: still the same list
    shutil.copytree(root / "a", moved / "a")
    shutil.copytree(root / "b", moved / "b")
    shutil.copy(lst, moved / "train.txt")
    ds = build_dataset(config(moved / "train.txt", cache))
    assert ds[(0, 0)]["trajectories"].shape == (1, 2, G, G, L, 2)


def test_config_needs_the_cache_for_video_trajectories(data):
    root, lst, cache = data
    cfg = config(lst, cache)
    assert cfg.targets.trajectory_cache == str(cache)
    with pytest.raises(ConfigError, match=r"needs targets.trajectory_cache, a folder written by `python -m "
                                          r"fastmam.data.trajectories --list .*train.txt --out DIR --length 4`"):
        config(lst, "")
    build_config({}, ["targets.motion=trajectory"])  # synthetic source: true trajectories, no cache
    hand_built = cfg.model_copy(update={"targets": cfg.targets.model_copy(update={"trajectory_cache": ""})})
    with pytest.raises(TrajectoryCacheError, match="needs targets.trajectory_cache"):
        build_dataset(hand_built)


def test_collate_flattens_repeated_trajectories():
    items = [{"video": torch.zeros(2, 4, 8, 8, 3, dtype=torch.uint8), "label": i, "index": i,
              "trajectories": torch.full((2, 2, 1, 1, L, 2), float(i)), "trajectory_valid": torch.ones(2, 2, 1, 1,
                                                                                                     dtype=torch.bool)}
             for i in range(3)]
    out = collate_clips(items)
    assert out["trajectories"].shape == (6, 2, 1, 1, L, 2) and out["trajectory_valid"].shape == (6, 2, 1, 1)
    assert out["trajectories"][:, 0, 0, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2] == out["index"].tolist()


def test_the_training_step_takes_the_batch_as_it_comes(data):
    """MME's loss on a real-video batch, called as ``pretrain.py`` calls it: finite, and the motion term moves the
    motion head (the valid trajectories reach the loss)."""
    from fastmam.models import Pretrainer

    root, lst, cache = data
    cfg = config(lst, cache, "pyav", "model.embed_dim=32", "model.num_heads=4", "model.depth=1", "model.decoder_dim=16",
                 "model.decoder_heads=2", "model.decoder_depth=1", "model.regressor_depth=0",
                 "model.shared_decoder=true", "targets.appearance=hog")
    ds = build_dataset(cfg)
    batch = next(iter(build_loader(cfg, ds, 0, 1, 0, 1, pin_memory=False)))
    torch.manual_seed(0)
    model = Pretrainer(cfg)
    noise = torch.rand(model.noise_shape(batch["video"].shape[0]))
    traj = {k: batch[k] for k in ("trajectories", "trajectory_valid") if k in batch}
    out = model(batch["video"], noise, None, None, **traj)
    assert torch.isfinite(out.total) and out.motion > 0
    out.motion.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
