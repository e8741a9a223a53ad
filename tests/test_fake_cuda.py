"""The GPU training step, traced on fake CUDA tensors (DESIGN §10): no GPU needed, only a CUDA build of torch.

``FakeTensorMode`` gives tensors a device, a shape, strides and a dtype but no memory and no kernels, so the whole
forward of ``Pretrainer`` runs on ``cuda`` at ViT-B shapes (16 x 224 x 224, batch 2) in seconds on a CPU. The model is
placed as training places it: parameters cast to the precision of ``deepspeed.precision`` ('auto' is bf16 on a GPU;
DeepSpeed casts the parameters and keeps fp32 buffers), then moved to the device (``build``). For each objective
(pixels + RGB difference, VQGAN codes online and cached, dense motion, VideoMAE, and the method presets MAM2,
MotionMAE and MME -- HOG and trajectory targets, one shared decoder), two steps (the second one must copy nothing
from the host: the tokenizer moves, and the reference backend's statistics are cached, on the first):

1. every public op dispatches to its fused backend on the CUDA tensors (``_backend.record_dispatch``) and the
   fused kernels' custom ops are the ones that run;
2. the fake implementations of the custom ops (Triton: ``fastmam::*``; CUDA C++: ``fastmam_cuda::*``) give the
   shapes, strides and dtypes of the real kernels (run on CPU tensors under ``TRITON_INTERPRET=1``, or on the GPU);
3. no CPU tensor meets a CUDA tensor, no op runs on the CPU, and nothing is copied from the host except weights
   on their first use (``DeviceAudit``; FakeTensorMode itself rejects most device mixing, and ``.item()``);
4. attention goes through SDPA with the README's priority (flash, memory-efficient, math; cuDNN off) in bf16;
5. backward: autograd's engine needs a CUDA context for CUDA tensors, so the custom ops' backward formulas are
   called directly on fake CUDA tensors, and the whole step's backward is traced on fake CPU tensors with the
   Triton backend (on a GPU machine: on fake CUDA tensors).

Not covered here: what the kernels compute (tests/ops/*), the SDPA kernel that a real device picks (flash needs
the device's properties; tests/models/test_attention.py checks it on a GPU), autograd on CUDA tensors without a
GPU, DeepSpeed's engine and optimizer, the loader, and the CUDA generator of ``pretrain.step_noise``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastmam import ops
from fastmam.config import load_config, resolve_precision
from fastmam.models import Pretrainer
from fastmam.models import attention as attn_mod
from fastmam.models.layers import Attention, CrossAttention
from fastmam.models.vqgan import AttnBlock, VQGANTokenizer
from fastmam.ops import _backend, _checks, _cuda
from fastmam.ops._backend import record_dispatch
from tests.conftest import random_trajectories

pytestmark = [
    pytest.mark.skipif(torch.version.cuda is None,
                       reason="a CPU build of torch: fake CUDA tensors need a CUDA build (CI installs one)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed: the fused backend under test is Triton's"),
]

GPU = torch.cuda.is_available()
#: where the real kernels run for comparison: the GPU, else the CPU with the Triton interpreter
REAL = "cuda" if GPU else "cpu"
CUDA = torch.device("cuda", 0)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: configs with a dense or cached target need a video list; none is read here
VIDEO = ["data.source=video", "data.train_list=unused.csv"]
BATCH = 2
#: the objectives of the task, at ViT-B shapes: preset and overrides
OBJECTIVES = {
    "pixel_rgb_diff": ("vit_b", ["targets.appearance=pixel"]),
    "vqgan_online": ("vit_b_vqgan", ["targets.codes=online"]),
    "vqgan_cached": ("vit_b_vqgan", ["targets.codes=cached", "targets.code_cache=unused", *VIDEO]),
    "vqgan_cached_all_frames": ("vit_b_vqgan", ["targets.codes=cached", "targets.code_cache=unused",
                                                "targets.code_frame=all", *VIDEO]),
    "dense_motion": ("vit_b", ["targets.motion=rgb_diff_dense", *VIDEO]),
    "videomae": ("videomae_vit_b", []),
    # the method presets as shipped (configs/*.yaml); MME's trajectories come with the batch (step_inputs)
    "mam2": ("mam2_vit_b", []),
    "motionmae": ("motionmae_vit_b", []),
    "mme": ("mme_vit_b", []),
}
#: the Triton custom op behind each public op (fastmam/ops/_triton.py); the dual-decoder loss of pixels is the
#: reference's MSE inside the Triton backend (no kernel to fuse: the pixel head's output is small)
TRITON_OPS = {"tube_mask_gather": "fastmam::gather_normalize", "pixel_target": "fastmam::masked_target",
              "rgb_diff_target": "fastmam::masked_target", "gather_tokens": "fastmam::copy_rows",
              "scatter_tokens": "fastmam::copy_rows", "hog_target": "fastmam::hog_target",
              "trajectory_target": "fastmam::trajectory_target"}


def readme_backend(op: str) -> str:
    """The README's promise for ``auto`` on a CUDA tensor: Triton, unless a recorded GPU benchmark measured the
    op's CUDA C++ kernel faster (``MEASURED_PREFERENCE``)."""
    measured = _backend.MEASURED_PREFERENCE.get(op)
    return measured[0] if measured else "triton"


