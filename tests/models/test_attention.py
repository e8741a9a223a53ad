"""Attention backends against the float64 math reference, forward and gradients.

Tolerance (CONVENTIONS): err(backend, ref64) <= 2 * err(reference in the test dtype, ref64) + atol, elementwise.
The reference computes softmax(S) in two passes; fused kernels (PyTorch's SDPA on CPU and GPU, flash-attn,
xformers) instead keep the row log-sum-exp and recompute P = exp(S - lse) in the backward, with a faster exp.
They also round P and dS to the input dtype for their second matmuls. That is a different rounding path: atol
is its extra error, derived and propagated in ``recompute_allowance``, plus the final rounding of each result
to the dtype (half an ulp of that element). ``test_check_can_fail`` shows what the bound still catches. Every
backend the machine can run is compared; flash-attn, xformers and the Hopper kernel choice need a GPU.
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmam.config import build_config
from fastmam.models import AttentionBackendError, Pretrainer, attention_function, attention_reference
from fastmam.models import attention as attn_mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, Nq, Nk, D): ViT-like self-attention, cross-attention (Nq != Nk, the regressor), B=1 with a prime
# length and an odd head dim (flash is not eligible: SDPA must fall back), one query
SHAPES = [(2, 3, 17, 17, 16), (1, 2, 5, 13, 8), (1, 1, 31, 31, 33), (3, 2, 1, 7, 64)]


def _inputs(shape, dtype, device, gen):
    b, h, nq, nk, d = shape
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (q, k, v, g)]


def _run(fn, q, k, v, g, dtype):
    """Output and (dq, dk, dv) of sum(fn(q, k, v) * g), inputs cast to ``dtype``; results in float64."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    return [t.detach().double() for t in (out, *grads)]


# Unit roundoff of fp32: every backend computes the softmax and accumulates in fp32, whatever the input dtype.
U32 = 2.0**-24
# Accuracy of the exponential inside fused kernels: ATen's vectorized CPU kernels may use ``exp_u20`` (documented
# as "ULP=20"); CUDA kernels use exp2 approximations of a few ulps. One ulp is 2u.
EXP_ULPS = 20


def recompute_allowance(q, k, v, g, dtype):
    """Elementwise first-order bound, in float64, on the error a fused kernel adds to the reference's.

    The kernel recomputes P_ij = exp(S_ij - lse_i): a relative error of at most u * (|lse_i| + |S_ij - lse_i|)
    from rounding lse and the difference, plus its exp's own (EXP_ULPS). It then rounds P and dS to the input
    dtype to feed its second matmuls (half an ulp of the dtype, relative). With E_P that error of P, first order:
    out = P v gets E_P |v|; dv = P^T g gets E_P^T |g|; dS = P * (g v^T - delta), delta_i = sum_j P_ij (g v^T)_ij,
    gets E_dS = E_P |g v^T - delta| + P * sum_j E_P |g v^T| + its own rounding; dq = s dS k and dk = s dS^T q get
    s E_dS |k| and s E_dS^T |q|. Returns the bounds for (out, dq, dk, dv).
    """
    u = torch.finfo(dtype).eps / 2
    s = 1.0 / math.sqrt(q.shape[-1])
    scores = (q * s) @ k.transpose(-2, -1)
    lse = scores.logsumexp(-1, keepdim=True)
    p = (scores - lse).exp()
    err_p = p * (U32 * (lse.abs() + (scores - lse).abs() + 2 * EXP_ULPS) + u)
    gv = g @ v.transpose(-2, -1)
    delta = (p * gv).sum(-1, keepdim=True)
    err_ds = err_p * (gv - delta).abs() + p * (err_p * gv.abs()).sum(-1, keepdim=True) + u * (p * (gv - delta)).abs()
    return (err_p @ v.abs(), s * err_ds @ k.abs(), s * err_ds.transpose(-2, -1) @ q.abs(),
            err_p.transpose(-2, -1) @ g.abs())


