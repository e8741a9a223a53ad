"""``ops.trajectory_target`` and ``ops.trajectory_loss``: a hand-computed token, zero motion, invalid points, the
per-token z-score's removal of a common translation, Triton against the reference.

Triton (the interpreter on CPU) against the reference by the rule of tests/ops/numerics.py: ``exact`` is the
reference's formula in float64 (``motion_targets._trajectory_reference(..., torch.float64)``) from the same
(already rounded) displacements; weights, 0 or 1, must be equal.
"""

import importlib.util
import math

import pytest
import torch

from fastmam import ops
from fastmam.ops import motion_targets
from tests.conftest import runnable_backends
from tests.ops.numerics import assert_close_to_exact, assert_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = runnable_backends("trajectory_target")
NAN = float("nan")


def _hand_token():
    """One 16-px token (2 x 2 grid points), L=2. Point (1, 0) left the frame: its values (NaN) are never read."""
    disp = torch.tensor([[[1.0, 2.0], [3.0, -4.0]],  # point (0, 0): step 0 (dx, dy), step 1
                         [[0.5, 0.0], [0.0, 0.0]],  # point (0, 1)
                         [[NAN, NAN], [NAN, NAN]],  # point (1, 0): invalid
                         [[-8.0, 40.0], [2.0, 2.0]]])  # point (1, 1)
    valid = torch.tensor([True, True, False, True])
    return disp.view(1, 1, 2, 2, 2, 2).to(DEVICE), valid.view(1, 1, 2, 2).to(DEVICE)


