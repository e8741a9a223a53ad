"""VideoMAE V2's decoder masking (``fastmam.ops.decoder_masking``): the running-cell map against a transcription of
V2's published generator, the rules of ``ids_decode`` against a plain-Python statement of them, and the targets of
the smaller index set on every backend this machine runs."""

import numpy as np
import pytest
import torch

from fastmam import ops
from fastmam.ops.masking import cell_phase
from tests.conftest import random_clip, runnable_backends
from tests.ops.numerics import assert_close_to_exact, assert_equal


class V2Cell:
    """VideoMAE V2's ``Cell`` (dataset/masking_generator.py), transcribed from its definition: a queue of
    ``num_masks`` ones then ``num_patches`` zeros read from a pointer that ``run_cell`` advances by one."""

    def __init__(self, num_masks, num_patches):
        self.size = num_masks + num_patches
        self.queue = np.hstack([np.ones(num_masks), np.zeros(num_patches)])
        self.queue_ptr = 0

    def set_ptr(self, pos):
        self.queue_ptr = pos

    def get_cell(self):
        return self.queue[(np.arange(self.size) + self.queue_ptr) % self.size]

    def run_cell(self):
        self.queue_ptr += 1


def v2_running_cell_maps(input_size, mask_ratio):
    """VideoMAE V2's ``RunningCellMaskingGenerator.all_mask_maps``: (4, frames, H*W), 1 where the decoder drops a
    token; ``__call__`` returns one of the 4 maps uniformly at random."""
    frames, height, width = input_size
    num_masks = int(4 * mask_ratio)
    assert 0 < num_masks < 4
    cell = V2Cell(num_masks, 4 - num_masks)
    maps = []
    for ptr_pos in range(cell.size):
        cell.set_ptr(ptr_pos)
        mask = []
        for _ in range(frames):
            cell.run_cell()
            unit = cell.get_cell().reshape(2, 2)
            mask.append(np.tile(unit, [height // 2, width // 2]).flatten())
        maps.append(np.stack(mask, axis=0))
    return np.stack(maps, axis=0)


@pytest.mark.parametrize("grid", [(8, 14, 14), (4, 4, 4), (1, 2, 2), (3, 6, 10), (5, 2, 8), (2, 12, 4)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_map_equals_videomae_v2(grid, ratio):
    v2 = torch.from_numpy(v2_running_cell_maps(grid, ratio)).reshape(4, -1).bool()
    ours = ops.running_cell_map(torch.arange(4), grid, ratio)
    assert torch.equal(ours, v2)
    # each slice drops int(4 * ratio) of every 4 positions: the fraction exactly
    per_slice = ours.view(4, grid[0], -1).float().mean(-1)
    assert (per_slice == int(4 * ratio) / 4).all()


def test_odd_grids_are_rejected_where_v2_is_undefined():
    # V2 tiles the 2x2 cell H//2 x W//2 times: on a 7x7 grid that is a 6x6 map, not one value per token
    assert v2_running_cell_maps((2, 7, 7), 0.5).shape[-1] == 36 != 49
    for grid in [(2, 7, 7), (2, 14, 7), (1, 3, 4)]:
        with pytest.raises(ValueError, match="even number of rows and columns"):
            ops.running_cell_map(torch.zeros(1, dtype=torch.long), grid, 0.5)
        n = grid[0] * grid[1] * grid[2]
        ids = torch.arange(0, n, 2).unsqueeze(0)
        with pytest.raises(ValueError, match="even number of rows and columns"):
            ops.decoder_masking(torch.rand(1, 1 + n), ids, 0.5, grid)
        # random decoder masking has no grid rule
        assert ops.decoder_masking(torch.rand(1, 1 + n), ids, 0.5, grid, "random").shape[1] == \
            ids.shape[1] - int(0.5 * ids.shape[1])


def test_phase_is_uniform_over_the_four_pointers():
    u = torch.tensor([[0.0], [0.2499], [0.25], [0.5], [0.74], [0.75], [1 - 2**-24], [1.0]])
    noise = torch.cat([u, torch.rand(u.shape[0], 4)], 1)
    assert cell_phase(noise).tolist() == [0, 0, 1, 2, 2, 3, 3, 3]
    # any float dtype: values exact in bf16, the largest bf16 below 1 included
    u16 = torch.tensor([[0.0], [0.125], [0.25], [0.5], [0.734375], [0.75], [1 - 2**-8]], dtype=torch.bfloat16)
    noise16 = torch.cat([u16, torch.rand(u16.shape[0], 4).to(torch.bfloat16)], 1)
    assert cell_phase(noise16).tolist() == [0, 0, 1, 2, 2, 3, 3]


def expected_ids_decode(noise, ids_masked, ratio, grid, kind):
    """The rule in plain Python: rank the masked tokens by (dropped by the cell, value, index), keep the first Nd,
    return them in ascending order."""
    out = []
    n = grid[0] * grid[1] * grid[2]
    for b in range(noise.shape[0]):
        masked = ids_masked[b].tolist()
        nd = len(masked) - int(ratio * len(masked))
        if kind == "running_cell":
            v2 = v2_running_cell_maps(grid, ratio).reshape(4, n)[min(int(4 * float(noise[b, 0])), 3)]
        else:
            v2 = np.zeros(n)
        ranked = sorted(masked, key=lambda t: (v2[t], float(noise[b, 1 + t]), t))
        out.append(sorted(ranked[:nd]))
    return torch.tensor(out)


def _masking(kind, grid, ratio, b, rng):
    slices, rows, cols = grid
    if kind == "tube":
        return ops.tube_masking(torch.rand(b, rows * cols, generator=rng), ratio, slices)
    return ops.random_masking(torch.rand(b, slices * rows * cols, generator=rng), ratio)


@pytest.mark.parametrize("kind", ["running_cell", "random"])
@pytest.mark.parametrize("encoder", ["tube", "random"])
@pytest.mark.parametrize("grid,ratio,decoder_ratio", [
    ((8, 14, 14), 0.9, 0.5), ((4, 4, 4), 0.75, 0.25), ((2, 4, 6), 0.5, 0.75), ((3, 2, 2), 0.5, 0.5),
    ((1, 8, 8), 0.95, 0.5), ((5, 6, 4), 0.6, 0.25),
])
def test_ids_decode_rules(kind, encoder, grid, ratio, decoder_ratio, rng):
    b = 3
    m = _masking(encoder, grid, ratio, b, rng)
    n = grid[0] * grid[1] * grid[2]
    noise = torch.rand(b, ops.decoder_noise_positions(n), generator=rng)
    ids = ops.decoder_masking(noise, m.ids_masked, decoder_ratio, grid, kind)
    nm = m.ids_masked.shape[1]
    nd = ops.num_decoded(nm, decoder_ratio)
    assert ids.dtype == torch.int64 and ids.shape == (b, nd) == (b, nm - int(decoder_ratio * nm))
    assert (ids.diff(dim=1) > 0).all()  # ascending, distinct
    assert torch.isin(ids, m.ids_masked).all() and m.mask.gather(1, ids).all()  # a subset of the masked tokens
    assert torch.equal(ids, expected_ids_decode(noise, m.ids_masked, decoder_ratio, grid, kind))
    assert torch.equal(ids, ops.decoder_masking(noise.clone(), m.ids_masked.clone(), decoder_ratio, grid, kind))
    assert torch.equal(ids, ops.decoder_masking_reference(noise, m.ids_masked, decoder_ratio, grid, kind))


@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.5), ((4, 4, 6), 0.25), ((8, 2, 2), 0.75)])
def test_running_cell_is_v2s_masked_and_kept_when_slices_fill_cycles(grid, ratio, rng):
    """With tube masking over a multiple of 4 slices, each position is kept by the cell in exactly 4 - int(4 r) of
    every 4 slices: the cell keeps exactly Nd masked tokens and no tie-break is involved."""
    m = _masking("tube", grid, 0.9 if grid[1] > 2 else 0.5, 4, rng)
    noise = torch.rand(4, 1 + grid[0] * grid[1] * grid[2], generator=rng)
    noise[:, 0] = torch.tensor([0.1, 0.3, 0.6, 0.9])  # every starting pointer once
    ids = ops.decoder_masking(noise, m.ids_masked, ratio, grid)
    v2 = torch.from_numpy(v2_running_cell_maps(grid, ratio)).reshape(4, -1).bool()
    for b in range(4):
        kept = torch.nonzero(m.mask[b] & ~v2[b]).flatten()
        assert torch.equal(ids[b], kept)


def test_random_decoder_masking_is_uniform(rng):
    """Every masked token is decoded with probability Nd / Nm (5 sigma of a binomial over the draws)."""
    draws, grid = 4000, (2, 2, 4)
    m = ops.tube_masking(torch.rand(1, 8, generator=rng), 0.5, 2)
    ids_masked = m.ids_masked.expand(draws, -1)
    noise = torch.rand(draws, 1 + 16, generator=rng)
    ids = ops.decoder_masking(noise, ids_masked, 0.25, grid, "random")
    nm, nd = ids_masked.shape[1], ids.shape[1]
    counts = torch.zeros(16).index_add_(0, ids.flatten(), torch.ones(ids.numel()))[m.ids_masked[0]]
    p = nd / nm
    sigma = (draws * p * (1 - p)) ** 0.5
    assert (counts - draws * p).abs().max() < 5 * sigma, counts
    # the running cell's starting pointer is uniform too
    phases = torch.bincount(cell_phase(noise), minlength=4).float()
    assert (phases - draws / 4).abs().max() < 5 * (draws * 0.25 * 0.75) ** 0.5


def test_decoder_masking_errors(rng):
    grid, n = (2, 4, 4), 32
    m = ops.tube_masking(torch.rand(2, 16, generator=rng), 0.75, 2)
    noise = torch.rand(2, 1 + n, generator=rng)
    with pytest.raises(ValueError, match="kind='tube'"):
        ops.decoder_masking(noise, m.ids_masked, 0.5, grid, "tube")
    with pytest.raises(ValueError, match="ratio 0.6 is not one of 0.25, 0.5, 0.75"):
        ops.decoder_masking(noise, m.ids_masked, 0.6, grid)
    assert ops.decoder_masking(noise, m.ids_masked, 0.6, grid, "random").shape == (2, 24 - 14)
    with pytest.raises(ValueError, match="mask ratio"):
        ops.decoder_masking(noise, m.ids_masked, 1.0, grid, "random")
    with pytest.raises(ValueError, match="decoder noise has 32 positions per sample, expected 33"):
        ops.decoder_masking(noise[:, 1:], m.ids_masked, 0.5, grid)
    with pytest.raises(ValueError, match="decoder noise has batch 1"):
        ops.decoder_masking(noise[:1], m.ids_masked, 0.5, grid)
    bad = noise.clone()
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="decoder noise contains NaN"):
        ops.decoder_masking(bad, m.ids_masked, 0.5, grid)
    with pytest.raises(ValueError, match="strictly ascending"):
        ops.decoder_masking(noise, m.ids_masked.flip(1), 0.5, grid)
    with pytest.raises(ValueError, match="ids_masked holds token ids out of range"):
        ops.decoder_masking(noise, m.ids_masked + n, 0.5, grid)
    with pytest.raises(ValueError, match="drops 0 of the 1 masked tokens"):
        ops.decoder_masking(noise, m.ids_masked[:, :1], 0.5, grid)
    with pytest.raises(ValueError, match="grid must be"):
        ops.decoder_masking(noise, m.ids_masked, 0.5, (2, 16))
    with pytest.raises(ops.BackendUnavailableError, match="no 'triton' implementation"):
        ops.decoder_masking(noise, m.ids_masked, 0.5, grid, backend="triton")


def test_no_host_sync_on_a_gpu():
    """Traced on fake CUDA tensors: an op that read a value on the host (``.item()``, boolean indexing, ``nonzero``)
    would fail the trace for want of data; the shapes are the documented ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids_masked = ops.tube_masking(torch.rand(2, 196, device="cuda"), 0.9, 8).ids_masked
        noise = torch.rand(2, 1 + 1568, device="cuda")
        for kind in ("running_cell", "random"):
            ids = ops.decoder_masking(noise, ids_masked, 0.5, (8, 14, 14), kind)
            assert ids.shape == (2, 704) and ids.dtype == torch.int64 and ids.device.type == "cuda"


def _exact_target(x, ids, t, p, normalize, diff, nxt=None):
    """The target formula in float64 for the tokens of ``ids``: (B, M, rows * C)."""
    def pixels(clip):
        tokens = ops.gather_tokens(ops.patchify_reference(clip, t, p), ids).double().cpu()
        return tokens.view(*tokens.shape[:2], t, p * p, -1) / 255

    v = pixels(x)
    if diff == "rgb_diff":
        v = v[:, :, 1:] - v[:, :, :-1]
    elif diff == "rgb_diff_dense":
        v = pixels(nxt) - v
    v = v.reshape(*v.shape[:2], -1, v.shape[-1])
    if normalize:
        v = (v - v.mean(-2, keepdim=True)) / (v.var(-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return v.reshape(*v.shape[:2], -1), v.shape[-2]


@pytest.mark.parametrize("backend", runnable_backends("pixel_target"))
@pytest.mark.parametrize("normalize", [True, False])
def test_targets_of_ids_decode(backend, normalize, rng):
    """The target ops take ids_decode directly: on each backend (the fused kernels under the interpreter on a CPU)
    the rows of the decoded tokens equal, bit for bit, those tokens' rows of the target of all masked tokens (each
    token's target is computed alone), and they meet the ops' tolerance rule against the float64 formula."""
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    shape, t, p = (2, 8, 16, 24, 3), 2, 4  # 4 slices of a 4x6 grid: the running cell on an even grid
    x = random_clip(shape, rng).to(device)
    nxt = random_clip(shape, rng).to(device)
    m = ops.tube_masking(torch.rand(2, 24, generator=rng).to(device), 0.75, 4)
    noise = torch.rand(2, 1 + 96, generator=rng).to(device)
    ids = ops.decoder_masking(noise, m.ids_masked, 0.5, (4, 4, 6))
    where = torch.searchsorted(m.ids_masked, ids)  # each decoded token's row in the full target
    assert torch.equal(m.ids_masked.gather(1, where), ids)
    for diff, fn, extra in (("pixel", ops.pixel_target, ()), ("rgb_diff", ops.rgb_diff_target, ()),
                            ("rgb_diff_dense", ops.rgb_diff_target, (nxt,))):
        full = fn(x, m.ids_masked, t, p, normalize, *extra, backend=backend)
        part = fn(x, ids, t, p, normalize, *extra, backend=backend)
        assert part.shape == (2, ids.shape[1], full.shape[-1]) and part.dtype == torch.float32
        assert_equal(part, full.gather(1, where.unsqueeze(-1).expand(-1, -1, full.shape[-1])),
                     name=f"{diff} on {backend}")
        ref = fn(x, ids, t, p, normalize, *extra, backend="reference")
        exact, r = _exact_target(x, ids, t, p, normalize, diff, nxt)
        assert_close_to_exact(part.cpu(), ref.cpu(), exact, reduction=r if normalize else 1,
                              name=f"{diff} on {backend}")
