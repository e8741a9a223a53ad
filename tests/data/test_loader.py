import pytest
import torch

from fastmam.data import StepBatchSampler


def batches(n, b, rank, world, seed, start, end):
    return list(StepBatchSampler(n, b, rank, world, seed, start, end))


def test_resume_continues_the_same_order():
    full = batches(50, 4, 0, 1, seed=7, start=0, end=40)  # 12 steps per epoch: crosses three epochs
    assert batches(50, 4, 0, 1, 7, 17, 40) == full[17:]
    assert len(full) == 40 and all(len(b) == 4 for b in full)


def test_ranks_are_disjoint_and_cover_each_epoch():
    n, b, world = 37, 3, 2
    spe = n // (b * world)  # 6 steps per epoch, one incomplete tail dropped
    per_rank = [batches(n, b, r, world, 1, 0, 2 * spe) for r in range(world)]
    for epoch in range(2):
        seen = [i for r in range(world) for batch in per_rank[r][epoch * spe:(epoch + 1) * spe] for i in batch]
        assert len(seen) == len(set(seen)) == spe * b * world
    # a new epoch is a new permutation
    assert per_rank[0][:spe] != per_rank[0][spe:]


def test_order_depends_on_seed_only():
    assert batches(100, 5, 0, 1, 3, 0, 10) == batches(100, 5, 0, 1, 3, 0, 10)
    assert batches(100, 5, 0, 1, 3, 0, 10) != batches(100, 5, 0, 1, 4, 0, 10)


def test_dataset_smaller_than_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(7, 4, 0, 2, 0, 0, 1)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        StepBatchSampler(70, 4, 2, 2, 0, 0, 1)


def test_loader_yields_uint8_batches():
    from fastmam.config import build_config
    from fastmam.data import build_dataset, build_loader

    cfg = build_config({}, ["data.num_frames=4", "data.img_size=32", "data.num_samples=20", "data.batch_size=3",
                            "data.num_workers=0", "model.patch=8", "masking.ratio=0.75"])
    ds = build_dataset(cfg)
    loader = build_loader(cfg, ds, 0, 1, 2, 5, pin_memory=False)
    got = list(loader)
    assert len(got) == 3
    assert got[0]["video"].shape == (3, 4, 32, 32, 3) and got[0]["video"].dtype == torch.uint8
    expected = StepBatchSampler(20, 3, 0, 1, cfg.seed, 0, 5).batch_indices(2)
    assert got[0]["index"].tolist() == expected