def _zscore(values):
    """VideoMAE's (v - mean) / (std_unbiased + 1e-6) of a list, in Python floats."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + 1e-6) for v in values]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    disp, valid = _hand_token()
    ids = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    target, weight = ops.trajectory_target(disp, valid, ids, 2, 16, "global", bound=4.0, backend=backend)
    # layout (point row, point col, step, xy); / 4 and clipped to [-1, 1]: -8 / 4 -> -1, 40 / 4 -> 1
    expected = [0.25, 0.5, 0.75, -1.0,  0.125, 0.0, 0.0, 0.0,  0.0, 0.0, 0.0, 0.0,  -1.0, 1.0, 0.5, 0.5]
    assert target.shape == weight.shape == (1, 1, 16) and target.dtype == weight.dtype == torch.float32
    torch.testing.assert_close(target.cpu().view(-1), torch.tensor(expected), rtol=0, atol=0)
    assert weight.cpu().view(-1).tolist() == [1.0] * 8 + [0.0] * 4 + [1.0] * 4

    # patch_std: per component over the 3 valid points x 2 steps
    target, weight2 = ops.trajectory_target(disp, valid, ids, 2, 16, "patch_std", backend=backend)
    dx = _zscore([1.0, 3.0, 0.5, 0.0, -8.0, 2.0])
    dy = _zscore([2.0, -4.0, 0.0, 0.0, 40.0, 2.0])
    expected = torch.zeros(4, 2, 2, dtype=torch.float64)
    for j, point in enumerate((0, 1, 3)):
        expected[point, :, 0] = torch.tensor(dx[2 * j:2 * j + 2], dtype=torch.float64)
        expected[point, :, 1] = torch.tensor(dy[2 * j:2 * j + 2], dtype=torch.float64)
    torch.testing.assert_close(target.cpu().view(-1).double(), expected.view(-1), rtol=1e-6, atol=1e-6)
    assert torch.equal(weight2, weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_motion_and_common_translation(backend, rng):
    """No motion -> 0 in both normalizations. patch_std: a translation of the whole token gives exactly 0, and
    adding one to every point leaves the target unchanged (dyadic values: every sum is exact, so bit-identical)."""
    b, slices, gh, gw, steps = 2, 2, 4, 6, 4
    valid = (torch.rand(b, slices, gh, gw, generator=rng) > 0.3).to(DEVICE)
    ids = torch.tensor([[0, 2, 5, 7, 11], [1, 3, 4, 8, 10]], device=DEVICE)
    zero = torch.zeros(b, slices, gh, gw, steps, 2, device=DEVICE)
    for normalize in ("global", "patch_std"):
        target, weight = ops.trajectory_target(zero, valid, ids, 2, 16, normalize, backend=backend)
        assert torch.equal(target, torch.zeros_like(target)) and weight.sum() > 0
    shift = torch.tensor([2.5, -3.25], device=DEVICE)
    pan = torch.zeros_like(zero) + shift
    target, weight = ops.trajectory_target(pan, valid, ids, 2, 16, "patch_std", backend=backend)
    assert torch.equal(target, torch.zeros_like(target))
    motion = (torch.randint(-64, 65, zero.shape, generator=rng) / 8).to(DEVICE)
    base, _ = ops.trajectory_target(motion, valid, ids, 2, 16, "patch_std", backend=backend)
    moved, _ = ops.trajectory_target(motion + shift, valid, ids, 2, 16, "patch_std", backend=backend)
    assert base.abs().max() > 0.5 and torch.equal(moved, base)
    # 'global' keeps the translation: the target moves by shift / bound
    g0, _ = ops.trajectory_target(motion, valid, ids, 2, 16, "global", bound=64.0, backend=backend)
    g1, _ = ops.trajectory_target(motion + shift, valid, ids, 2, 16, "global", bound=64.0, backend=backend)
    delta = (g1 - g0).view(b, ids.shape[1], 4, steps, 2)
    w = weight.view_as(delta)
    torch.testing.assert_close(delta, w * (shift / 64.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_or_no_valid_point(backend):
    """patch_std with one valid value per component (one point, L=1): the std is taken as 0, the target is 0;
    a token without valid points: target and weight 0. Never NaN."""
    disp = torch.tensor([3.0, -2.0, NAN, NAN, 7.0, 1.0, NAN, NAN]).view(1, 1, 2, 2, 1, 2).to(DEVICE)
    valid = torch.tensor([True, False, False, False]).view(1, 1, 2, 2).to(DEVICE)
    ids = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    target, weight = ops.trajectory_target(disp, valid, ids, 2, 16, "patch_std", backend=backend)
    assert torch.equal(target, torch.zeros_like(target)) and weight.view(-1).tolist() == [1.0] * 2 + [0.0] * 6
    target, weight = ops.trajectory_target(disp, torch.zeros_like(valid), ids, 2, 16, "patch_std", backend=backend)
    assert torch.equal(target, torch.zeros_like(target)) and torch.equal(weight, torch.zeros_like(weight))


def test_loss_averages_over_valid_entries_only():
    disp, valid = _hand_token()
    ids = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    target, weight = ops.trajectory_target(disp, valid, ids, 2, 16, "global", bound=4.0)
    # prediction off by 1 on the 12 valid entries and by 1e30 (or inf) on the 4 invalid ones: loss exactly 1
    pred = torch.where(weight > 0, target + 1, torch.full_like(target, math.inf)).requires_grad_()
    loss = ops.trajectory_loss(pred, target, weight)
    assert loss.dtype == torch.float32 and loss.item() == 1.0
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.equal(grad, weight * 2 / 12)  # d/dpred of sum(w (pred - t)^2) / 12
    # bf16 prediction: fp32 loss
    assert ops.trajectory_loss(pred.detach().bfloat16(), target, weight).dtype == torch.float32
    # no valid entry: 0, zero gradient, no NaN
    pred = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    loss = ops.trajectory_loss(pred, torch.zeros(2, 3, 8, device=DEVICE), torch.zeros(2, 3, 8, device=DEVICE))
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    with pytest.raises(ValueError, match="one shape"):
        ops.trajectory_loss(pred, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


# (B, T/t, H/8, W/8, L), patch, disp dtype, normalize: B=1 with one token, several B and slices, non-square grids,
# L = 1, 3, 4, patch 8 (one point per token), 16 and 24 (9 points: a padded block), fp32 / fp16 / bf16 inputs
TRITON_CASES = [
    ((1, 1, 2, 2, 4), 16, torch.float32, "patch_std"),
    ((3, 2, 4, 6, 3), 16, torch.float16, "global"),
    ((3, 2, 4, 6, 3), 16, torch.float32, "patch_std"),
    ((2, 3, 3, 5, 1), 8, torch.float32, "patch_std"),
    ((2, 1, 6, 9, 4), 24, torch.bfloat16, "patch_std"),
    ((2, 1, 6, 9, 4), 24, torch.float32, "global"),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("grid,p,dtype,normalize", TRITON_CASES)
def test_triton_equals_reference(grid, p, dtype, normalize, rng):
    """Random ascending id subsets, ~30% invalid points (NaN there), one token with none valid, displacements up to
    +-24 px (beyond the bound of 'global'), a non-contiguous disp (a permuted view)."""
    b, slices, gh, gw, steps = grid
    q = p // 8
    n = slices * (gh // q) * (gw // q)
    k = min(n, 4)
    ids = torch.stack([torch.randperm(n, generator=rng)[:k].sort().values for _ in range(b)])
    valid = torch.rand(b, slices, gh, gw, generator=rng) > 0.3
    i, s = divmod(ids[-1, -1].item(), (gh // q) * (gw // q))  # the last one keeps at least one valid point
    valid[-1, i, (s // (gw // q)) * q, (s % (gw // q)) * q] = True
    emptied = b * k > 1  # the first selected token of sample 0 gets no valid point (unless it is the only one)
    if emptied:
        i, s = divmod(ids[0, 0].item(), (gh // q) * (gw // q))
        r, c = divmod(s, gw // q)
        valid[0, i, r * q:(r + 1) * q, c * q:(c + 1) * q] = False
    disp = torch.randn(2, steps, b, slices, gh, gw, generator=rng) * 8  # (xy, L, B, ...) then permuted
    disp = disp.clamp(-24, 24).permute(2, 3, 4, 5, 1, 0)
    disp = torch.where(valid[..., None, None], disp, NAN).to(dtype)
    assert not disp.is_contiguous()
    disp, valid, ids = disp.to(DEVICE), valid.to(DEVICE), ids.to(DEVICE)
    ref = ops.trajectory_target(disp, valid, ids, 2, p, normalize, backend="reference")
    tri = ops.trajectory_target(disp, valid, ids, 2, p, normalize, backend="triton")
    args = motion_targets.check_trajectory_inputs(disp, valid, ids, 2, p, normalize, 16.0, 1e-6)
    exact, exact_w = motion_targets._trajectory_reference(disp.cpu(), valid.cpu(), args._replace(ids=ids.cpu()),
                                                          torch.float64)
    assert ref[0].shape == (b, k, q * q * steps * 2)
    assert_close_to_exact(tri[0], ref[0], exact, reduction=q * q * steps, name="trajectory_target")
    assert_equal(tri[1], ref[1], name="weight")
    assert torch.equal(ref[1].cpu().double(), exact_w) and not tri[0].isnan().any()
    assert tri[1].sum() > 0 and (tri[1][0, 0].sum() == 0) == emptied


def test_errors():
    disp = torch.zeros(1, 2, 4, 4, 4, 2)
    valid = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="disp must be a floating-point"):
        ops.trajectory_target(disp.long(), valid, ids, 2, 16)
    with pytest.raises(ValueError, match=r"disp must be \(B, T/t, H/8, W/8, L, 2\)"):
        ops.trajectory_target(disp[..., :1], valid, ids, 2, 16)
    with pytest.raises(TypeError, match="valid must be a bool"):
        ops.trajectory_target(disp, valid.float(), ids, 2, 16)
    with pytest.raises(ValueError, match="valid must have disp's first four dims"):
        ops.trajectory_target(disp, valid[:, :1], ids, 2, 16)
    with pytest.raises(ValueError, match="multiple of the trajectory grid"):
        ops.trajectory_target(disp, valid, ids, 2, 12)
    with pytest.raises(ValueError, match="does not tile into 24-px patches"):
        ops.trajectory_target(disp, valid, ids, 2, 24)
    with pytest.raises(ValueError, match="normalize='zscore'"):
        ops.trajectory_target(disp, valid, ids, 2, 16, "zscore")
    with pytest.raises(ValueError, match="bound=0"):
        ops.trajectory_target(disp, valid, ids, 2, 16, bound=0)
    with pytest.raises(ValueError, match="token ids out of range"):
        ops.trajectory_target(disp, valid, torch.tensor([[0, 8]]), 2, 16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_custom_op_passes_opcheck_and_compiles(rng):
    """PyTorch's check of the custom op (schema, fake implementation against the real one, dynamic shapes), and
    torch.compile(fullgraph=True) of target + loss keeping it as one node."""
    from fastmam.ops import _triton  # noqa: F401  (registers torch.ops.fastmam.*)

    disp = torch.randn(2, 2, 2, 4, 3, 2, generator=rng).to(DEVICE)
    valid = (torch.rand(2, 2, 2, 4, generator=rng) > 0.3).to(DEVICE)
    ids = torch.tensor([[0, 3], [1, 2]], device=DEVICE)
    torch.library.opcheck(torch.ops.fastmam.trajectory_target.default, (disp, valid, ids, 2, True, 16.0, 1e-6))
    pred = torch.randn(2, 2, 24, generator=rng).to(DEVICE)
    torch._dynamo.reset()
    try:
        def loss(disp, valid, ids, pred):
            target, weight = ops.trajectory_target(disp, valid, ids, 2, 16, "patch_std", backend="triton")
            return ops.trajectory_loss(pred, target, weight)

        compiled = torch.compile(loss, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        torch.testing.assert_close(compiled(disp, valid, ids, pred), loss(disp, valid, ids, pred), rtol=1e-6,
                                   atol=1e-6)
    finally:
        torch._dynamo.reset()