def assert_fused(calls, expected_ops) -> None:
    """``calls`` (``record_dispatch``) are exactly ``expected_ops``, in order, each on CUDA with its fused backend."""
    got = [(c.op, c.backend, c.device) for c in calls]
    want = [(op, readme_backend(op), CUDA) for op in expected_ops]
    assert got == want, f"dispatch on CUDA tensors: got {got}, expected {want}"
    assert all(c.backend != "reference" for c in calls), got


# --------------------------------------------------------------------------------------------- audits


class Op(NamedTuple):
    name: str
    inputs: list
    outputs: list


def _described(t: torch.Tensor):
    return tuple(t.shape), t.dtype, t.device.type


class DeviceAudit(TorchDispatchMode):
    """Every op of a trace (aten and custom), sorted by where its tensors live. In a GPU step every op should see
    CUDA tensors only. ``mixed``: CPU and CUDA tensors in one op (a real GPU rejects most; a 0-dim CPU tensor it
    accepts silently, as FakeTensorMode does); ``cpu``: an op on CPU tensors only (host work in the step, e.g. a
    constant built without ``device=``); ``h2d``: a copy from a CPU tensor to the GPU, with whether its source
    existed before the trace (``real``: weights moved on first use) or was made in it; ``real``: any other op that
    reads a tensor from outside the trace; ``custom``: the fastmam custom ops, with their tensors."""

    def __init__(self):
        super().__init__()
        self.mixed, self.cpu, self.h2d, self.real, self.custom = [], [], [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        op = Op(name, [_described(t) for t in ins], [_described(t) for t in outs])
        if name.startswith(("fastmam::", "fastmam_cuda::")):
            self.custom.append(op)
        if name == "prim::device":  # a query, no data
            return out
        devices = {t.device.type for t in ins + outs}
        if name == "aten::_to_copy" and ins[0].device.type == "cpu" and devices == {"cpu", "cuda"}:
            self.h2d.append((op, not isinstance(ins[0], FakeTensor)))
            return out
        if devices - {"cuda"}:
            (self.cpu if devices == {"cpu"} else self.mixed).append(op)
        if any(not isinstance(t, FakeTensor) for t in ins) and name != "aten::lift_fresh":
            self.real.append(op)
        return out


_SDPA_FLAGS = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}
_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
#: what a caller may have set around the step (recent torch prefers cuDNN on sm90): the model must not inherit it
ADVERSARIAL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.FLASH_ATTENTION]


class SdpaCall(NamedTuple):
    owner: str | None  # the attention module that made the call
    q: tuple
    k: tuple
    v: tuple
    extra: tuple  # attn_mask, dropout, causal, ... beyond (q, k, v)
    priority: tuple[int, ...] | None
    enabled: frozenset
    flash_eligible: bool | None  # PyTorch's own check; None without a GPU (it reads the device's properties)


class AttentionWatch(TorchFunctionMode):
    """Records each ``F.scaled_dot_product_attention`` call: which attention module made it, its inputs, and the
    SDPA kernel priority and enabled kernels in force at the call. A call of a ``prioritized`` module made without
    exactly ``SDPA_PRIORITY``'s kernels enabled fails at once (before SDPA would query a device for cuDNN)."""

    def __init__(self, modules: dict[str, nn.Module], prioritized=()):
        super().__init__()
        self.prioritized = set(prioritized)
        self.calls: list[SdpaCall] = []
        self._owners: list[str] = []
        self._hooks = []
        for name, mod in modules.items():
            self._hooks.append(mod.register_forward_pre_hook(lambda m, a, _n=name: self._owners.append(_n)))
            self._hooks.append(mod.register_forward_hook(lambda m, a, o: self._leave()))

    def _leave(self) -> None:
        self._owners.pop()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            order = getattr(torch._C, "_get_sdp_priority_order", None)
            eligible = None
            if GPU:
                params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
                eligible = torch.backends.cuda.can_use_flash_attention(params)
            call = SdpaCall(
                self._owners[-1] if self._owners else None,
                *((tuple(t.shape), t.stride(-1), t.dtype, t.device.type) for t in (q, k, v)),
                (*args[3:], *kwargs.items()),
                tuple(order()) if order else None,
                frozenset(b for b, on in _SDPA_FLAGS.items() if on()),
                eligible,
            )
            self.calls.append(call)
            want = frozenset(attn_mod.SDPA_PRIORITY)
            if call.owner in self.prioritized and call.enabled != want:
                raise AssertionError(f"{call.owner}: SDPA ran with {sorted(b.name for b in call.enabled)} enabled, "
                                     f"expected SDPA_PRIORITY's {sorted(b.name for b in want)}")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def _no_cached_fake_statistics():
    """``_checks.channel_stats`` caches per-channel statistics per device (``_stats_on``): one built under a fake
    mode is a fake tensor that must not reach a later test (on a GPU machine: a real cuda:0 computation)."""
    _checks._stats_on.cache_clear()
    yield
    _checks._stats_on.cache_clear()


@pytest.fixture
def cuda_autocast(monkeypatch):
    """``torch.autocast('cuda')`` turns itself off where no GPU is visible; the VQGAN encoder runs under it on a
    GPU, so without one we let it on (the autocast dispatch works on fake CUDA tensors)."""
    if not GPU:
        monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def fake_mode() -> FakeTensorMode:
    # real (CPU) tensors are allowed in: the model's weights are converted when they move, as the tokenizer's are
    # on first use; DeviceAudit reports any other real input
    return FakeTensorMode(allow_non_fake_inputs=True)


