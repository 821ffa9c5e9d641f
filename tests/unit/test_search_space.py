"""The tune: section: search-space syntax, validation against the job schema, PBT optimizer retargeting; how a
trial's reports meet Tune's scheduler."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dtrain.config import build_job, load_job
from dtrain.errors import ConfigError
from dtrain.launch.search_space import apply_params, check_against_job, parse_param, parse_space, read_tune_section
from tests.helpers import JOBS, small_job


def test_every_kind_parses_to_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    params = parse_space({"optim": {"lr": "loguniform(1e-4, 1e-1)"}, "optim.momentum": "uniform(0.5, 0.99)",
                          "optim.weight_decay": "quniform(0, 1e-3, 1e-4)", "trainer.seed": "randint(0, 10)",
                          "model.activation": "choice([relu, tanh, swish])"})
    assert set(params) == {"optim.lr", "optim.momentum", "optim.weight_decay", "trainer.seed", "model.activation"}
    assert params["optim.lr"].args == (1e-4, 1e-1)  # YAML 1.1 reads 1e-4 as a string; we read it as a number
    lr = params["optim.lr"].domain()
    assert isinstance(lr, Float) and lr.lower == 1e-4 and lr.upper == 1e-1
    assert isinstance(params["trainer.seed"].domain(), Integer)
    assert params["model.activation"].domain().categories == ["relu", "tanh", "swish"]
    assert isinstance(params["model.activation"].domain(), Categorical)


def test_grid_expands_choices_and_runs_each_combination_once():
    cfg, params = read_tune_section({"search_alg": "grid", "space": {"optim.lr": "choice([0.1, 0.01])"}})
    assert cfg.num_samples == 1
    assert params["optim.lr"].domain(grid=True) == {"grid_search": [0.1, 0.01]}
    assert read_tune_section({"space": {"optim.lr": "choice([0.1])"}})[0].num_samples == 8


def test_list_options_travel_as_json_and_decode_back():
    param = parse_param("model.hidden", "choice([[64], [128, 64]])")
    assert param.encoded and param.domain().categories == ["[64]", "[128, 64]"]
    assert param.decode("[128, 64]") == [128, 64]
    assert not parse_param("optim.lr", "choice([0.1, 0.01])").encoded


@pytest.mark.parametrize("expr, expected", [
    ("loguniform(1e-4)", "tune.space.optim.lr: expected loguniform(a, b) with numbers"),
    ("loguniform(0, 1)", "tune.space.optim.lr: expected loguniform(a, b) with 0 < a < b"),
    ("uniform(1, 0.5)", "tune.space.optim.lr: expected uniform(a, b) with a < b"),
    ("lognormal(1, 2)", "tune.space.optim.lr: unknown distribution 'lognormal'"),
    ("choice(0.1, 0.2)", "tune.space.optim.lr: expected choice([value, ...]) with a non-empty list"),
    ("choice([])", "tune.space.optim.lr: expected choice([value, ...]) with a non-empty list"),
    ("randint(1.5, 4)", "tune.space.optim.lr: expected randint(a, b) with integers"),
    ("loguniform(1e-4, 1e-1", "tune.space.optim.lr: expected uniform(a, b), loguniform(a, b)"),
    (0.01, "tune.space.optim.lr: expected uniform(a, b)"),
])
def test_bad_syntax_names_the_key(expr, expected):
    with pytest.raises(ConfigError) as err:
        parse_space({"optim.lr": expr})
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_space_keys_are_checked_against_the_job_schema_and_model():
    job = small_job()
    with pytest.raises(ConfigError, match=r"^tune\.space\.model\.depth: 1 does not fit the job: unknown key "):
        check_against_job(job, parse_space({"model.depth": "randint(1, 4)"}))
    with pytest.raises(ConfigError, match=r"^tune\.space\.model\.activation: 'bogus' does not fit the job: "
                                          r"model\.activation: expected one of"):
        check_against_job(job, parse_space({"model.activation": "choice([relu, bogus])"}))
    with pytest.raises(ConfigError, match=r"^tune\.space\.optim\.lr: -1\.0 does not fit the job: optim\.lr"):
        check_against_job(job, parse_space({"optim.lr": "uniform(-1, 1)"}))
    ok = check_against_job(job, parse_space({"model.hidden": "choice([[8], [16, 8]])", "arch.width": "choice([4])"}))
    assert [j["model"]["hidden"] for j in ok] == [[8], [16, 8], [4]]


def test_derived_arch_keys_set_hidden_layers():
    params = parse_space({"arch.depth": "randint(1, 4)", "arch.width": "choice([32, 64])"})
    job = apply_params(small_job(), params, {"arch.depth": 3, "arch.width": 64})
    assert job["model"]["hidden"] == [64, 64, 64]
    with pytest.raises(ConfigError, match=r"^tune\.space\.arch\.layers: unknown derived key"):
        parse_space({"arch.layers": "randint(1, 4)"})


@pytest.mark.parametrize("section, expected", [
    ({"mode": "maximum"}, "tune.mode: expected min or max, got 'maximum'"),
    ({"bogus": 1}, "tune: unknown key 'bogus'"),
    ({"scheduler": "hyperband"}, "tune.scheduler: expected fifo | asha | pbt"),
    ({"search_alg": "grid"}, "tune.space.optim.lr: search_alg grid needs choice([...]) or grid([...])"),
    ({"scheduler": "pbt", "space": {"model.hidden": "choice([[8]])"}}, "tune.space.model.hidden: pbt copies weights"),
    ({"scheduler": "pbt", "search_alg": "optuna"}, "tune.search_alg: pbt samples its population itself"),
    ({"space": {"optim.lr": "grid([0.1, 0.2])"}}, "tune.space.optim.lr: grid([...]) needs tune.search_alg: grid"),
    ({"space": {}}, "tune.space: expected at least one key"),
])
def test_tune_section_errors_name_the_field(section, expected):
    full = {"metric": "val/acc", "mode": "max", "space": {"optim.lr": "loguniform(1e-4, 1e-1)"}} | section
    with pytest.raises(ConfigError) as err:
        read_tune_section(full)
    assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.parametrize("name", ["tune_mlp_digits.yaml", "autotune_mlp_digits.yaml"])
def test_shipped_tune_jobs_validate(name):
    job = load_job(JOBS / name)
    cfg, params = read_tune_section(OmegaConf.to_container(job.tune))
    assert cfg.metric == "val/acc" and cfg.mode == "max" and params
    assert check_against_job(OmegaConf.to_container(job), params)


def test_hyperopt_and_optuna_accept_the_space():
    from dtrain.launch.tune import _search_alg

    cfg, params = read_tune_section({"metric": "val/acc", "mode": "max", "search_alg": "hyperopt", "space": {
        "optim.lr": "loguniform(1e-4, 1e-1)", "model.hidden": "choice([[64], [128, 64]])",
        "trainer.seed": "randint(0, 5)"}})
    space = {k: p.domain() for k, p in params.items()}
    for name in ("hyperopt", "optuna"):
        cfg.search_alg = name
        searcher = _search_alg(cfg, 2)
        assert searcher.set_search_properties("val/acc", "max", space)
        sample = searcher.suggest("t1")
        assert set(sample) == set(params)
        assert params["model.hidden"].decode(sample["model.hidden"]) in ([64], [128, 64])


def test_each_trial_is_its_own_wandb_run_grouped_by_search():
    from omegaconf import OmegaConf

    from dtrain.launch.tune import trial_job

    base = {"model": {"name": "mlp"}, "data": {"name": "iris"}, "tune": {"space": {}}}
    job = trial_job(base, {}, {}, "search:one", "abc_00001")
    wandb = build_job(OmegaConf.create(job)).logging.wandb
    assert (wandb.group, wandb.name, wandb.id) == ("search:one", "abc_00001", "search-one-abc_00001")
    assert "tune" not in job


def test_the_results_table_is_best_first_and_ties_keep_trial_order_whatever_order_tune_returns_them(tmp_path):
    """A resumed search gives the same table: Tune's result grid may list trials in another order."""
    from types import SimpleNamespace

    import pandas as pd

    from dtrain.launch.search_space import TuneConfig
    from dtrain.launch.tune import result_rows

    def result(trial: str, accs: list[float]) -> SimpleNamespace:
        return SimpleNamespace(path=str(tmp_path / trial), metrics_dataframe=pd.DataFrame({"val/acc": accs}),
                               error=None, config={})

    grid = [result("t_00002", [0.5, 0.9]), result("t_00001", [0.9]), result("t_00000", [0.7, 0.8, 0.3])]
    cfg = TuneConfig(metric="val/acc", mode="max")
    for order in (grid, grid[::-1]):
        rows = result_rows(order, cfg, {}, tmp_path)
        assert [(r["trial"], r["epochs"]) for r in rows] == [("t_00001", 1), ("t_00002", 2), ("t_00000", 3)]


