"""Long runs are safe: non-finite steps are skipped and stop (or not) by config, a killed process resumes
to the same later losses, and a crash while saving leaves the previous checkpoint in force."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmam import checkpointing
from fastmam.metrics import read_metrics
from fastmam.models import Pretrainer
from fastmam.ops import LossOutput
from tests.train.test_pretrain import FAST, REPO, _tiny, run_cli


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the losses of those forward calls (1-based; one per step without accumulation) become
    NaN, and so their gradients. Returns the parameters seen at the start of every call."""
    seen = []

    def install(steps):
        forward = Pretrainer.forward

        def poisoned(self, *args, **kwargs):
            seen.append({k: v.detach().clone() for k, v in self.model.named_parameters()})
            out = forward(self, *args, **kwargs)
            if len(seen) in steps:
                nan = torch.tensor(float("nan"))
                return LossOutput(out.total * nan, out.appearance * nan, out.motion)
            return out

        monkeypatch.setattr(Pretrainer, "forward", poisoned)
        return seen

    return install


def _cfg(out, *extra):
    return _tiny(out, "deepspeed.gradient_accumulation_steps=1", *extra)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_then_the_run_stops(tmp_path, poison):
    from fastmam.pretrain import train

    seen = poison({3})
    with pytest.raises(FloatingPointError, match=r"1 optimizer step\(s\) since the last log \(steps 1-3\) had a "
                                                 r"non-finite loss or gradient, the first at step 3.*nonfinite=skip"):
        train(_cfg(tmp_path / "run", "logging.every_steps=3", "checkpoint.every_steps=2"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == []  # it stopped at the first log interval
    assert checkpointing.latest_tag(tmp_path / "run" / "checkpoints") == "step_00000002"
    assert len(seen) == 3


@pytest.mark.slow
def test_skip_policy_leaves_the_weights_of_the_last_finite_step(tmp_path, poison):
    from fastmam.pretrain import train

    seen = poison({3, 4})
    summary = train(_cfg(tmp_path / "run", "safety.nonfinite=skip", "safety.max_consecutive_skips=2"))
    assert summary["step"] == 8
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    # steps 3 and 4 had no finite micro-step: no loss to report; later steps train on
    assert [r["loss"] is None for r in rows] == [False, False, True, True, False, False, False, False]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2, 2, 2]
    # the weights before step 5 are those before step 3: both NaN steps left weights and Adam state alone
    for name, value in seen[2].items():
        assert torch.equal(seen[4][name], value), name
        assert not torch.equal(seen[2][name], seen[1][name]) or "mask_token" in name  # step 2 did train
    assert all(torch.isfinite(v).all() for v in seen[-1].values())
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_skip_policy_stops_when_bad_steps_keep_coming(tmp_path, poison):
    from fastmam.pretrain import train

    poison({2, 3, 4})
    with pytest.raises(FloatingPointError, match="3 steps in a row were skipped, more than safety.max_consecutive_sk"):
        train(_cfg(tmp_path / "run", "safety.nonfinite=skip", "safety.max_consecutive_skips=2",
                   "logging.every_steps=4"))


def test_cli_stops_with_a_message_and_exit_status(tmp_path, poison, capsys):
    from fastmam.pretrain import main

    poison({1})
    status = main(["--config", "tiny", f"output_dir={tmp_path / 'run'}", "schedule.steps=2", "schedule.warmup_steps=1",
                   "logging.every_steps=1", "data.batch_size=2", *FAST])
    assert status == 4
    err = capsys.readouterr().err
    assert "non-finite loss or gradient, the first at step 1" in err and "no checkpoint was written yet" in err


KILLED = ["--config", "tiny", "schedule.steps=40", "schedule.warmup_steps=4", "logging.every_steps=2",
          "checkpoint.every_steps=10", "data.batch_size=4", *FAST]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_losses(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli([sys.executable, "fastmam/pretrain.py", *KILLED, f"output_dir={straight}"])

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "fastmam/pretrain.py", *KILLED, f"output_dir={killed}"], cwd=REPO,
                            env={**env, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "checkpoints" / "step_00000010" / checkpointing.MARKER
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists() and proc.poll() is None, f"no checkpoint before exit: {proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)  # no cleanup, no atexit: as a node failure would
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()
    done = read_metrics(killed)
    assert done and done[-1]["step"] < 40, "the run was killed before its end"

    run_cli([sys.executable, "fastmam/pretrain.py", *KILLED, f"output_dir={killed}", "--resume"])
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(2, 41, 2))  # each step once
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss"], ra["lr"]) == (rb["loss"], rb["lr"]), ra["step"]
    assert checkpointing.latest_tag(killed / "checkpoints") == "step_00000040"


@pytest.mark.slow
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from fastmam.pretrain import train

    save = TorchCheckpointEngine.save

    def crashing_save(self, state_dict, path):
        if "step_00000004" in str(path):
            with open(path, "wb") as f:  # half a file, then the disk fills up
                f.write(b"\x80\x02partial")
            raise OSError(28, "No space left on device")
        return save(self, state_dict, path)

    run = tmp_path / "run"
    cfg = _cfg(run, "schedule.steps=6", "checkpoint.every_steps=2")
    monkeypatch.setattr(TorchCheckpointEngine, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    ckpt = run / "checkpoints"
    assert (ckpt / "step_00000004").is_dir() and not (ckpt / "step_00000004" / checkpointing.MARKER).exists()
    assert checkpointing.latest_tag(ckpt) == "step_00000002"

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    # loads step 2 and saves at 3 and 6 (another cadence, so no save rewrites step 4): once step 6 is complete,
    # the debris of the crashed save is gone
    train(_cfg(run, "schedule.steps=6", "checkpoint.every_steps=3"), resume=True)
    assert checkpointing.complete_tags(ckpt) == ["step_00000003", "step_00000006"]
    assert checkpointing.incomplete_tags(ckpt) == []
    straight = tmp_path / "straight"
    train(_cfg(straight, "schedule.steps=6", "checkpoint.every_steps=2"))
    a, b = read_metrics(straight), read_metrics(run)
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
