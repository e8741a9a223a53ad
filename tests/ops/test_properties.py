"""Property-based tests (hypothesis): every fused backend of every public op against its reference, over random
shapes, mask ratios, dtypes and strides; the masking ops against their definitions.

Floats are checked with the rule of ``tests/ops/numerics.py`` against a float64 evaluation of each formula written
here (independent of the library's patchify and gather); ids, masks and copies must be equal. Drawn: batch 1-3,
tubelet 1-3, time slices 1-3, patch 1-8 (3, 5, 7 among them), patch grid up to 5 x 5, channels 1-4 (3 mostly),
ratios that hide at least one position and keep one, any memory layout of the inputs (a permuted, strided, offset
view of a bigger tensor whose other elements hold other values), random data; and, in their own test, clips with
flat and near-flat patches (the ill-conditioned case of per-patch normalization).

Examples per test: ``EXAMPLES`` below, the same every run (derandomized, no example database), so CI is not
flaky; about 40 s of CPU for the file under the Triton interpreter. ``FASTMAM_HYPOTHESIS_EXAMPLES=N`` runs N per
test instead; ``FASTMAM_TEST_SEED=S`` (as for the other tests) draws another set of examples. Kernel grids are kept
to at most ``MAX_PROGRAMS`` programs: the interpreter costs milliseconds per program. A failing test shrinks its
example for up to Hypothesis's 5 minutes before it reports the smallest one it found.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import zlib
from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from fastmam import ops
from tests.conftest import runnable_backends
from tests.ops.numerics import assert_close_to_exact, assert_equal, interpreter_rounding_floor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6  # VideoMAE's epsilon of the per-patch normalization
MAX_PROGRAMS = 32  # B x selected tokens per kernel launch

EXAMPLES = {
    "tube_mask_gather": 30,
    "pixel_target": 20,
    "rgb_diff_target": 20,
    "flat_patches": 20,
    "gather_scatter": 20,
    "dual_decoder_loss": 20,
    "masking": 100,
    "perturbation": 3,
}

settings.register_profile(
    "fastmam-properties",
    deadline=None,  # the Triton interpreter's time per example varies with the grid
    derandomize=True,  # CI sees the same examples every run
    database=None,  # and writes no example database
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
_SALT = os.environ.get("FASTMAM_TEST_SEED", "")


def _examples(default: int) -> int:
    override = os.environ.get("FASTMAM_HYPOTHESIS_EXAMPLES", "")
    if not override:
        return default
    if not override.isdigit() or int(override) < 1:
        raise ValueError(f"FASTMAM_HYPOTHESIS_EXAMPLES must be a positive integer, got {override!r}")
    return int(override)


def property_test(kind: str):
    """Settings of one property test: ``EXAMPLES[kind]`` examples, derandomized unless FASTMAM_TEST_SEED is set."""

    def wrap(fn):
        fn = settings(settings.get_profile("fastmam-properties"), max_examples=_examples(EXAMPLES[kind]),
                      derandomize=not _SALT)(fn)
        return seed(zlib.crc32(_SALT.encode()))(fn) if _SALT else fn

    return wrap


def _fused(*names: str) -> list[str]:
    """The backends other than the reference that implement every op in ``names``."""
    return [b for b in runnable_backends(names[0])
            if b != "reference" and all(b in runnable_backends(n) for n in names)]


def _same(name: str, x: torch.Tensor) -> torch.Tensor:
    return x


Perturb = Callable[[str, torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------- strategies

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOATS = st.sampled_from(["fp32", "fp16", "bf16"])
CHANNELS = st.sampled_from([3, 3, 3, 1, 2, 4])
PATCHES = st.sampled_from([3, 2, 5, 7, 1, 4, 8])
RANDOM = st.just("random")  # see _clip_values
FLAT = st.sampled_from(["flat", "few"])
BOOLEANS = st.booleans()


class View(NamedTuple):
    """How an input is laid out in memory: its dims stored in ``order``; dim ``step`` (if any) every other
    element of a bigger tensor, from ``start``. The elements in between hold other values."""

    order: tuple[int, ...]
    step: int | None
    start: int


def views(ndim: int) -> st.SearchStrategy[View]:
    return st.builds(View, st.permutations(range(ndim)).map(tuple), st.none() | st.integers(0, ndim - 1),
                     st.integers(0, 1))


def laid_out(x: torch.Tensor, view: View, gen: torch.Generator) -> torch.Tensor:
    """``x``'s values in a tensor laid out as ``view`` says (non-contiguous unless the view is the plain one)."""
    shape = list(x.shape)
    if view.step is not None:
        shape[view.step] = 2 * shape[view.step] + 1
    stored = [shape[d] for d in view.order]
    if x.dtype == torch.uint8:
        storage = torch.randint(0, 256, stored, generator=gen, dtype=torch.uint8)
    elif x.is_floating_point():
        storage = torch.randn(stored, generator=gen).to(x.dtype)
    else:
        storage = torch.randint(0, 2**30, stored, generator=gen).to(x.dtype)
    out = storage.to(x.device).permute(*[view.order.index(d) for d in range(x.dim())])
    if view.step is not None:
        index = [slice(None)] * x.dim()
        index[view.step] = slice(view.start, view.start + 2 * x.shape[view.step], 2)
        out = out[tuple(index)]
    out.copy_(x)
    return out