def build(mode: FakeTensorMode, preset: str, overrides: list[str], device: torch.device = CUDA):
    """(cfg, Pretrainer on fake CUDA, param dtype, tokenizer) as ``pretrain.train`` builds and DeepSpeed places it,
    except that the model is built on the meta device: a fake trace reads no weight, and a ViT-B's random init on
    the CPU costs seconds. Whatever ``.to()`` would not move (a tensor that is not a parameter or buffer) stays on
    meta and fails the trace as a CPU one would.

    The online VQGAN is the preset's architecture (taming's f16, 16384 codes) with random weights, built on the CPU
    and left there: the first step moves it, as in training."""
    cfg = load_config(preset, ["device=cuda", *overrides])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision(cfg, "cuda")]
    torch.manual_seed(0)
    online = cfg.targets.appearance == "vqgan" and cfg.targets.codes == "online"
    tokenizer = VQGANTokenizer.from_config(cfg.targets.vqgan) if online else None
    with torch.device("meta"):
        model = Pretrainer(cfg, tokenizer=tokenizer)
    # DeepSpeed (engine._configure_distributed_model): parameters cast to bf16, buffers keep their dtype, then .to()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    with mode:
        model.to(device)
    return cfg, model, dtype, tokenizer


class StepInputs(NamedTuple):
    """``Pretrainer``'s arguments: ``model(*args, **kwargs)``."""

    args: tuple  # clip, noise, next_clip, codes
    kwargs: dict  # trajectories, trajectory_valid (targets.motion: trajectory)


def step_inputs(cfg, model) -> StepInputs:
    """One batch as the loader and ``pretrain.train`` hand it to the model, on the (fake) GPU."""
    d, p, tg = cfg.data, cfg.model.patch, cfg.targets
    clip = torch.randint(0, 256, (BATCH, d.num_frames, d.img_size, d.img_size, 3), dtype=torch.uint8, device=CUDA)
    noise = torch.rand(model.noise_shape(BATCH), device=CUDA)
    next_clip = torch.randint(0, 256, clip.shape, dtype=torch.uint8, device=CUDA) \
        if tg.motion == "rgb_diff_dense" else None
    codes = torch.randint(0, tg.num_codes, (BATCH, d.num_frames, d.img_size // p, d.img_size // p),
                          dtype=torch.int32, device=CUDA) if tg.codes == "cached" and model.uses_codes else None
    # the loader's float32 steps and validity bits of each tubelet's first frame
    kwargs = random_trajectories(cfg, BATCH, device=CUDA, valid=0.9)
    return StepInputs((clip, noise, next_clip, codes), kwargs)


def expected_ops(cfg) -> list[str]:
    """The public ops of one step, in call order (DESIGN §4): mask+gather, the targets, the loss (its appearance
    term alone with trajectories: ``trajectory_loss`` is plain PyTorch, not a dispatched op)."""
    tg = cfg.targets
    names = ["tube_mask_gather"]
    if tg.appearance in ("pixel", "hog"):
        names.append(f"{tg.appearance}_target")
    if tg.motion == "trajectory":
        names.append("trajectory_target")
    elif tg.motion != "none":
        names.append("rgb_diff_target")
    names.append("dual_decoder_loss")
    return names


def attention_modules(module: nn.Module, kinds=(Attention, CrossAttention)) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}


def _outer_priority():
    return sdpa_kernel(ADVERSARIAL, set_priority=True) if _SET_PRIORITY else sdpa_kernel(ADVERSARIAL)


def traced_step(mode, model, inputs, watched, prioritized=()):
    """One forward under the audits. Around the video model (not the tokenizer: its attention takes whatever the
    caller set, and cuDNN's eligibility check reads the device) a caller's SDPA setting that puts cuDNN first."""
    outer = contextlib.ExitStack()

    def enter(module, args):
        outer.enter_context(_outer_priority())

    hooks = [model.model.register_forward_pre_hook(enter),
             model.model.register_forward_hook(lambda m, a, o: outer.close())]
    try:
        with mode, record_dispatch() as calls, DeviceAudit() as audit, AttentionWatch(watched, prioritized) as watch:
            out = model(*inputs.args, **inputs.kwargs)
    finally:
        for h in hooks:
            h.remove()
        outer.close()
    return out, calls, audit, watch