def check_against_reference(fn, shape, dtype, device, gen):
    q, k, v, g = _inputs(shape, dtype, device, gen)
    ref64 = _run(attention_reference, q, k, v, g, torch.float64)
    ref_low = _run(attention_reference, q, k, v, g, dtype)
    got = _run(fn, q, k, v, g, dtype)
    allowance = recompute_allowance(q, k, v, g, dtype)
    # a kernel rounds each result to the dtype once, at its own element: half an ulp of that element
    u = torch.finfo(dtype).eps / 2
    for name, a, r, r64, extra in zip(("out", "dq", "dk", "dv"), got, ref_low, ref64, allowance, strict=True):
        err, err_ref = (a - r64).abs(), (r - r64).abs()
        bound = 2 * err_ref.max() + extra + u * r64.abs()
        worst = (err / bound).argmax()
        assert (err <= bound).all(), (
            f"{name} {shape} {dtype}: max err {err.max().item():.3g} (mean {err.mean().item():.3g}); "
            f"reference in {dtype}: max err {err_ref.max().item():.3g} (mean {err_ref.mean().item():.3g}); "
            f"worst element: err {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}"
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", attn_mod.available_backends(DEVICE))
def test_backend_matches_float64_reference(backend, dtype, shape, rng):
    fn = attention_function(backend, DEVICE, dtype)
    if backend == "flash_attn" and (dtype == torch.float32 or shape[-1] % 8):
        pytest.skip("flash-attn: fp16/bf16 and head dims that are multiples of 8 only")
    check_against_reference(fn, shape, dtype, DEVICE, rng)


def _tf32(t):
    """Round fp32 to TF32's 10 mantissa bits (nearest, ties away): the error of a kernel that silently uses TF32."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _RoundValue(torch.autograd.Function):
    """Rounds the value to TF32, passes the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return _tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundGrad(torch.autograd.Function):
    """Passes the value through, rounds the gradient to TF32."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _tf32(grad)


def _faulty(fault):
    def attend(q, k, v):
        if fault.startswith("scale off by"):
            return attention_reference(q * (1 + float(fault.split()[-1].rstrip("%")) / 100), k, v)
        if fault == "tf32 inputs":
            return attention_reference(*(_RoundValue.apply(t) for t in (q, k, v)))
        if fault == "tf32 output":
            return _RoundValue.apply(attention_reference(q, k, v))
        x = {"q": q, "k": k, "v": v}
        x[fault[-1]] = _RoundGrad.apply(x[fault[-1]])  # "tf32 dq" -> q's gradient
        return attention_reference(x["q"], x["k"], x["v"])

    return attend


@pytest.mark.parametrize("fault,dtype", [("scale off by 1%", torch.float32), ("tf32 inputs", torch.float32),
                                         ("tf32 output", torch.float32), ("tf32 dq", torch.float32),
                                         ("tf32 dk", torch.float32), ("tf32 dv", torch.float32),
                                         ("scale off by 5%", torch.bfloat16)])
@pytest.mark.parametrize("shape", SHAPES)
def test_check_can_fail(shape, fault, dtype, rng):
    """The check is not vacuous. In fp32 a 1% scale error, or TF32 precision (2^-11) in the inputs, the output or
    any one gradient, breaks it on every shape; in bf16 (itself 2^-8) a 5% scale error does."""
    with pytest.raises(AssertionError, match="max err"):
        check_against_reference(_faulty(fault), shape, dtype, DEVICE, rng)


def test_layers_route_through_the_configured_function(rng):
    """Every self- and cross-attention of the model calls the function chosen at build time."""
    small = ["data.num_frames=4", "data.img_size=32", "model.patch=8", "model.embed_dim=32", "model.num_heads=4",
             "model.depth=2", "model.decoder_dim=16", "model.decoder_heads=2", "masking.ratio=0.75"]
    p = Pretrainer(build_config({}, small))
    calls = []
    for mod in p.modules():
        if hasattr(mod, "attend"):
            mod.attend = lambda q, k, v, _calls=calls: _calls.append(q.shape) or F.scaled_dot_product_attention(q, k, v)
    clip = torch.randint(0, 256, (2, 4, 32, 32, 3), generator=rng, dtype=torch.uint8)
    p(clip, torch.rand(2, 16, generator=rng))
    # encoder 2 blocks + regressor 1 cross block + 2 decoders x 2 blocks
    assert len(calls) == 2 + 2 + 2 * 2, calls


def test_missing_or_unusable_backends_fail_at_build_time_with_the_fix(monkeypatch):
    with pytest.raises(AttentionBackendError, match="runs only on CUDA GPUs.*use model.attention=sdpa"):
        attention_function("flash_attn", "cpu")
    with pytest.raises(AttentionBackendError, match="xformers has no cpu kernels"):
        attention_function("xformers", "cpu")
    with pytest.raises(AttentionBackendError, match="fp16/bf16 only.*deepspeed.precision=bf16"):
        attention_function("flash_attn", "cuda", torch.float32)
    with pytest.raises(AttentionBackendError, match="not a backend; expected one of sdpa, flash_attn, xformers"):
        attention_function("flex", "cuda")
    # on a GPU machine without the package: the install command is named
    real_import = attn_mod.importlib.import_module

    def no_package(name, *args):
        if name.split(".")[0] in ("flash_attn", "xformers"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args)

    monkeypatch.setattr(attn_mod.importlib, "import_module", no_package)
    with pytest.raises(AttentionBackendError, match=r"needs the flash-attn package.*'fastmam\[flash-attn\]'"):
        attention_function("flash_attn", "cuda", torch.bfloat16)
    with pytest.raises(AttentionBackendError, match=r"needs the xformers package.*pip install 'fastmam\[xformers\]'"):
        attention_function("xformers", "cuda", torch.float32)


def test_model_build_checks_the_backend():
    """The check runs when the model is built (before any step), from the config."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the backend may well be usable")
    cfg = build_config({}, ["model.attention=flash_attn", "model.depth=1"])
    with pytest.raises(AttentionBackendError, match="runs only on CUDA GPUs"):
        Pretrainer(cfg)
    with pytest.raises(Exception, match="'model.attention': Input should be 'sdpa', 'flash_attn' or 'xformers'"):
        build_config({}, ["model.attention=flex"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optional_backends_on_gpu(backend, dtype, rng):
    if not importlib.util.find_spec(backend):
        pytest.skip(f"{backend} is not installed: {attn_mod.INSTALL[backend]}")
    fn = attention_function(backend, "cuda", dtype)
    for shape in [(2, 12, 160, 160, 64), (1, 6, 144, 160, 64), (3, 2, 1, 7, 32)]:
        check_against_reference(fn, shape, dtype, "cuda", rng)


def _sdpa_ops(q):
    """Names of the aten SDPA ops that one forward + backward of our ``sdpa`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q = q.detach().requires_grad_()
        attn_mod.sdpa_attention(q, q, q).sum().backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_picks_the_flash_kernel_on_gpu(dtype):
    """bf16/fp16 at ViT-B shapes (12 heads of 64): the flash kernel, also when something else set another
    priority (recent torch prefers cuDNN on sm90 by default); fp32 and odd head dims fall back cleanly."""
    q = torch.randn(4, 12, 160, 64, device="cuda", dtype=dtype)
    assert "aten::_scaled_dot_product_flash_attention" in _sdpa_ops(q)
    others = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    if "set_priority" in attn_mod.inspect.signature(sdpa_kernel).parameters:
        with sdpa_kernel(others, set_priority=True):
            assert "aten::_scaled_dot_product_flash_attention" in _sdpa_ops(q)
    fallback = _sdpa_ops(q.float())
    assert fallback and "aten::_scaled_dot_product_flash_attention" not in fallback
    assert _sdpa_ops(torch.randn(2, 3, 31, 33, device="cuda", dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_matches_reference_on_gpu(dtype, rng):
    fn = attention_function("sdpa", "cuda", dtype)
    for shape in [*SHAPES, (2, 12, 160, 160, 64)]:
        check_against_reference(fn, shape, dtype, "cuda", rng)