class Geometry(NamedTuple):
    b: int
    tubelet: int
    slices: int
    patch: int
    hp: int
    wp: int
    c: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:  # (B, T, H, W, C)
        return self.b, self.tubelet * self.slices, self.hp * self.patch, self.wp * self.patch, self.c

    @property
    def spatial(self) -> int:
        return self.hp * self.wp

    @property
    def tokens(self) -> int:
        return self.slices * self.hp * self.wp


def geometries(min_tubelet: int = 1) -> st.SearchStrategy[Geometry]:
    return st.builds(Geometry, st.integers(1, 3), st.integers(min_tubelet, 3), st.integers(1, 3), PATCHES,
                     st.integers(1, 5), st.integers(1, 5), CHANNELS)


def stats(c: int) -> st.SearchStrategy[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-channel mean and std (std > 0), in [0, 1] units."""
    mean = st.lists(st.floats(0.0, 1.0, width=32), min_size=c, max_size=c).map(tuple)
    std = st.lists(st.floats(0.0625, 1.0, width=32), min_size=c, max_size=c).map(tuple)
    return st.tuples(mean, std)


def ratios() -> st.SearchStrategy[float]:
    return st.floats(0.01, 0.99) | st.sampled_from([0.5, 0.75, 0.9, 0.95])


def _clip_values(g: Geometry, dtype: torch.dtype, style: str, gen: torch.Generator) -> torch.Tensor:
    """(B, T, H, W, C) values: uint8, or float as a normalized clip holds them.

    style 'random': independent values; 'few': two neighbouring values (uint8 v, v+1; float v, v + 1e-3), so many
    patches are near flat; 'flat': each token, per channel, constant (1 in 3), near flat (constant but for steps
    of one level, 1 in 3) or random."""
    shape = g.shape
    if dtype == torch.uint8:
        def levels(size):
            return torch.randint(0, 256, size, generator=gen).double()
        step = 1.0
    else:
        def levels(size):
            return torch.randn(size, generator=gen, dtype=torch.float64)
        step = 1e-3
    noise = levels(shape)
    if style == "few":
        base = levels((g.b, 1, 1, 1, g.c)).clamp(max=254)
        values = base + step * torch.randint(0, 2, shape, generator=gen)
    elif style == "flat":
        kind = per_pixel(g, torch.randint(0, 3, (g.b, g.slices, g.hp, g.wp, g.c), generator=gen))
        const = per_pixel(g, levels((g.b, g.slices, g.hp, g.wp, g.c)).clamp(max=254))
        near = const + step * torch.randint(0, 2, shape, generator=gen)
        values = torch.where(kind == 0, const, torch.where(kind == 1, near, noise))
    else:
        values = noise
    return values.to(dtype)


def per_pixel(g: Geometry, tokens: torch.Tensor) -> torch.Tensor:
    """(B, slices, H/p, W/p, ...) per token -> (B, T, H, W, ...) per pixel."""
    return tokens.repeat_interleave(g.tubelet, 1).repeat_interleave(g.patch, 2).repeat_interleave(g.patch, 3)


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "BTHWC" else x.permute(0, 4, 1, 2, 3)


class ClipCase(NamedTuple):
    geometry: Geometry
    layout: str  # 'BTHWC' (uint8) or 'BCTHW' (float)
    dtype: str
    style: str
    view: View
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int


@st.composite
def clip_cases(draw, min_tubelet: int = 1, styles=RANDOM) -> ClipCase:
    g = draw(geometries(min_tubelet))
    layout = draw(st.sampled_from(["BTHWC", "BCTHW"]))
    dtype = "uint8" if layout == "BTHWC" else draw(FLOATS)
    mean, std = draw(stats(g.c))
    return ClipCase(g, layout, dtype, draw(styles), draw(views(5)), mean, std, draw(st.integers(0, 2**32 - 1)))


def make_clip(case: ClipCase, gen: torch.Generator, view: View | None = None) -> torch.Tensor:
    dtype = torch.uint8 if case.dtype == "uint8" else DTYPES[case.dtype]
    x = _to_layout(_clip_values(case.geometry, dtype, case.style, gen).to(DEVICE), case.layout)
    return laid_out(x, view or case.view, gen)


def _ids(gen: torch.Generator, b: int, n: int, k: int, ascending: bool) -> torch.Tensor:
    """(b, k) distinct token ids per sample, ascending or in random order."""
    ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)])
    return (ids.sort(dim=1).values if ascending else ids).to(DEVICE)


# --------------------------------------------------------------------------- float64 formulas


def patches64(clip: torch.Tensor, layout: str, tubelet: int, patch: int) -> torch.Tensor:
    """The stored values of every token in float64: (B, N, t, p*p, C), tokens in (time, row, column) order."""
    x = (clip if layout == "BTHWC" else clip.permute(0, 2, 3, 4, 1)).detach().double().cpu()
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, tubelet, patch * patch, c)


def take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return tokens[torch.arange(tokens.shape[0])[:, None], ids.cpu()]


def pixels64(tokens: torch.Tensor, layout: str, mean, std) -> torch.Tensor:
    """Stored values -> pixels in [0, 1] units: uint8 / 255, or normalized float * std + mean."""
    if layout == "BTHWC":
        return tokens / 255
    return tokens * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def normalize64(v: torch.Tensor) -> torch.Tensor:
    """Per patch and channel over its R values (dim -2): (v - mean) / (std_unbiased + 1e-6), computed from the
    values shifted by the patch's first one, so that a constant patch gives exactly 0."""
    d = v - v[..., :1, :]
    centered = d - d.mean(dim=-2, keepdim=True)
    var = centered.square().sum(dim=-2, keepdim=True) / (v.shape[-2] - 1)
    return centered / (var.sqrt() + EPS)


# --------------------------------------------------------------------------- tube_mask_gather


class GatherCase(NamedTuple):
    clip: ClipCase
    masking: str
    ratio: float
    out_dtype: str


@st.composite
def gather_cases(draw, out_dtypes=FLOATS) -> GatherCase:
    clip = draw(clip_cases())
    masking = draw(st.sampled_from(["tube", "random"]))
    ratio = draw(ratios())
    g = clip.geometry
    positions = g.spatial if masking == "tube" else g.tokens
    hidden = int(ratio * positions)
    assume(0 < hidden < positions)
    assume(g.b * (g.tokens - hidden * (g.slices if masking == "tube" else 1)) <= MAX_PROGRAMS)
    return GatherCase(clip, masking, ratio, draw(out_dtypes))


def check_tube_mask_gather(backend: str, case: GatherCase, perturb: Perturb = _same) -> None:
    c = case.clip
    g = c.geometry
    gen = torch.Generator().manual_seed(c.seed)
    clip = make_clip(c, gen)
    noise = torch.rand(g.b, g.spatial if case.masking == "tube" else g.tokens, generator=gen).to(DEVICE)
    out_dtype = DTYPES[case.out_dtype]
    args = (clip, noise, case.ratio, g.tubelet, g.patch, c.mean, c.std, out_dtype, c.layout, case.masking)
    ref = ops.tube_mask_gather(*args, backend="reference")
    got = ops.tube_mask_gather(*args, backend=backend)
    if case.masking == "tube":
        expected = ops.tube_masking(noise, case.ratio, g.slices, backend="reference")
    else:
        expected = ops.random_masking(noise, case.ratio, backend="reference")
    for name in ("ids_keep", "ids_masked", "mask"):
        assert_equal(getattr(ref, name), getattr(expected, name), name=f"reference {name} vs masking op")
        assert_equal(perturb(name, getattr(got, name)), getattr(ref, name), name=name)
    visible = take(patches64(clip, c.layout, g.tubelet, g.patch), ref.ids_keep)
    if c.layout == "BTHWC":
        mean, std = (torch.tensor(s, dtype=torch.float64) for s in (c.mean, c.std))
        visible = (visible / 255 - mean) / std
    exact = visible.reshape(ref.patches.shape)
    assert_close_to_exact(perturb("patches", got.patches), ref.patches, exact, name="patches",
                          floor=interpreter_rounding_floor(out_dtype, exact, DEVICE))


@pytest.mark.parametrize("backend", _fused("tube_mask_gather"))
@property_test("tube_mask_gather")
@given(case=gather_cases())
def test_tube_mask_gather(backend, case):
    check_tube_mask_gather(backend, case)


# --------------------------------------------------------------------------- pixel_target, rgb_diff_target


class TargetCase(NamedTuple):
    clip: ClipCase
    op: str  # 'pixel', 'diff' (frame pairs inside the tubelet) or 'dense' (next_clip - clip)
    normalize: bool
    selected: int  # masked tokens per sample
    ascending: bool
    next_view: View


def _target_rows(g: Geometry, op: str) -> int:
    return (g.tubelet - (op == "diff")) * g.patch * g.patch


@st.composite
def target_cases(draw, ops_=("pixel",), styles=RANDOM, normalize=BOOLEANS) -> TargetCase:
    op = draw(st.sampled_from(ops_))
    clip = draw(clip_cases(min_tubelet=2 if op == "diff" else 1, styles=styles))
    g = clip.geometry
    normalize = draw(normalize)
    assume(not normalize or _target_rows(g, op) >= 2)
    selected = draw(st.integers(1, g.tokens))
    assume(g.b * selected <= MAX_PROGRAMS)
    return TargetCase(clip, op, normalize, selected, draw(st.booleans()), draw(views(5)))


def check_target(backend: str, case: TargetCase, perturb: Perturb = _same) -> None:
    c = case.clip
    g = c.geometry
    gen = torch.Generator().manual_seed(c.seed)
    clip = make_clip(c, gen)
    ids = _ids(gen, g.b, g.tokens, case.selected, case.ascending)
    nxt = None
    if case.op == "dense":
        # the next frames: another clip of the same style, stored with other strides; with flat patches, equal to
        # this clip at about half the tokens (a static token: a zero, flat difference)
        nxt = make_clip(c, gen, case.next_view)
        if c.style == "flat":
            static = per_pixel(g, torch.rand(g.b, g.slices, g.hp, g.wp, 1, generator=gen) < 0.5).to(DEVICE)
            nxt.copy_(torch.where(_to_layout(static, c.layout), clip, nxt))

    def values(x):  # the selected tokens' values in float64: uint8 as integers, float clips un-normalized
        tokens = take(patches64(x, c.layout, g.tubelet, g.patch), ids)
        return tokens if c.layout == "BTHWC" else pixels64(tokens, c.layout, c.mean, c.std)

    v = values(clip)
    rows = {"pixel": lambda: v, "diff": lambda: v[:, :, 1:] - v[:, :, :-1], "dense": lambda: values(nxt) - v}[case.op]()
    if c.layout == "BTHWC":
        rows = rows / 255  # after exact integer arithmetic: one rounding, the same for equal differences
    rows = rows.reshape(*rows.shape[:2], -1, rows.shape[-1])  # (B, M, R, C)

    if case.op == "pixel":
        op, args = ops.pixel_target, (clip, ids, g.tubelet, g.patch, case.normalize)
    else:
        op, args = ops.rgb_diff_target, (clip, ids, g.tubelet, g.patch, case.normalize, nxt)
    stats_ = {} if c.layout == "BTHWC" else {"mean": c.mean, "std": c.std}
    ref = op(*args, layout=c.layout, **stats_, backend="reference")
    got = op(*args, layout=c.layout, **stats_, backend=backend)
    assert got.dtype == torch.float32, f"targets are float32, got {got.dtype}"
    exact = (normalize64(rows) if case.normalize else rows).reshape(ref.shape)
    assert_close_to_exact(perturb(op.__name__, got), ref, exact, reduction=rows.shape[-2] if case.normalize else 1,
                          name=f"{op.__name__}({case.op}, normalize={case.normalize})")


@pytest.mark.parametrize("backend", _fused("pixel_target"))
@property_test("pixel_target")
@given(case=target_cases(("pixel",)))
def test_pixel_target(backend, case):
    check_target(backend, case)


@pytest.mark.parametrize("backend", _fused("rgb_diff_target"))
@property_test("rgb_diff_target")
@given(case=target_cases(("diff", "dense")))
def test_rgb_diff_target(backend, case):
    check_target(backend, case)


@pytest.mark.parametrize("backend", _fused("pixel_target", "rgb_diff_target"))
@property_test("flat_patches")
@given(case=target_cases(("pixel", "diff", "dense"), styles=FLAT, normalize=st.just(True)))
def test_normalized_targets_of_flat_patches(backend, case):
    """Constant and near-constant patches: a constant one normalizes to exactly 0 (computed from the values
    shifted by the patch's first one); a near-constant one is where a one-pass variance loses its digits."""
    check_target(backend, case)


# --------------------------------------------------------------------------- gather_tokens, scatter_tokens


class TokensCase(NamedTuple):
    b: int
    n: int
    k: int
    d: int
    dtype: str
    ascending: bool
    ids_dtype: str
    x_view: View
    grad_view: View
    ids_view: View
    seed: int


@st.composite
def tokens_cases(draw) -> TokensCase:
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, n))
    assume(b * k <= MAX_PROGRAMS)
    d = draw(st.integers(1, 40) | st.sampled_from([1024, 1025, 1100]))
    dtype = draw(st.sampled_from(["fp32", "fp16", "bf16", "fp64"]))
    return TokensCase(b, n, k, d, dtype, draw(st.booleans()), draw(st.sampled_from(["int64", "int32"])),
                      draw(views(3)), draw(views(3)), draw(views(2)), draw(st.integers(0, 2**32 - 1)))


