import pytest
import torch

from fastmam import ops


def test_tube_masking_hand_computed():
    # S = 4 positions, ratio 0.5 -> int(0.5 * 4) = 2 hidden: the two largest noise values (positions 2, 0)
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    m = ops.tube_masking(noise, 0.5, num_slices=2)
    assert m.mask.tolist() == [[True, False, True, False, True, False, True, False]]
    assert m.ids_keep.tolist() == [[1, 3, 5, 7]]
    assert m.ids_masked.tolist() == [[0, 2, 4, 6]]
    assert m.ids_keep.dtype == m.ids_masked.dtype == torch.int64 and m.mask.dtype == torch.bool


def test_ties_go_to_lower_index():
    # equal noise everywhere: a stable sort keeps the lowest positions and hides the highest
    m = ops.tube_masking(torch.zeros(1, 5), 0.6, num_slices=1)
    assert m.ids_keep.tolist() == [[0, 1]] and m.ids_masked.tolist() == [[2, 3, 4]]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spatial", [7, 13, 196])
@pytest.mark.parametrize("slices", [1, 5, 8])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.95])
def test_tube_masking_invariants(batch, spatial, slices, ratio, rng):
    if int(ratio * spatial) in (0, spatial):
        pytest.skip(f"ratio {ratio} hides {int(ratio * spatial)} of {spatial}: rejected by design (tested below)")
    noise = torch.rand(batch, spatial, generator=rng)
    m = ops.tube_masking(noise, ratio, slices)
    n = spatial * slices
    hidden = int(ratio * spatial)
    grid = m.mask.view(batch, slices, spatial)
    # exact hidden count per slice, and the same hidden set in every slice
    assert (grid.sum(-1) == hidden).all()
    assert (grid == grid[:, :1]).all()
    # ascending ids that partition the tokens and agree with the mask
    assert (m.ids_keep.diff(dim=1) > 0).all() and (m.ids_masked.diff(dim=1) > 0).all()
    assert m.ids_keep.shape == (batch, slices * (spatial - hidden))
    assert m.ids_masked.shape == (batch, slices * hidden)
    both = torch.cat([m.ids_keep, m.ids_masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(n).expand(batch, n))
    assert not m.mask.gather(1, m.ids_keep).any() and m.mask.gather(1, m.ids_masked).all()
    # kept positions are those of smallest noise
    kept_noise = noise.gather(1, m.ids_keep[:, : spatial - hidden] % spatial)
    hidden_noise = noise.gather(1, m.ids_masked[:, :hidden] % spatial)
    assert (kept_noise.max(1).values <= hidden_noise.min(1).values).all()
    # same noise -> identical outputs
    again = ops.tube_masking(noise.clone(), ratio, slices)
    assert all(torch.equal(a, b) for a, b in zip(m, again, strict=False))


def test_different_noise_gives_different_masks(rng):
    a = ops.tube_masking(torch.rand(4, 196, generator=rng), 0.9, 8)
    b = ops.tube_masking(torch.rand(4, 196, generator=rng), 0.9, 8)
    assert not torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (97, 0.5), (1568, 0.9)])
def test_random_masking(n, ratio, rng):
    noise = torch.rand(2, n, generator=rng)
    m = ops.random_masking(noise, ratio)
    assert (m.mask.sum(1) == int(ratio * n)).all()
    assert (m.ids_keep.diff(dim=1) > 0).all() and (m.ids_masked.diff(dim=1) > 0).all()
    assert m.mask.gather(1, m.ids_masked).all()


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask ratio"):
        ops.tube_masking(torch.rand(2, 16), ratio, 2)


def test_ratio_that_hides_nothing_is_rejected():
    with pytest.raises(ValueError, match="hides 0 of 4"):
        ops.tube_masking(torch.rand(1, 4), 0.2, 1)


def test_bad_noise():
    with pytest.raises(TypeError, match="floating-point"):
        ops.tube_masking(torch.ones(2, 16, dtype=torch.int64), 0.5, 1)
    with pytest.raises(ValueError, match="2-D"):
        ops.tube_masking(torch.rand(16), 0.5, 1)


def test_backend_switch(monkeypatch):
    noise = torch.rand(2, 16)
    with pytest.raises(ops.BackendUnavailableError, match="no 'triton' implementation"):
        ops.tube_masking(noise, 0.5, 2, backend="triton")
    monkeypatch.setenv("FASTMAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMAM_BACKEND='bogus'"):
        ops.tube_masking(noise, 0.5, 2)
    monkeypatch.setenv("FASTMAM_BACKEND", "reference")
    assert ops.tube_masking(noise, 0.5, 2).mask.shape == (2, 32)
    assert "reference" in ops.available("tube_masking")
