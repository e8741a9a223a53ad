"""Triton gather_tokens / scatter_tokens vs the references: exact copies, exact gradients."""

import importlib.util

import pytest
import torch

from fastmam import ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ids(b, n, k, rng):
    return torch.stack([torch.randperm(n, generator=rng)[:k].sort().values for _ in range(b)]).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,k,d", [(1, 5, 2, 3), (3, 97, 13, 17), (2, 64, 64, 1100)])
def test_gather_scatter_match_reference(b, n, k, d, dtype, rng):
    base = torch.randn(b, d, n, generator=rng).to(dtype).to(DEVICE)
    x = base.transpose(1, 2).requires_grad_()  # (B, N, D), non-contiguous
    ids = _ids(b, n, k, rng)
    ref = ops.gather_tokens(x, ids, backend="reference")
    tri = ops.gather_tokens(x, ids, backend="triton")
    assert torch.equal(ref, tri)  # a copy: bit-exact
    g = torch.randn(b, k, d, generator=rng).to(dtype).to(DEVICE)
    assert torch.equal(torch.autograd.grad(ref, x, g)[0], torch.autograd.grad(tri, x, g)[0])

    y = torch.randn(b, k, d, generator=rng).to(dtype).to(DEVICE).requires_grad_()
    ref_s = ops.scatter_tokens(y, ids, n, backend="reference")
    tri_s = ops.scatter_tokens(y, ids, n, backend="triton")
    assert torch.equal(ref_s, tri_s)
    gs = torch.randn(b, n, d, generator=rng).to(dtype).to(DEVICE)
    assert torch.equal(torch.autograd.grad(ref_s, y, gs)[0], torch.autograd.grad(tri_s, y, gs)[0])


def test_compiled_gather_scatter(rng):
    torch._dynamo.reset()
    x = torch.randn(2, 10, 4, generator=rng).to(DEVICE).requires_grad_()
    ids = _ids(2, 10, 3, rng)

    def f(x):
        return ops.scatter_tokens(ops.gather_tokens(x, ids, backend="triton") * 2, ids, 10, backend="triton").sum()

    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"
    out = torch.compile(f, fullgraph=True, backend=compiler)(x)
    grad, = torch.autograd.grad(out, x)
    expected = torch.zeros_like(x)
    expected.scatter_(1, ids[..., None].expand(-1, -1, 4), 2.0)
    assert torch.equal(grad, expected)
    torch._dynamo.reset()
