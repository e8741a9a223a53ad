import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmam import checkpointing
from fastmam.config import load_config
from fastmam.metrics import read_metrics
from fastmam.optim import lr_factor, param_groups

REPO = Path(__file__).resolve().parents[2]
# a smaller tiny run for tests: seconds, not a minute
FAST = ["model.depth=2", "data.num_workers=0", "logging.progress_bar=false", "logging.tensorboard=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, timeout=600, env_extra=None, returncode=0):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env_extra or {})}
    # a fresh single process, whatever an in-process test set: its process group still holds MASTER_PORT
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == returncode, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.mark.slow
def test_tiny_run_loss_falls_and_leaves_checkpoint(tmp_path):
    """The README's command (plain python, no launcher) on the tiny preset, shortened."""
    out = tmp_path / "run"
    run_cli([sys.executable, "fastmam/pretrain.py", "--config", "tiny", f"output_dir={out}", "schedule.steps=80",
             "checkpoint.every_steps=40", *FAST])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.5 * first, f"loss did not fall: {first} -> {last}"
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert checkpointing.latest_tag(out / "checkpoints") == "step_00000080"
    assert (out / "checkpoints" / "step_00000040" / checkpointing.MARKER).exists()
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 0


def _tiny(out, *extra, preset="tiny"):
    return load_config(preset, [f"output_dir={out}", "schedule.steps=8", "schedule.warmup_steps=2",
                                "logging.every_steps=1", "checkpoint.every_steps=100", "data.batch_size=4",
                                "deepspeed.gradient_accumulation_steps=2", *FAST, *extra])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_videomae", "tiny_motionmae", "tiny_mme"])
def test_method_tiny_presets_train_with_falling_loss(tmp_path, preset):
    """Each method's tiny preset trains on the synthetic shapes (tiny_mme on their true trajectories): the mean loss
    of the last 10 of 40 steps is below 0.8x that of the first 10, and every term is finite."""
    from fastmam.pretrain import train

    cfg = load_config(preset, [f"output_dir={tmp_path}", "schedule.steps=40", "schedule.warmup_steps=5",
                               "logging.every_steps=1", "checkpoint.every_steps=100", *FAST])
    train(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 40 and all(math.isfinite(r["loss"]) for r in rows)
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, f"{preset}: loss did not fall: {first:.4f} -> {last:.4f}"
    if preset != "tiny_videomae":
        assert rows[-1]["loss_motion"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("extra,preset", [([], "tiny"), (["masking.decoder=running_cell"], "tiny"), ([], "tiny_mme")],
                         ids=["plain", "decoder_masking", "mme_trajectories"])
def test_resume_is_exact(tmp_path, extra, preset):
    """N steps straight == N/2 steps, stop, resume, N/2 steps: identical losses and weights. With decoder masking
    the decoder's subset comes from the same per-step noise, so it resumes exactly too; the synthetic trajectories
    (tiny_mme) are a function of (seed, index) like the pixels."""
    from fastmam.pretrain import train

    straight = _tiny(tmp_path / "a", *extra, preset=preset)
    train(straight)
    split = _tiny(tmp_path / "b", *extra, preset=preset)
    train(split, stop_after=4)
    assert checkpointing.latest_tag(tmp_path / "b" / "checkpoints") == "step_00000004"
    with pytest.raises(RuntimeError, match="already holds checkpoints.*--resume"):
        train(split)  # never silently start over a run that has checkpoints
    train(split, resume=True)

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=False):
        for key in ("loss", "loss_appearance", "loss_motion", "lr"):
            assert ra[key] == rb[key], f"step {ra['step']} {key}: {ra[key]} != {rb[key]}"
    assert a[-1]["loss"] < a[0]["loss"]

    def weights(run):
        tag = checkpointing.latest_tag(run / "checkpoints")
        state = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return state["module"]

    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_rank_deepspeed_zero2_run(tmp_path):
    out = tmp_path / "ddp"
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is installed with deepspeed"
    run_cli([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "fastmam/pretrain.py",
             "--config", "tiny", f"output_dir={out}", "schedule.steps=6", "schedule.warmup_steps=2",
             "logging.every_steps=3", "checkpoint.every_steps=3", "data.batch_size=4", "deepspeed.zero_stage=2",
             *FAST])
    rows = read_metrics(out)  # rank 0 only writes
    assert [r["step"] for r in rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "deepspeed_config.json").read_text())["train_batch_size"] == 8
    ckpt = out / "checkpoints" / "step_00000006"
    # ZeRO-2 partitions the optimizer state: one shard per rank
    shards = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert checkpointing.latest_tag(out / "checkpoints") == "step_00000006"


def test_latest_tag_skips_incomplete_checkpoints(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        d = ck / checkpointing.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpointing.MARKER).write_text(str(step))
    assert checkpointing.latest_tag(ck) == "step_00000020"  # no pointer: newest complete
    (ck / checkpointing.LATEST).write_text("step_00000010")
    assert checkpointing.latest_tag(ck) == "step_00000010"  # the pointer wins when complete
    (ck / checkpointing.LATEST).write_text("step_00000030")
    assert checkpointing.latest_tag(ck) == "step_00000020"  # a crash mid-save: fall back
    assert checkpointing.latest_tag(tmp_path / "none") is None


def test_lr_schedule_and_param_groups():
    peak, low = 1e-3, 1e-5
    assert lr_factor(0, peak, low, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, peak, low, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, peak, low, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, peak, low, 10, 100) * peak == pytest.approx((peak + low) / 2)
    assert lr_factor(100, peak, low, 10, 100) * peak == pytest.approx(low)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(lin, 0.05)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_metrics_of_an_interrupted_attempt_are_not_duplicated(tmp_path):
    from fastmam.metrics import MetricsLogger

    first = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in (10, 20, 30):  # crashed after logging step 30; last checkpoint at 20
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False, start_step=20)
    resumed.log(30, {"loss": 3.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(10, 10.0), (20, 20.0), (30, 3.0)]
