"""Training on VQGAN codes end to end: a taming-format checkpoint of a tiny random VQGAN, the tiny preset."""

import math

import pytest
import torch

from fastmam import checkpointing
from fastmam.config import load_config
from fastmam.metrics import read_metrics

from ..tiny_vqgan import vqgan_overrides, write_taming_checkpoint
from .test_pretrain import FAST


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqgan") / "last.ckpt"
    return write_taming_checkpoint(path, load_config("tiny", vqgan_overrides()).targets.vqgan)


@pytest.mark.slow
def test_tiny_run_on_vqgan_codes_cross_entropy_falls(checkpoint, tmp_path):
    """The tiny preset with appearance: vqgan and a taming checkpoint trains, and the code cross-entropy falls."""
    from fastmam.pretrain import train

    out = tmp_path / "run"
    train(load_config("tiny", [*vqgan_overrides(checkpoint), f"output_dir={out}", "schedule.steps=24",
                               "schedule.warmup_steps=4", "logging.every_steps=8", "checkpoint.every_steps=24", *FAST]))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [8, 16, 24] and all(math.isfinite(r["loss"]) for r in rows)
    first, last = rows[0]["loss_appearance"], rows[-1]["loss_appearance"]
    assert first < math.log(32) + 0.5  # a cross-entropy over the tiny VQGAN's 32 codes
    assert last < 0.8 * first, f"code cross-entropy did not fall: {first} -> {last}"
    # the tokenizer's weights come from its own file at every start, never from the training checkpoint
    tag = checkpointing.latest_tag(out / "checkpoints")
    module = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and not any("quantize" in k or k.startswith(("tokenizer", "encoder.")) for k in module)


@pytest.mark.slow
def test_resume_on_vqgan_codes_of_all_frames_is_exact(checkpoint, tmp_path):
    """Online codes (t per token with code_frame: all) keep a resumed run exact: the tokenizer is deterministic
    and reloaded from its file."""
    from fastmam.pretrain import train

    def cfg(out):
        return load_config("tiny", [*vqgan_overrides(checkpoint), "targets.code_frame=all", f"output_dir={out}",
                                    "schedule.steps=6",
                                    "schedule.warmup_steps=2", "logging.every_steps=1", "checkpoint.every_steps=100",
                                    "data.batch_size=4", *FAST])

    train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"), stop_after=3)
    train(cfg(tmp_path / "b"), resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert (ra["loss_appearance"], ra["loss_motion"]) == (rb["loss_appearance"], rb["loss_motion"]), ra["step"]
    assert a[-1]["loss_appearance"] < a[0]["loss_appearance"]


def test_missing_checkpoint_stops_the_run_saying_where_to_get_one(tmp_path, capsys):
    from fastmam.pretrain import main

    assert main(["--config", "vit_b_vqgan", f"output_dir={tmp_path}",
                 f"targets.vqgan.checkpoint={tmp_path / 'missing.ckpt'}", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"the VQGAN checkpoint {tmp_path / 'missing.ckpt'} does not exist" in err
    assert "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/" in err and "targets.vqgan.checkpoint=" in err