def test_asha_stops_a_trial_behind_at_its_rung_and_lets_one_at_max_t_finish_its_run():
    """A trial reaching max_t is left to end by itself: its run evaluates the test split after the last report."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from dtrain.launch.tune import _scheduler

    cfg, params = read_tune_section({"scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                                     "space": {"optim.lr": "choice([0.1, 0.01])"}})
    asha = _scheduler(cfg, params, build_job(OmegaConf.create(small_job(**{"trainer.max_epochs": 3}))))
    asha.set_search_properties("val/acc", "max")
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    actions = [asha.on_trial_result(None, good, {"training_iteration": t, "val/acc": 0.9}) for t in (1, 2, 3)]
    assert actions == [TrialScheduler.CONTINUE] * 3
    assert asha.on_trial_result(None, bad, {"training_iteration": 1, "val/acc": 0.1}) == TrialScheduler.STOP


def test_a_report_waits_until_the_consumer_took_every_earlier_one():
    import queue
    import threading

    from dtrain.launch.train import REPORT_ID, TakenReports

    acks: queue.Queue = queue.Queue()
    reports = TakenReports(acks)
    first = reports.tag({"epoch": 1})  # nothing before it: no wait
    second: dict = {}
    sent = threading.Thread(target=lambda: second.update(reports.tag({"epoch": 2})), daemon=True)
    sent.start()
    sent.join(0.3)
    assert sent.is_alive()  # the first is not taken yet
    acks.put("an-earlier-worker-group:0")  # a group Ray restarted acknowledged its own report: not this one's
    sent.join(0.3)
    assert sent.is_alive()
    acks.put(first[REPORT_ID])
    sent.join(5)
    assert not sent.is_alive() and second["epoch"] == 2 and second[REPORT_ID] != first[REPORT_ID]
