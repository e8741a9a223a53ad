"""ZeRO stages 0-3 (and CPU offload) on 2 CPU ranks train the same model: same losses, same parameters.

One launcher run trains every configuration (tests/train/zero_stages_worker.py); the parameters are
consolidated from each run's checkpoint with DeepSpeed's own zero_to_fp32 (stage 0 keeps them whole).
They may differ only by the fp32 summation order of the gradient reduction carried through 4 Adam
steps: measured 8e-6 of the distance the parameters moved on this machine (2026-11-22, torch 2.13 CPU,
DeepSpeed 0.19.8). The bound is 1e-4; a run with the learning rate changed by 0.1% must exceed it, so the
comparison can see a real difference.

The logged losses are compared the same way: the same order-of-summation differences reach them (CI on a
loaded machine once saw ZeRO-1's step-3 loss 1 fp32 ulp from ZeRO-0's), so a loss may differ from ZeRO-0's
by BOUND of how far ZeRO-0's loss has moved since the first step, plus a few fp32 ulps of the loss for the
rounding of the loss itself. Exact equality across stages is not something DeepSpeed promises.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastmam import checkpointing
from fastmam.config import load_config
from fastmam.metrics import read_metrics
from fastmam.models import Pretrainer
from tests.train.test_pretrain import REPO, free_port, run_cli
from tests.train.zero_stages_worker import BASE

RUNS = {
    "z0": "deepspeed.zero_stage=0",
    "z1": "deepspeed.zero_stage=1",
    "z2": "deepspeed.zero_stage=2",
    "z3": "deepspeed.zero_stage=3",
    "z2_offload": "deepspeed.zero_stage=2,deepspeed.offload_optimizer=true",
    "z3_offload": "deepspeed.zero_stage=3,deepspeed.offload_optimizer=true,deepspeed.offload_params=true",
    # the control: tiny's base_lr (1e-2) x 1.001
    "z0_lr": "deepspeed.zero_stage=0,optim.base_lr=0.01001",
}
BOUND = 1e-4
#: fp32 ulps of a loss allowed on top of BOUND (the loss's own rounding; the first step has moved nothing)
LOSS_ULPS = 4


def loss_deviation(losses: list[float], ref: list[float]) -> float:
    """max over steps of |loss - ref| / allowance, allowance = BOUND x |ref - ref[0]| + LOSS_ULPS ulps of ref:
    <= 1 when ``losses`` follow ``ref`` as closely as the parameters must."""
    eps = torch.finfo(torch.float32).eps
    return max(abs(a - b) / (BOUND * abs(b - ref[0]) + LOSS_ULPS * eps * abs(b))
               for a, b in zip(losses, ref, strict=True))


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints"
    tag = checkpointing.latest_tag(ckpt)
    assert tag == "step_00000004", tag
    if json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 0:
        return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


@pytest.mark.slow
def test_zero_stages_and_offload_train_the_same_model(tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is installed with deepspeed"
    run_cli([launcher, "--num_gpus", "2", "--master_port", str(free_port()),
             str(REPO / "tests/train/zero_stages_worker.py"), str(tmp_path),
             *(f"{name}={overrides}" for name, overrides in RUNS.items())], timeout=900)

    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name)] for name in RUNS}
    for name in RUNS:
        stage = json.loads((tmp_path / name / "deepspeed_config.json").read_text())["zero_optimization"]
        assert str(stage["stage"]) == name[1], (name, stage)
        assert len(losses[name]) == 4 and losses[name][-1] < losses[name][0], (name, losses[name])
    offload = json.loads((tmp_path / "z3_offload" / "deepspeed_config.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    # ZeRO-1 and -2 shard the optimizer state, ZeRO-3 the weights too: one file per rank
    for name in ("z1", "z2", "z3"):
        shards = list((tmp_path / name / "checkpoints" / "step_00000004").glob("*optim_states.pt"))
        assert len(shards) == 2, (name, shards)

    cfg = load_config("tiny", BASE)
    torch.manual_seed(cfg.seed)  # the initial weights, as train() makes them
    init = Pretrainer(cfg).state_dict()
    ref = _final_params(tmp_path / "z0")
    keys = sorted(k for k in ref if k in init)
    assert len(keys) == len(ref) and keys, "every trained parameter is compared"

    def flat(state):
        return torch.cat([state[k].flatten().double() for k in keys])

    start, end = flat(init), flat(ref)
    moved = (end - start).norm()
    assert moved > 0
    for name in RUNS:
        if name == "z0":
            continue
        params = _final_params(tmp_path / name)
        assert sorted(params) == sorted(ref), name
        rel = ((flat(params) - end).norm() / moved).item()
        if name == "z0_lr":
            assert rel > BOUND, f"a 0.1% learning-rate change moved the parameters by only {rel:.3g} (bound {BOUND})"
            assert loss_deviation(losses[name][:1], losses["z0"][:1]) <= 1  # same data and weights at step 1
            assert loss_deviation(losses[name], losses["z0"]) > 1, (
                f"a 0.1% learning-rate change kept the losses within the bound: {losses[name]} vs {losses['z0']}")
        else:
            assert loss_deviation(losses[name], losses["z0"]) <= 1, (name, losses[name], losses["z0"])
            assert rel <= BOUND, f"{name}: parameters differ from ZeRO-0's by {rel:.3g} of the distance moved"
