import torch

from dtrain.data.sharding import ShardedLoader, shard_indices


def _all_indices(n, batch, world, epoch, pad_eval=False):
    per_rank = [shard_indices(n, batch, r, world, shuffle=True, seed=3, epoch=epoch, pad_eval=pad_eval)
                for r in range(world)]
    return per_rank


def test_shards_are_disjoint_and_complete_when_divisible():
    per_rank = _all_indices(96, 8, 3, epoch=0)
    seen = [i for rank in per_rank for idx, _, _ in rank for i in idx.tolist()]
    assert sorted(seen) == list(range(96))
    assert len({len(r) for r in per_rank}) == 1  # every rank takes the same number of steps


def test_uneven_data_covers_every_sample_and_keeps_ranks_in_step():
    for n in (97, 101, 103):
        per_rank = _all_indices(n, 8, 2, epoch=1)
        assert len(per_rank[0]) == len(per_rank[1])
        seen = [i for rank in per_rank for idx, _, _ in rank for i in idx.tolist()]
        assert set(seen) == set(range(n))
        assert len(seen) - n <= 1  # at most world-1 samples topped up
        for step in zip(*per_rank, strict=True):
            assert {g for _, g, _ in step} == {sum(len(idx) for idx, _, _ in step)}


def test_eval_padding_counts_no_sample_twice():
    per_rank = _all_indices(17, 8, 2, epoch=0, pad_eval=True)
    real = [i for rank in per_rank for idx, _, r in rank for i in idx.tolist()[:r]]
    assert sorted(real) == list(range(17))


def test_epochs_reshuffle_and_are_reproducible():
    a = shard_indices(50, 5, 0, 2, shuffle=True, seed=0, epoch=0)
    b = shard_indices(50, 5, 0, 2, shuffle=True, seed=0, epoch=1)
    c = shard_indices(50, 5, 0, 2, shuffle=True, seed=0, epoch=0)
    assert not torch.equal(a[0][0], b[0][0])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_loader_resumes_mid_epoch():
    x = torch.arange(40).float().unsqueeze(1)
    loader = ShardedLoader((x,), 4, 0, 2, shuffle=True, seed=1)
    full = [b.tensors[0] for b in loader]
    tail = [b.tensors[0] for b in loader.iter_from(3)]
    assert all(torch.equal(p, q) for p, q in zip(full[3:], tail, strict=True))