# ------------------------------------------------------------------------------ 1, 3, 4: the training step


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_training_step_on_fake_cuda(objective, cuda_autocast):
    mode = fake_mode()
    cfg, model, dtype, tok = build(mode, *OBJECTIVES[objective])
    assert dtype == torch.bfloat16, "deepspeed.precision 'auto' is bf16 on a GPU"
    params = list(model.parameters())
    assert all(p.device == CUDA and p.dtype == dtype and isinstance(p, FakeTensor) for p in params)
    assert all(b.device == CUDA and b.dtype == torch.float32 for b in model.buffers())  # position tables
    model_attention = attention_modules(model)
    tok_attention = attention_modules(tok, (AttnBlock,)) if tok is not None else {}
    # 4. the attention function the README promises: SDPA by default, for every encoder/regressor/decoder block
    assert cfg.model.attention == "sdpa"
    assert model_attention and all(m.attend is attn_mod.sdpa_attention for m in model_attention.values())
    with mode:
        inputs = step_inputs(cfg, model)
    tok_state = [*tok.parameters(), *tok.buffers()] if tok is not None else []
    tok_tensors = sorted((_described(t) for t in tok_state), key=str)  # on the CPU until the first step

    for step in (1, 2):
        out, calls, audit, watch = traced_step(mode, model, inputs, {**model_attention, **tok_attention},
                                               model_attention)

        # the loss: fp32 scalars on the GPU, differentiable
        assert [(tuple(t.shape), t.dtype, t.device) for t in out] == [((), torch.float32, CUDA)] * 3
        assert out.total.requires_grad

        # 1. every public op on its fused backend, and the fused kernels are what runs
        assert_fused(calls, expected_ops(cfg))
        want_custom = [TRITON_OPS[c.op] for c in calls if c.op in TRITON_OPS]
        if model.uses_codes:
            want_custom.append("fastmam::fused_linear_ce")
        assert sorted(o.name for o in audit.custom) == sorted(want_custom)
        by_name = {o.name: o for o in audit.custom}
        assert by_name["fastmam::gather_normalize"].outputs[0][1:] == (dtype, "cuda"), "patches in the model's dtype"
        assert all(o.outputs[0][1] == torch.float32 for o in audit.custom if o.name == "fastmam::masked_target")
        # MME's targets: float32 (B, Nm, 108) HOG of the uint8 clip; (target, weight) float32 (B, Nm, 32) of the
        # loader's float32 trajectories and bool validity
        nm = (cfg.data.num_frames // cfg.model.tubelet) * int(cfg.masking.ratio * 14 * 14)  # masked tokens
        if "fastmam::hog_target" in by_name:
            hog = by_name["fastmam::hog_target"]
            assert hog.inputs[:2] == [((BATCH, 16, 224, 224, 3), torch.uint8, "cuda"), ((BATCH, nm), torch.int64,
                                                                                        "cuda")]
            assert hog.outputs == [((BATCH, nm, 108), torch.float32, "cuda")]
        if "fastmam::trajectory_target" in by_name:
            traj = by_name["fastmam::trajectory_target"]
            assert traj.inputs[:3] == [((BATCH, 8, 28, 28, 4, 2), torch.float32, "cuda"),
                                       ((BATCH, 8, 28, 28), torch.bool, "cuda"), ((BATCH, nm), torch.int64, "cuda")]
            assert traj.outputs == [((BATCH, nm, 32), torch.float32, "cuda")] * 2
        if cfg.model.shared_decoder:  # MME: one decoder, no per-target ones
            assert model.model.appearance_decoder is None and model.model.motion_decoder is None
        if model.uses_codes:  # bf16 decoder output and head into the fused CE; fp32 loss and gradients out
            h, w = by_name["fastmam::fused_linear_ce"].inputs[:2]
            assert (h[1], w[1]) == (dtype, dtype)
            assert all(o[1] == torch.float32 for o in by_name["fastmam::fused_linear_ce"].outputs)

        # 3. devices: nothing on the host, nothing mixed; the only host-to-device copies are the tokenizer's weights
        # on the first step (frozen fp32 weights that live outside the module DeepSpeed moves)
        assert audit.mixed == [], audit.mixed
        assert audit.cpu == [], audit.cpu
        assert audit.real == [], audit.real
        moved = [op.inputs[0] for op, _ in audit.h2d]
        if tok is not None and step == 1:
            assert all(real for _, real in audit.h2d)
            assert sorted(moved, key=str) == tok_tensors
            assert all(t.device == CUDA and t.dtype == torch.float32 for t in tok.parameters())
        else:
            assert moved == [], moved

        # 4. SDPA, in the model's bf16, under the README's kernel priority whatever the caller had set
        model_calls = [c for c in watch.calls if c.owner in model_attention]
        assert sorted(c.owner for c in model_calls) == sorted(model_attention), "each attention block once"
        for c in model_calls:
            for shape, last_stride, t_dtype, device in (c.q, c.k, c.v):
                assert (t_dtype, device, last_stride) == (dtype, "cuda", 1)
                # flash's input rules (head dim a multiple of 8 up to 256, no mask, no dropout)
                assert shape[-1] % 8 == 0 and shape[-1] <= 256
            assert c.extra == ()
            if c.priority is not None:
                assert c.priority[:len(attn_mod.SDPA_PRIORITY)] == tuple(int(b) for b in attn_mod.SDPA_PRIORITY)
            assert c.enabled == frozenset(attn_mod.SDPA_PRIORITY), c.enabled
            assert c.flash_eligible in (None, True)
        tok_calls = [c for c in watch.calls if c.owner in tok_attention]
        assert len(tok_calls) == len(watch.calls) - len(model_calls), "no other attention"
        if tok is not None:
            assert sorted(c.owner for c in tok_calls) == sorted(tok_attention)
            # targets.vqgan.precision 'auto': the encoder in bf16 autocast on a GPU
            want = torch.bfloat16 if tok._use_bf16(CUDA) else torch.float32
            assert all(c.q[2] == want for c in tok_calls)


def test_reference_backend_on_fake_cuda_copies_only_statistics():
    """``backend: reference`` on a GPU (the comparison mode): no device mixing either; the per-channel statistics
    of the normalization are the only host-to-device copies. On a real device they are made once and cached
    (tests/ops/test_gather.py); under a tracing mode the cache is skipped (a traced tensor must not be cached, see
    test_statistics_cache_does_not_leak_out_of_a_fake_trace), so here every step makes them."""
    mode = fake_mode()
    cfg, model, _, _ = build(mode, "vit_b", ["backend=reference"])
    with mode:
        inputs = step_inputs(cfg, model)
    for _step in (1, 2):
        _, calls, audit, _ = traced_step(mode, model, inputs, {})
        assert [(c.op, c.backend) for c in calls] == [(op, "reference") for op in expected_ops(cfg)]
        assert audit.mixed == [] and audit.real == [] and audit.custom == []
        moved = [(op.inputs[0][:2], real) for op, real in audit.h2d]
        # torch.tensor(values, device=cuda) builds the (C,) tensor on the host and copies it: mean and std
        stats = ((len(cfg.data.mean),), torch.float32)
        assert moved == [(stats, False)] * 2, moved
        assert [op.name for op in audit.cpu] == ["aten::lift_fresh"] * 2, audit.cpu


def test_statistics_cache_does_not_leak_out_of_a_fake_trace():
    """channel_stats caches the (C,) statistics per (values, device); a tensor made under a FakeTensorMode must not
    enter that cache, or a later mode (or a real run on cuda:0 in the same process) would receive it."""
    for _ in range(2):
        with FakeTensorMode():  # strict: a tensor of another mode is an error
            clip = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, device=CUDA)
            ops.tube_mask_gather(clip, torch.rand(2, 16, device=CUDA), 0.5, 2, 8, MEAN, STD, backend="reference")