def check_gather_scatter(backend: str, case: TokensCase, perturb: Perturb = _same) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    dtype = {**DTYPES, "fp64": torch.float64}[case.dtype]
    ids = laid_out(_ids(gen, case.b, case.n, case.k, case.ascending).to(getattr(torch, case.ids_dtype)),
                   case.ids_view, gen)

    def tensor(*shape, view):  # random values, never all zero, laid out as ``view``
        return laid_out(torch.randn(shape, generator=gen).to(dtype).to(DEVICE), view, gen).detach()

    # gather: (B, N, D) -> (B, K, D), and its gradient (a scatter into zeros)
    x = tensor(case.b, case.n, case.d, view=case.x_view).requires_grad_()
    ref = ops.gather_tokens(x, ids, backend="reference")
    got = ops.gather_tokens(x, ids, backend=backend)
    assert_equal(perturb("gather_tokens", got), ref, name="gather_tokens")
    expected = torch.stack([x.detach()[i, ids[i].long()] for i in range(case.b)])  # the definition
    assert_equal(ref, expected, name="gather_tokens_reference vs x[b, ids[b]]")
    g = tensor(case.b, case.k, case.d, view=case.grad_view)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    (got_grad,) = torch.autograd.grad(got, x, g)
    assert_equal(perturb("gather_tokens gradient", got_grad), ref_grad, name="gather_tokens gradient")

    # scatter: (B, K, D) -> (B, N, D) with zeros elsewhere, and its gradient (a gather)
    y = tensor(case.b, case.k, case.d, view=case.grad_view).requires_grad_()
    ref = ops.scatter_tokens(y, ids, case.n, backend="reference")
    got = ops.scatter_tokens(y, ids, case.n, backend=backend)
    assert_equal(perturb("scatter_tokens", got), ref, name="scatter_tokens")
    gy = tensor(case.b, case.n, case.d, view=case.x_view)
    (ref_grad,) = torch.autograd.grad(ref, y, gy)
    (got_grad,) = torch.autograd.grad(got, y, gy)
    assert_equal(perturb("scatter_tokens gradient", got_grad), ref_grad, name="scatter_tokens gradient")


