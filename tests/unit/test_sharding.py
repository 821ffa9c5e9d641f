import pytest
import torch

from dtrain.data.base import BatchPlan
from dtrain.data.sharding import EvalShards, InMemoryLoader, batch_plan, eval_plan, step_plan


def _all_indices(n, plan, epoch):
    return [step_plan(n, plan, r, shuffle=True, seed=3, epoch=epoch) for r in range(plan.world)]


def test_shards_are_disjoint_and_complete_when_divisible():
    per_rank = _all_indices(96, BatchPlan(24, 1, 3), epoch=0)
    seen = [i for rank in per_rank for idx, _, _ in rank for i in idx.tolist()]
    assert sorted(seen) == list(range(96))
    assert len({len(r) for r in per_rank}) == 1  # every rank takes the same number of steps


@pytest.mark.parametrize("accum", [1, 3])
def test_uneven_data_covers_every_sample_and_keeps_ranks_in_step(accum):
    for n in (97, 101, 103):
        per_rank = _all_indices(n, BatchPlan(8 * 2 * accum, accum, 2), epoch=1)
        assert len(per_rank[0]) == len(per_rank[1])
        seen = [i for rank in per_rank for idx, _, _ in rank for i in idx.tolist()]
        assert set(seen) == set(range(n))
        assert len(seen) - n <= 1  # at most world-1 samples topped up
        # a step's samples over all ranks and micro-batches is what each of its micro-batches says
        step, steps = [], []
        for micro in zip(*per_rank, strict=True):
            step += [len(idx) for idx, _, _ in micro]
            assert len({(s, last) for _, s, last in micro}) == 1  # every rank agrees
            if micro[0][2]:
                steps.append((sum(step), micro[0][1]))
                step = []
        assert all(total == said for total, said in steps) and sum(t for t, _ in steps) == len(seen)


def test_the_global_batch_is_the_same_samples_at_any_world_size():
    """What makes a run's trajectory independent of its worker count: step k trains the same samples."""
    def steps(world, accum):
        plan = BatchPlan(24, accum, world)
        out, cur = [], set()
        for rank_plan in zip(*[step_plan(100, plan, r, shuffle=True, seed=5, epoch=2) for r in range(world)],
                             strict=True):
            cur |= {i for idx, _, _ in rank_plan for i in idx.tolist()}
            if rank_plan[0][2]:
                out.append(cur)
                cur = set()
        return out

    assert steps(1, 1) == steps(2, 1) == steps(3, 2) == steps(4, 3)


def test_eval_padding_counts_no_sample_twice():
    per_rank = [eval_plan(17, 8, r, 2) for r in range(2)]
    real = [i for rank in per_rank for idx, r in rank for i in idx.tolist()[:r]]
    assert sorted(real) == list(range(17))
    assert len(per_rank[0]) == len(per_rank[1])


def test_epochs_reshuffle_and_are_reproducible():
    plan = BatchPlan(10, 1, 2)
    a = step_plan(50, plan, 0, shuffle=True, seed=0, epoch=0)
    b = step_plan(50, plan, 0, shuffle=True, seed=0, epoch=1)
    c = step_plan(50, plan, 0, shuffle=True, seed=0, epoch=0)
    assert not torch.equal(a[0][0], b[0][0])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("accum", [1, 2])
def test_loader_resumes_mid_epoch_at_a_sample_position(accum):
    x = torch.arange(40).float().unsqueeze(1)
    loader = InMemoryLoader((x,), BatchPlan(8 * accum, accum, 2), 0, shuffle=True, seed=1)
    full = [b.tensors[0] for b in loader.iter_from(0)]
    tail = [b.tensors[0] for b in loader.iter_from(16 * accum)]  # two steps done
    assert len(tail) == len(full) - 2 * accum
    assert all(torch.equal(p, q) for p, q in zip(full[2 * accum:], tail, strict=True))
    assert list(loader.iter_from(40)) == []  # the whole epoch done
    with pytest.raises(ValueError, match="not at a step boundary"):
        next(loader.iter_from(5))


def test_batch_plans_of_the_descent_variants():
    assert batch_plan("minibatch", 32, 1000, 2, 3) == BatchPlan(192, 3, 2)
    assert batch_plan("batch", 32, 1000, 2, 1) == BatchPlan(1000, 1, 2)
    assert batch_plan("stochastic", 32, 1000, 4, 1) == BatchPlan(4, 1, 4)
    assert BatchPlan(1000, 3, 2).micro_batch == 167  # ceil(ceil(1000 / 3) / 2)
    assert len(EvalShards((torch.zeros(17, 1),), 8, 0, 2)) == 17