# ----------------------------------------------------------------------------- 1: each public op, directly


def _op_cases(dtype=torch.bfloat16):
    """Each public op with a fused backend, at ViT-B shapes on (fake) CUDA tensors: name -> call(backend)."""
    b, t, s, p, tub = BATCH, 16, 224, 16, 2
    n, positions = (t // tub) * (s // p) ** 2, (s // p) ** 2
    nm = (t // tub) * int(0.9 * positions)
    clip = torch.randint(0, 256, (b, t, s, s, 3), dtype=torch.uint8, device=CUDA)
    bcthw = torch.randn(b, 3, t, s, s, device=CUDA, dtype=dtype)
    noise = torch.rand(b, positions, device=CUDA)
    ids = torch.arange(nm, device=CUDA).expand(b, -1).contiguous()  # (B, Nm); fake: the values do not matter
    h = torch.randn(b, ids.shape[1], 384, device=CUDA, dtype=dtype)
    head = torch.randn(16384, 384, device=CUDA, dtype=dtype)
    codes = torch.randint(0, 16384, (b, ids.shape[1]), device=CUDA)
    motion = torch.randn(b, ids.shape[1], 768, device=CUDA, dtype=dtype)
    motion_t = torch.randn(b, ids.shape[1], 768, device=CUDA)
    tokens = torch.randn(b, n, 768, device=CUDA, dtype=dtype)
    disp = torch.randn(b, t // tub, s // 8, s // 8, 4, 2, device=CUDA, dtype=torch.float16)  # MME's L=4 trajectories
    valid = torch.ones(b, t // tub, s // 8, s // 8, dtype=torch.bool, device=CUDA)
    return {
        "tube_mask_gather": lambda be: ops.tube_mask_gather(clip, noise, 0.9, tub, p, MEAN, STD, dtype, backend=be),
        "tube_mask_gather[BCTHW]": lambda be: ops.tube_mask_gather(bcthw, noise, 0.9, tub, p, out_dtype=dtype,
                                                                   layout="BCTHW", backend=be),
        "pixel_target": lambda be: ops.pixel_target(clip, ids, tub, p, backend=be),
        "pixel_target[BCTHW]": lambda be: ops.pixel_target(bcthw, ids, tub, p, True, MEAN, STD, "BCTHW", backend=be),
        "rgb_diff_target": lambda be: ops.rgb_diff_target(clip, ids, tub, p, backend=be),
        "rgb_diff_target[dense]": lambda be: ops.rgb_diff_target(clip, ids, tub, p, True, clip.flip(1), backend=be),
        "dual_decoder_loss": lambda be: ops.dual_decoder_loss(h, head, None, codes, motion, motion_t, backend=be),
        "gather_tokens": lambda be: ops.gather_tokens(tokens, ids, backend=be),
        "scatter_tokens": lambda be: ops.scatter_tokens(tokens[:, :ids.shape[1]], ids, n, backend=be),
        "hog_target": lambda be: ops.hog_target(clip, ids, tub, p, backend=be),
        "trajectory_target": lambda be: ops.trajectory_target(disp, valid, ids, tub, p, "patch_std", backend=be),
    }


def test_every_public_op_dispatches_to_its_fused_backend_on_cuda():
    mode = FakeTensorMode()
    with mode:
        cases = _op_cases()
    fused = {op for op, impls in _backend._IMPLS.items() if set(impls) - {"reference"}}
    assert {name.split("[")[0] for name in cases} == fused, "a fused op without a case here (or a stale case)"
    for name, call in cases.items():
        op = name.split("[")[0]
        with mode, record_dispatch() as calls, DeviceAudit() as audit:
            out = call(None)
        assert_fused(calls, [op])
        assert all(t.device == CUDA for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), name
        if op in TRITON_OPS:
            assert [o.name for o in audit.custom] == [TRITON_OPS[op]], name
        assert audit.mixed == audit.cpu == audit.real == audit.h2d == [], name


def test_the_dispatch_check_can_fail(monkeypatch):
    """The same check, with the reference forced (``FASTMAM_BACKEND``), fails: it is not vacuous."""
    monkeypatch.setenv("FASTMAM_BACKEND", "reference")
    mode = FakeTensorMode()
    with mode:
        cases = _op_cases()
    with mode, record_dispatch() as calls:
        cases["pixel_target"](None)
    assert [(c.op, c.backend) for c in calls] == [("pixel_target", "reference")]
    with pytest.raises(AssertionError, match="dispatch on CUDA tensors"):
        assert_fused(calls, ["pixel_target"])


def test_record_dispatch_nests_and_stops():
    mode = FakeTensorMode()
    with mode:
        x = torch.randn(2, 5, 3, device=CUDA)
        ids = torch.tensor([[0, 4], [1, 2]], device=CUDA)
        with record_dispatch() as outer:
            with record_dispatch() as inner:
                ops.gather_tokens(x, ids)
            ops.gather_tokens(x, ids, backend="reference")
        ops.gather_tokens(x, ids)
    assert [c.backend for c in inner] == [readme_backend("gather_tokens")]
    assert [c.backend for c in outer] == [readme_backend("gather_tokens"), "reference"]
    assert _backend._RECORDERS == []


@pytest.mark.skipif(not _cuda.LOADED, reason="fastmam._C is not built (pip install -e . --no-build-isolation with "
                                               "a CUDA build of torch and nvcc)")
def test_cuda_backend_runs_its_kernels_when_asked():
    """``backend='cuda'``: the CUDA C++ ops (their fakes here) run, and what they do not implement is handed to
    Triton, never to the reference."""
    mode = FakeTensorMode()
    with mode:
        cases = _op_cases()
    for name in ("tube_mask_gather", "tube_mask_gather[BCTHW]", "pixel_target", "pixel_target[BCTHW]",
                 "rgb_diff_target", "rgb_diff_target[dense]"):
        op = name.split("[")[0]
        with mode, record_dispatch() as calls, DeviceAudit() as audit:
            cases[name]("cuda")
        assert [(c.op, c.backend) for c in calls] == [(op, "cuda")], name
        assert [o.name for o in audit.custom] == [f"fastmam_cuda::{op}"], name
    with mode:
        clip = torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, device=CUDA)
        with record_dispatch() as calls:  # per-token masking: not in the kernel
            ops.tube_mask_gather(clip, torch.rand(2, 8, device=CUDA), 0.5, 2, 8, MEAN, STD, masking="random",
                                 backend="cuda")
    assert [c.backend for c in calls] == ["cuda", "triton"]


# ---------------------------------------------------------------------------- 3: negative controls


def test_fake_cuda_rejects_what_a_gpu_rejects():
    """The trace can fail: FakeTensorMode raises on CPU/CUDA mixing and on host reads of device values."""
    with FakeTensorMode():
        x = torch.randn(4, 8, device=CUDA)
        with pytest.raises(RuntimeError, match="(?i)device"):
            x + torch.randn(4, 8)
        with pytest.raises(RuntimeError, match="(?i)device"):
            F.embedding(torch.zeros(2, 3, dtype=torch.long, device=CUDA), torch.randn(10, 8))
        with pytest.raises(DataDependentOutputException):
            x.sum().item()  # a host sync: .item(), bool(), a boolean mask's nonzero
        with pytest.raises(DynamicOutputShapeException):
            x[x > 0]


def test_device_audit_catches_what_a_gpu_accepts():
    """A 0-dim CPU tensor times a CUDA tensor runs on a GPU (and in FakeTensorMode): the audit reports it, and an
    op on CPU tensors; a Python scalar is fine."""
    with FakeTensorMode(), DeviceAudit() as audit:
        x = torch.randn(4, 8, device=CUDA)
        x * 2.0
        assert audit.mixed == audit.cpu == []
        x * torch.tensor(2.0)
        torch.arange(8) * 3
    assert [op.name for op in audit.mixed] == ["aten::mul"]
    assert "aten::mul" in [op.name for op in audit.cpu]


def test_a_cpu_buffer_in_the_model_fails_the_trace():
    """The model-level control: the encoder's position table left on the CPU stops the trace with a device error."""
    mode = fake_mode()
    cfg, model, _, _ = build(mode, "tiny", [])
    with mode:
        inputs = step_inputs(cfg, model)
        model.model.pos_embed = torch.zeros(model.model.pos_embed.shape)  # a CPU tensor
        with pytest.raises(RuntimeError, match="(?i)device"):
            model(*inputs.args, **inputs.kwargs)


# ---------------------------------------------------------------- 2: fake implementations vs real kernels


def _strided_like(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor of ``t``'s shape, strides and dtype on ``device`` (inside a fake mode: a fake one)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def _layout(t):
    return (tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t


def _triton_cases(rng):
    """Custom op -> (args on the CPU, differentiable arg positions): odd sizes, B=1, non-contiguous inputs."""
    clip = torch.randint(0, 256, (1, 4, 14, 21, 3), dtype=torch.uint8, generator=rng)
    bcthw = torch.randn(2, 3, 4, 21, 14, generator=rng).transpose(-1, -2)  # (B, C, T, 14, 21), non-contiguous
    ids1 = torch.tensor([[0, 5, 11]])
    ids2 = torch.tensor([[0, 5, 11], [3, 4, 7]])
    m, da, k = 7, 16, 11
    h = torch.randn(m, da, generator=rng)
    w = torch.randn(k, da, generator=rng)
    codes = torch.randint(0, k, (m,), generator=rng)
    scale = torch.full((m,), 1 / m)
    return {
        "gather_normalize": ((clip, ids1, 2, 7, list(MEAN), list(STD), torch.bfloat16, "BTHWC"), ()),
        "gather_normalize[BCTHW]": ((bcthw, ids2, 2, 7, [0.0] * 3, [1.0] * 3, torch.float16, "BCTHW"), ()),
        "masked_target[pixels]": ((clip, None, ids1, 2, 7, True, None, None, "BTHWC", 0), ()),
        "masked_target[pairs]": ((bcthw, None, ids2, 2, 7, False, list(MEAN), list(STD), "BCTHW", 1), ()),
        "masked_target[dense]": ((clip, clip.flip(1), ids1, 2, 7, True, None, None, "BTHWC", 2), ()),
        "copy_rows[gather]": ((torch.randn(2, 5, 12, generator=rng).bfloat16().transpose(1, 2), ids2, 3, False),
                              (0,)),
        "copy_rows[scatter]": ((torch.randn(2, 3, 5, generator=rng), ids2, 12, True), (0,)),
        "fused_linear_ce": ((h, w, torch.randn(k, generator=rng), codes, scale, 4, 8), (0, 1, 2)),
        "fused_linear_ce[bf16, no bias]": ((h.bfloat16(), w.bfloat16(), None, codes, scale, 3, 8), (0, 1)),
        "fused_linear_ce[column-major]": ((h.t().contiguous().t(), w.t().contiguous().t(), None, codes, scale, 4, 8),
                                          (0, 1)),
    }


TRITON_CASES = list(_triton_cases(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_fakes_match_the_kernels(case, rng):
    if REAL == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    args, diff = _triton_cases(rng)[case]
    op = getattr(torch.ops.fastmam, case.split("[")[0]).default
    real_args = [a.to(REAL) if isinstance(a, torch.Tensor) else a for a in args]
    real_args = [a.requires_grad_() if i in diff else a for i, a in enumerate(real_args)]
    real = pytree.tree_leaves(op(*real_args))
    grads_real = []
    if diff:  # the registered backward formula, through autograd, on the real kernels
        grads_real = torch.autograd.grad(real[0].float().sum(), [real_args[i] for i in diff])

    for device in ("cpu", "cuda"):
        mode = FakeTensorMode()
        with mode:
            fake_args = [_strided_like(a, device) if isinstance(a, torch.Tensor) else a for a in args]
            fake_args = [a.requires_grad_() if i in diff else a for i, a in enumerate(fake_args)]
            fake = pytree.tree_leaves(op(*fake_args))
        assert [_layout(f) for f in fake] == [_layout(r) for r in real], (case, device)
        assert all(f.device.type == device for f in fake)
        if not diff:
            continue
        with mode:
            if device == "cpu" or GPU:  # autograd's engine needs a CUDA context for CUDA tensors
                grads = torch.autograd.grad(fake[0].float().sum(), [fake_args[i] for i in diff])
            else:  # 5. the registered backward formula, called as autograd would call it
                grads = _call_backward(case, fake_args, fake, diff)
        assert [_layout(g) for g in grads] == [_layout(g) for g in grads_real], (case, device)
        assert all(g.device.type == device for g in grads)


class _Ctx:
    """What ``setup_context`` and a backward formula use of autograd's ctx."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _call_backward(case, args, outputs, diff):
    from fastmam.ops import _triton

    ctx = _Ctx()
    if case.startswith("copy_rows"):
        _triton._copy_rows_setup_context(ctx, args, outputs[0])
        grads = _triton._copy_rows_backward(ctx, torch.ones_like(outputs[0]))
    else:
        _triton._ce_setup_context(ctx, args, tuple(outputs))
        grads = _triton._ce_backward(ctx, torch.ones_like(outputs[0]), None, None, None)
    assert all(g is None for i, g in enumerate(grads) if i not in diff)
    return [grads[i] for i in diff]


def _cuda_cases(rng):
    """CUDA C++ op -> (args, the reference's output for them), odd sizes and both layouts."""
    clip = torch.randint(0, 256, (2, 4, 14, 21, 3), dtype=torch.uint8, generator=rng)
    nxt = torch.randint(0, 256, clip.shape, dtype=torch.uint8, generator=rng)
    bcthw = torch.randn(1, 3, 4, 21, 14, generator=rng).transpose(-1, -2)
    noise = torch.rand(2, 6, generator=rng)
    ids = ops.tube_mask_gather_reference(clip, noise, 0.5, 2, 7, MEAN, STD).ids_masked
    return {
        "tube_mask_gather": ((clip, noise, 0.5, 2, 7, list(MEAN), list(STD), torch.bfloat16, "BTHWC"),
                             ops.tube_mask_gather_reference(clip, noise, 0.5, 2, 7, MEAN, STD, torch.bfloat16)),
        "tube_mask_gather[BCTHW]": ((bcthw, noise[:1], 0.5, 2, 7, [], [], torch.float32, "BCTHW"),
                                    ops.tube_mask_gather_reference(bcthw, noise[:1], 0.5, 2, 7, layout="BCTHW")),
        "pixel_target": ((clip, ids, 2, 7, True, None, None, "BTHWC"), ops.pixel_target_reference(clip, ids, 2, 7)),
        "rgb_diff_target": ((clip, ids, 2, 7, False, None, None, None, "BTHWC"),
                            ops.rgb_diff_target_reference(clip, ids, 2, 7)),
        "rgb_diff_target[dense]": ((clip, ids, 2, 7, True, nxt, None, None, "BTHWC"),
                                   ops.rgb_diff_target_reference(clip, ids, 2, 7, True, nxt)),
        "rgb_diff_target[BCTHW]": ((bcthw, ids[:1], 2, 7, False, None, list(MEAN), list(STD), "BCTHW"),
                                   ops.rgb_diff_target_reference(bcthw, ids[:1], 2, 7, False, None, MEAN, STD,
                                                                 "BCTHW")),
    }


@pytest.mark.skipif(not _cuda.LOADED, reason="fastmam._C is not built (pip install -e . --no-build-isolation with "
                                               "a CUDA build of torch and nvcc)")
@pytest.mark.parametrize("case", list(_cuda_cases(torch.Generator().manual_seed(0))))
def test_cuda_fakes_match_the_kernels(case, rng):
    """On a GPU: the real kernels' outputs. Without one they cannot run: the reference's shapes and dtypes, and
    contiguous strides (csrc/ops.cpp allocates every output with at::empty of that shape)."""
    args, ref = _cuda_cases(rng)[case]
    op = getattr(torch.ops.fastmam_cuda, case.split("[")[0]).default
    if GPU:
        expected = [_layout(t) for t in pytree.tree_leaves(op(*[a.cuda() if isinstance(a, torch.Tensor) else a
                                                                 for a in args]))]
    else:
        expected = [(tuple(r.shape), torch.empty(r.shape).stride(), r.dtype) for r in pytree.tree_leaves(ref)]
    with FakeTensorMode():
        fake = pytree.tree_leaves(op(*[_strided_like(a, CUDA) if isinstance(a, torch.Tensor) else a for a in args]))
    assert [_layout(f) for f in fake] == expected, case
    assert all(f.device == CUDA for f in fake)


# ------------------------------------------------------------------------------- 5: the step's backward


def test_training_step_backward_shapes_and_dtypes(monkeypatch):
    """Forward and backward of the codes objective (fused CE with its registered backward) on fake tensors with
    the Triton backend: every parameter gets a gradient of its own shape, dtype and device. On fake CUDA tensors
    when a GPU is present; otherwise on fake CPU tensors (autograd's engine asks for a CUDA context), which leaves
    CUDA-only kernels (SDPA's flash backward) out."""
    device = CUDA if GPU else torch.device("cpu")
    if not GPU:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton backend takes CPU tensors only under TRITON_INTERPRET=1")
        # the input checks read values on CPU tensors (fake ones have none): their GPU form, queued on the device
        monkeypatch.setattr(_checks, "check_values", lambda ok, summary, details: torch._assert_async(ok, summary))
    mode = fake_mode()
    cfg, model, _, _ = build(mode, "vit_b_vqgan", ["backend=triton", "targets.codes=cached",
                                                    "targets.code_cache=unused", *VIDEO], device)
    with mode:
        d = cfg.data
        clip = torch.randint(0, 256, (BATCH, d.num_frames, d.img_size, d.img_size, 3), dtype=torch.uint8,
                             device=device)
        codes = torch.randint(0, cfg.targets.num_codes, (BATCH, d.num_frames, 14, 14), dtype=torch.int32,
                              device=device)
        with record_dispatch() as calls:
            out = model(clip, torch.rand(model.noise_shape(BATCH), device=device), None, codes)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.total, params)
    assert [(c.op, c.backend) for c in calls] == [(op, "triton") for op in expected_ops(cfg)]
    for p, g in zip(params, grads, strict=True):
        assert g is not None and (g.shape, g.dtype, g.device) == (p.shape, p.dtype, p.device)



@pytest.mark.parametrize("preset", ["vit_b", "videomaev2_vit_b"])
def test_decoder_masking_step_on_fake_cuda(preset, cuda_autocast):
    """VideoMAE V2's decoder masking in the ViT-B step (MAM2's layout, and the V2 preset): ids_decode is computed on
    the GPU from the step's noise (torch sorts, the reference op: nothing to fuse), with no host tensor, no copy and
    no value read on the host (a fake trace has none to read); the fused targets take the Nd = 704 decoded ids."""
    mode = fake_mode()
    cfg, model, _, _ = build(mode, preset, ["masking.decoder=running_cell"])
    with mode:
        inputs = step_inputs(cfg, model)
    assert inputs.args[1].shape == (BATCH, 196 + 1 + 1568)
    out, calls, audit, _ = traced_step(mode, model, inputs, {})
    assert [(tuple(t.shape), t.dtype, t.device) for t in out] == [((), torch.float32, CUDA)] * 3
    want = expected_ops(cfg)
    want.insert(1, "decoder_masking")
    assert [(c.op, c.backend, c.device) for c in calls] == \
        [(op, "reference" if op == "decoder_masking" else readme_backend(op), CUDA) for op in want]
    assert audit.mixed == [] and audit.cpu == [] and audit.real == [] and audit.h2d == []
    targets = [o for o in audit.custom if o.name == "fastmam::masked_target"]
    assert targets and all(o.inputs[-1][0] == (BATCH, 704) for o in targets), targets