@pytest.mark.parametrize("backend", _fused("gather_tokens", "scatter_tokens"))
@property_test("gather_scatter")
@given(case=tokens_cases())
def test_gather_scatter_tokens(backend, case):
    check_gather_scatter(backend, case)


# --------------------------------------------------------------------------- dual_decoder_loss


class LossCase(NamedTuple):
    lead: tuple[int, ...]  # token dims: M = prod(lead)
    da: int
    k: int
    dm: int | None  # motion values per token, None: no motion term
    dtype: str
    target: str  # an integer dtype (codes) or 'pixels'
    bias: bool
    weighted: bool
    weights: tuple[float, float]  # appearance_weight, motion_weight
    logit_scale: float
    chunk_rows: int  # the Triton backend's tokens per chunk and codebook block
    block_k: int
    views: tuple[View, View, View]  # appearance_hidden, head_weight, motion_pred
    seed: int


@st.composite
def loss_cases(draw, dtypes=FLOATS) -> LossCase:
    lead = draw(st.lists(st.integers(1, 13), min_size=1, max_size=2).map(tuple))
    k = draw(st.integers(1, 40) | st.integers(41, 300))
    block_k = draw(st.sampled_from([1024, 16]))
    # the cross-entropy kernel: one program per token, each walking the codebook in blocks of block_k, twice
    assume(math.prod(lead) * math.ceil(k / min(block_k, 2 ** math.ceil(math.log2(k)))) <= MAX_PROGRAMS)
    target = draw(st.sampled_from(["int64", "pixels", "int32", "int16", "uint8"]))
    assume(target != "uint8" or k <= 256)
    dm = draw(st.none() | st.integers(1, 16))
    return LossCase(
        lead, draw(st.integers(1, 24)), k, dm, draw(dtypes), target, draw(st.booleans()), draw(st.booleans()),
        draw(st.sampled_from([(1.0, 1.0), (0.7, 1.3), (2.0, 0.25)])), draw(st.sampled_from([1.0, 0.25, 4.0])),
        draw(st.sampled_from([4096, 3])), block_k,
        (draw(views(len(lead) + 1)), draw(views(2)), draw(views(len(lead) + 1))), draw(st.integers(0, 2**32 - 1)),
    )


