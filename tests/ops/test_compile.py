"""torch.compile(fullgraph=True) keeps the ops: the Triton ones are torch.library custom ops with fake
implementations, so tracing never breaks at a kernel launch. On CPU the 'aot_eager' backend checks
tracing, fake tensors and autograd without building C++ kernels; on a GPU, inductor."""

import importlib.util

import pytest
import torch

from fastmam import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILER = "inductor" if DEVICE == "cuda" else "aot_eager"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKENDS = ["reference"] + (["triton"] if importlib.util.find_spec("triton") else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_patches_and_targets(backend, rng):
    clip = torch.randint(0, 256, (2, 4, 16, 24, 3), dtype=torch.uint8, generator=rng).to(DEVICE)
    noise = torch.rand(2, 6, generator=rng).to(DEVICE)

    def step(clip, noise):
        vis = ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, STD, torch.float16, backend=backend)
        pix = ops.pixel_target(clip, vis.ids_masked, 2, 8, True, backend=backend)
        mot = ops.rgb_diff_target(clip, vis.ids_masked, 2, 8, False, backend=backend)
        return vis.patches, vis.ids_keep, pix, mot

    eager = step(clip, noise)
    compiled = torch.compile(step, fullgraph=True, backend=COMPILER)(clip, noise)
    assert torch.equal(eager[1], compiled[1])
    for e, c in zip(eager, compiled, strict=True):
        assert e.dtype == c.dtype and e.shape == c.shape
        assert torch.allclose(e.float(), c.float(), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_dual_decoder_loss_with_backward(backend, rng):
    h = torch.randn(10, 16, generator=rng).to(DEVICE).requires_grad_()
    w = torch.randn(33, 16, generator=rng).to(DEVICE).requires_grad_()
    b = torch.randn(33, generator=rng).to(DEVICE).requires_grad_()
    codes = torch.randint(0, 33, (10,), generator=rng).to(DEVICE)
    mp = torch.randn(10, 6, generator=rng).to(DEVICE).requires_grad_()
    mt = torch.randn(10, 6, generator=rng).to(DEVICE)

    def loss(h, w, b, mp):
        return ops.dual_decoder_loss(h, w, b, codes, mp, mt, backend=backend).total

    eager = loss(h, w, b, mp)
    grads = torch.autograd.grad(eager, (h, w, b, mp))
    compiled = torch.compile(loss, fullgraph=True, backend=COMPILER)(h, w, b, mp)
    cgrads = torch.autograd.grad(compiled, (h, w, b, mp))
    assert torch.allclose(eager, compiled, rtol=1e-5)
    for g, c in zip(grads, cgrads, strict=True):
        assert torch.allclose(g, c, atol=1e-6)


def _custom_op_cases(rng):
    clip = torch.randint(0, 256, (2, 4, 16, 24, 3), dtype=torch.uint8, generator=rng).to(DEVICE)
    ids = torch.tensor([[0, 5, 11], [3, 4, 7]], device=DEVICE)
    h = torch.randn(7, 8, generator=rng).to(DEVICE).requires_grad_()
    w = torch.randn(11, 8, generator=rng).to(DEVICE).requires_grad_()
    b = torch.randn(11, generator=rng).to(DEVICE).requires_grad_()
    codes = torch.randint(0, 11, (7,), generator=rng).to(DEVICE)
    return {
        "gather_normalize": (clip, ids, 2, 8, list(MEAN), list(STD), torch.float16, "BTHWC"),
        "masked_target": (clip, None, ids, 2, 8, True, None, None, "BTHWC", 1),
        "masked_target_dense": (clip, clip.flip(1).contiguous(), ids, 2, 8, False, None, None, "BTHWC", 2),
        "copy_rows": (torch.randn(2, 12, 5, generator=rng).to(DEVICE).requires_grad_(), ids, 3, False),
        "copy_rows_scatter": (torch.randn(2, 3, 5, generator=rng).to(DEVICE).requires_grad_(), ids, 12, True),
        "fused_linear_ce": (h, w, b, codes, torch.full((7,), 1 / 7, device=DEVICE), 4, 8),
    }


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed: the custom ops wrap its kernels")
@pytest.mark.parametrize("case", ["gather_normalize", "masked_target", "masked_target_dense", "copy_rows",
                                  "copy_rows_scatter", "fused_linear_ce"])
def test_custom_ops_pass_opcheck(case, rng):
    """PyTorch's own check of a custom op: schema (no undeclared mutation), fake implementation against the real
    one, autograd registration, and AOT dispatch with dynamic shapes."""
    from fastmam.ops import _triton  # noqa: F401  (registers torch.ops.fastmam.*)

    op = getattr(torch.ops.fastmam, case.removesuffix("_dense").removesuffix("_scatter")).default
    torch.library.opcheck(op, _custom_op_cases(rng)[case])
