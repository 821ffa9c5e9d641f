import pytest
import torch

from dtrain.data.base import BatchPlan
from dtrain.data.sharding import EvalShards, InMemoryLoader, batch_plan, check_global_batch, eval_plan, step_plan
from dtrain.errors import ConfigError


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


def test_a_fixed_global_batch_sets_accumulation_from_the_world_size():
    """data.global_batch_size: the step keeps its samples; micro-batches of at most batch_size, accumulated."""
    plans = {w: batch_plan("minibatch", 8, 1000, w, 1, global_batch=48) for w in (1, 2, 3, 6)}
    assert {w: (p.global_batch, p.accum, p.micro_batch) for w, p in plans.items()} == {
        1: (48, 6, 8), 2: (48, 3, 8), 3: (48, 2, 8), 6: (48, 1, 8)}
    assert batch_plan("minibatch", 8, 1000, 2, 4, global_batch=48).accum == 4  # trainer.grad_accum: at least
    assert batch_plan("minibatch", 5, 1000, 4, 1, global_batch=48).micro_batch <= 5  # 12 per rank: 3 x 4


def test_global_batches_that_no_allowed_world_size_splits_are_refused():
    check_global_batch(48, range(2, 3))
    check_global_batch(30, range(4, 7))  # 5 and 6 split it
    with pytest.raises(ConfigError, match="30 cannot be split evenly among 4 workers"):
        check_global_batch(30, range(4, 5))
    with pytest.raises(ConfigError, match="7 cannot be split evenly among any of 2-6 workers"):
        check_global_batch(7, range(2, 7))
    with pytest.raises(ConfigError, match="3 is smaller than 4 workers"):
        check_global_batch(3, range(1, 5))


def test_a_resume_keeps_the_global_batch_it_was_trained_with():
    from dtrain.engine.loop import _keep_global_batch
    from dtrain.engine.state import TrainState

    state = TrainState(global_batch=32)
    with pytest.raises(ConfigError, match="trained with 32 samples per step, this run would take 16; set "
                                          "data.global_batch_size=32"):
        _keep_global_batch(state, 16, retarget=False)
    _keep_global_batch(state, 16, retarget=True)  # another run's checkpoint (PBT): its own batch
    assert state.global_batch == 16
    old = TrainState()  # a checkpoint from before the global batch was recorded
    _keep_global_batch(old, 16, retarget=False)
    assert old.global_batch == 16