def _loss64(h, w, b, target, mp, mt, wa, wm, tw):
    """The loss in float64 from the same (rounded) inputs: (total, appearance, motion), and the gradients of the
    total with respect to h, w, b and mp (None where absent)."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (h, w, b, mp)]
    h64, w64, b64, mp64 = leaves
    pred = h64.reshape(-1, h64.shape[-1]) @ w64.t() + (b64 if b64 is not None else 0)
    m = pred.shape[0]
    if target.is_floating_point():
        per = (pred - target.reshape(pred.shape).double().cpu()).square().mean(-1)
    else:
        per = F.cross_entropy(pred, target.reshape(-1).long().cpu(), reduction="none")
    weights = torch.ones(m, dtype=torch.float64) if tw is None else tw.reshape(-1).double().cpu()
    appearance = (per * weights).sum() / weights.sum()
    motion = torch.zeros((), dtype=torch.float64)
    if mp64 is not None:
        sq = (mp64.reshape(m, -1) - mt.reshape(m, -1).double().cpu()).square().mean(-1)
        motion = (sq * weights).sum() / weights.sum()
    total = wa * appearance + wm * motion
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(total, present))
    return (total, appearance, motion), [next(grads) if t is not None else None for t in leaves]


def check_dual_decoder_loss(backend: str, case: LossCase, perturb: Perturb = _same) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    m = math.prod(case.lead)

    def leaf(shape, view, scale=1.0):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
        return laid_out(x, view, gen).detach().requires_grad_()

    h = leaf((*case.lead, case.da), case.views[0])
    w = leaf((case.k, case.da), case.views[1], case.logit_scale / case.da**0.5)
    b = leaf((case.k,), View((0,), None, 0), case.logit_scale) if case.bias else None
    if case.target == "pixels":
        target = torch.randn((*case.lead, case.k), generator=gen).to(dtype).to(DEVICE)
    else:
        target = torch.randint(0, case.k, case.lead, generator=gen).to(getattr(torch, case.target)).to(DEVICE)
    mp = mt = None
    if case.dm is not None:
        mp = leaf((*case.lead, case.dm), case.views[2])
        mt = torch.randn((*case.lead, case.dm), generator=gen).to(DEVICE)
    tw = (torch.rand(case.lead, generator=gen) * 2 + 0.05).to(DEVICE) if case.weighted else None
    args = (h, w, b, target, mp, mt, *case.weights, tw)

    ref = ops.dual_decoder_loss(*args, backend="reference")
    knobs = dict(CE_CHUNK_ROWS=case.chunk_rows, CE_BLOCK_K=case.block_k) if backend == "triton" else {}
    with mock.patch.multiple("fastmam.ops._triton", **knobs) if knobs else contextlib.nullcontext():
        got = ops.dual_decoder_loss(*args, backend=backend)
    exact, exact_grads = _loss64(*args)
    reduction = max(m, case.k, case.da, case.dm or 1)
    for name, g_, r_, e_ in zip(("total", "appearance", "motion"), got, ref, exact, strict=True):
        assert g_.shape == () and g_.dtype == torch.float32, f"{name}: {g_.dtype} {tuple(g_.shape)}"
        assert_close_to_exact(perturb(name, g_), r_, e_, reduction=reduction, name=name)
    leaves = {"appearance_hidden": h, "head_weight": w, "head_bias": b, "motion_pred": mp}
    names = [n for n, t in leaves.items() if t is not None]
    inputs = [leaves[n] for n in names]
    ref_grads = torch.autograd.grad(ref.total, inputs, allow_unused=True)
    got_grads = torch.autograd.grad(got.total, inputs, allow_unused=True)
    exact_grads = [e for e in exact_grads if e is not None]
    for name, x, g_, r_, e_ in zip(names, inputs, got_grads, ref_grads, exact_grads, strict=True):
        assert g_ is not None and g_.dtype == x.dtype, f"grad {name}: {None if g_ is None else g_.dtype}"
        assert_close_to_exact(perturb(f"grad {name}", g_), r_, e_, reduction=reduction, name=f"grad {name}")


@pytest.mark.parametrize("backend", _fused("dual_decoder_loss"))
@property_test("dual_decoder_loss")
@given(case=loss_cases())
def test_dual_decoder_loss(backend, case):
    check_dual_decoder_loss(backend, case)


# --------------------------------------------------------------------------- masking, against its definition


class MaskingCase(NamedTuple):
    b: int
    positions: int  # S (tube) or N (random)
    slices: int
    ratio: float
    dtype: str
    ties: bool  # noise from 3 values: the stable tie-break decides
    view: View
    seed: int


@st.composite
def masking_cases(draw) -> MaskingCase:
    positions = draw(st.integers(2, 40))
    ratio = draw(ratios())
    assume(0 < int(ratio * positions) < positions)
    return MaskingCase(draw(st.integers(1, 3)), positions, draw(st.integers(1, 4)), ratio,
                       draw(st.sampled_from(["fp32", "fp16", "bf16", "fp64"])), draw(st.booleans()), draw(views(2)),
                       draw(st.integers(0, 2**32 - 1)))


def _noise(case: MaskingCase) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.b, case.positions)
    noise = torch.randint(1, 4, shape, generator=gen) / 4 if case.ties else torch.rand(shape, generator=gen)
    dtype = {**DTYPES, "fp64": torch.float64}[case.dtype]
    return laid_out(noise.to(dtype).to(DEVICE), case.view, gen)


def _hidden_by_definition(noise: torch.Tensor, hidden: int) -> list[set[int]]:
    """Per sample, the ``hidden`` positions of largest noise, ties to the higher index (kept: lower index)."""
    out = []
    for row in noise.float().cpu().tolist():
        ranked = sorted(range(len(row)), key=lambda s: (row[s], s))
        out.append(set(ranked[len(row) - hidden:]))
    return out


def _check_masking(m: ops.Masking, b: int, n: int, hidden: int) -> None:
    assert m.mask.dtype == torch.bool and m.mask.shape == (b, n), f"mask {m.mask.dtype} {tuple(m.mask.shape)}"
    for name, ids, count in (("ids_keep", m.ids_keep, n - hidden), ("ids_masked", m.ids_masked, hidden)):
        assert ids.dtype == torch.int64 and ids.shape == (b, count), f"{name}: {ids.dtype} {tuple(ids.shape)}"
        if count > 1:
            assert bool((ids[:, 1:] > ids[:, :-1]).all()), f"{name} not strictly ascending: {ids.tolist()}"
    union = torch.cat([m.ids_keep, m.ids_masked], dim=1).sort(dim=1).values
    assert_equal(union.cpu(), torch.arange(n).expand(b, n), name="ids_keep + ids_masked (sorted)")
    assert_equal(m.mask.sum(dim=1).cpu(), torch.full((b,), hidden), name="hidden tokens per sample")
    assert bool(m.mask.gather(1, m.ids_masked).all()), "a token in ids_masked is not hidden in mask"
    assert not bool(m.mask.gather(1, m.ids_keep).any()), "a token in ids_keep is hidden in mask"


@pytest.mark.parametrize("backend", runnable_backends("tube_masking"))
@property_test("masking")
@given(case=masking_cases())
def test_tube_masking_definition(backend, case):
    noise = _noise(case)
    per_slice = int(case.ratio * case.positions)
    m = ops.tube_masking(noise, case.ratio, case.slices, backend=backend)
    _check_masking(m, case.b, case.slices * case.positions, case.slices * per_slice)
    grid = m.mask.view(case.b, case.slices, case.positions)
    assert_equal(grid, grid[:, :1].expand_as(grid), name="hidden spatial set of every time slice vs the first")
    for i, positions in enumerate(_hidden_by_definition(noise, per_slice)):
        assert set(grid[i, 0].nonzero().flatten().tolist()) == positions, f"sample {i}: not the largest noise"


@pytest.mark.parametrize("backend", runnable_backends("random_masking"))
@property_test("masking")
@given(case=masking_cases())
def test_random_masking_definition(backend, case):
    noise = _noise(case)
    hidden = int(case.ratio * case.positions)
    m = ops.random_masking(noise, case.ratio, backend=backend)
    _check_masking(m, case.b, case.positions, hidden)
    for i, positions in enumerate(_hidden_by_definition(noise, hidden)):
        assert set(m.mask[i].nonzero().flatten().tolist()) == positions, f"sample {i}: not the largest noise"


# --------------------------------------------------------------------------- the checks can fail


def _nudge(target: str, relative: float) -> Perturb:
    """Move one element of the output named ``target`` by ``relative`` x its largest magnitude (a float), or
    change one integer / one copied element to its neighbour."""

    def perturb(name: str, x: torch.Tensor) -> torch.Tensor:
        if name != target:
            return x
        x = x.detach().clone(memory_format=torch.contiguous_format)
        flat = x.view(-1)
        i = flat.numel() // 2
        if x.dtype == torch.bool:
            flat[i] = ~flat[i]
        elif not x.is_floating_point():
            flat[i] = flat[i] + 1
        elif relative:
            flat[i] = flat[i] + relative * max(x.abs().max().item(), 1e-30)
        else:  # the next representable value
            flat[i] = torch.nextafter(flat[i], torch.tensor(math.inf, dtype=x.dtype, device=x.device))
        return x

    return perturb


_PERTURBATIONS = {
    # ops: (their check, cases, [(the output to nudge (the name its check reports), by what fraction of its largest
    # value; 0: by one integer / one ulp)])
    ("tube_mask_gather",): (check_tube_mask_gather, gather_cases(out_dtypes=st.just("fp32")),
                         [("patches", 1e-5), ("ids_masked", 0.0), ("mask", 0.0)]),
    ("pixel_target",): (check_target, target_cases(("pixel",)), [("pixel_target", 1e-5)]),
    ("rgb_diff_target",): (check_target, target_cases(("diff", "dense")), [("rgb_diff_target", 1e-5)]),
    ("gather_tokens", "scatter_tokens"): (check_gather_scatter, tokens_cases(),
                                          [("gather_tokens gradient", 0.0), ("scatter_tokens", 0.0)]),
    ("dual_decoder_loss",): (check_dual_decoder_loss, loss_cases(dtypes=st.just("fp32")),
                             [("total", 1e-5), ("grad appearance_hidden", 1e-5), ("grad head_weight", 1e-5)]),
}
_PERTURBED = [("+".join(names), names, backend) for names in _PERTURBATIONS for backend in _fused(*names)[:1]]


@pytest.mark.parametrize("op,names,backend", _PERTURBED, ids=[f"{op}-{backend}" for op, _, backend in _PERTURBED])
@property_test("perturbation")
@given(data=st.data())
def test_checks_catch_a_small_perturbation(op, names, backend, data):
    """The checks above, on outputs moved by 1e-5 of their largest value (fp32: ~100 ulps; low-precision outputs
    are not drawn here), or by one integer / one ulp (exact comparisons): each must raise, where the untouched
    outputs pass."""
    check, cases, targets = _PERTURBATIONS[names]
    case = data.draw(cases)
    check(backend, case)
    for target, relative in targets:
        with pytest.raises(AssertionError, match=f"^{re.escape(target)}[:(]"):
            check(backend, case, _nudge(target, relative))
