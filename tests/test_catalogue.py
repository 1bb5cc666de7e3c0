"""The catalogue and the sweep plan, in process: groups, schedulers per part, the shared baseline, searches."""

import pytest

from tune import catalogue, sweep
from tune.config import UserError
from tune.sweep import SweepArgs


def plan(experiment: str, **kwargs) -> sweep.Plan:
    return sweep.plan(SweepArgs(experiment, data="synthetic", **kwargs))


def test_every_experiment_declares_how_it_is_scheduled_and_read():
    for exp in catalogue.CATALOGUE.values():
        if exp.parts:
            assert not exp.analysis and all(p.analysis for p in exp.members)
            continue
        assert exp.analysis in ("rates", "ablation", "orders", "search"), exp.name
        assert exp.scheduler in ("asha", "fifo")
        # a comparison gives every arm the same budget; ASHA only where a grid or a search looks for a winner
        if exp.analysis in ("ablation", "orders"):
            assert exp.scheduler == "fifo", exp.name
        assert (exp.analysis != "ablation") or exp.layer
        assert (exp.analysis != "orders") or exp.reference
    assert {n for n, e in catalogue.CATALOGUE.items() if e.scheduler == "fifo" and not e.parts} == {
        "bn-ablation", "dropout-ablation", "order", "order-all", "dropout-kind"}


def test_the_report_trains_each_configuration_once():
    trials = catalogue.expand("report")
    assert len(trials) == 24  # 29 arms, 5 of them the same two baselines
    keys = [tuple(sorted(t.config.to_dict().items())) for t in trials]
    assert len(set(keys)) == 24
    shared = {t.parts: t.config for t in trials if len(t.parts) > 1}
    mlp = shared[("dropout-mlp", "bn-ablation", "dropout-ablation")]
    cnn = shared[("dropout-cnn", "bn-ablation", "dropout-ablation", "order")]
    assert (mlp.model, mlp.dropout, mlp.order) == ("mlp", catalogue.MLP_RATE, catalogue.MLP_FULL)
    assert (cnn.model, cnn.dropout, cnn.order) == ("cnn", catalogue.CNN_RATE, catalogue.CNN_FULL)
    # every part still has all its arms, the shared ones included
    for part in catalogue.get("report").members:
        arms = {t.config for t in trials if part.name in t.parts}
        assert arms == {t.config for t in catalogue.expand(part.name)}, part.name
    # seeds are part of what is identical: two seeds are two trials, still shared across parts
    assert len(catalogue.expand("report", seeds=2)) == 48
    # a grid that names one configuration twice trains it once, in one group
    twice = catalogue.expand("dropout-mlp", grids={"dropout": "0.5,0.5,0.7"})
    assert [(t.parts, t.config.dropout) for t in twice] == [(("dropout-mlp",), 0.5), (("dropout-mlp",), 0.7)]


def test_a_composite_runs_each_part_under_its_own_scheduler_and_groups_by_model():
    p = plan("report", smoke=True)
    assert p.n_trials == 24 and p.max_trial_epochs == 24 * 3
    assert {g.name: g.scheduler for g in p.groups.values()} == {
        "dropout-mlp/mlp": "asha", "dropout-cnn/cnn": "asha", "bn-ablation/mlp": "fifo", "bn-ablation/cnn": "fifo",
        "dropout-ablation/mlp": "fifo", "dropout-ablation/cnn": "fifo", "order/cnn": "fifo"}
    asha = p.groups["dropout-mlp/mlp"]
    assert (asha.epochs, asha.grace_period, asha.reduction_factor) == (3, 2, 2)  # half the epochs, rf 2
    assert p.schedulers == {"dropout-mlp": "asha", "dropout-cnn": "asha", "bn-ablation": "fifo",
                            "dropout-ablation": "fifo", "order": "fifo"}
    space = sweep._param_space(p)["trial"]["grid_search"]
    assert len(space) == 24 and sorted(len(t["parts"]) for t in space)[-2:] == [3, 4]


def test_scheduler_flags_apply_to_every_part_or_to_the_asha_parts():
    assert {g.scheduler for g in plan("report", scheduler="fifo").groups.values()} == {"fifo"}
    p = plan("report", grace_period=1, reduction_factor=3, set=["epochs=6"])
    assert {(g.grace_period, g.reduction_factor) for g in p.groups.values() if g.scheduler == "asha"} == {(1, 3)}
    assert {(g.grace_period, g.reduction_factor) for g in p.groups.values() if g.scheduler == "fifo"} == {(0, 0)}
    with pytest.raises(UserError, match="grace period"):
        plan("report", grace_period=7, set=["epochs=6"])


def test_each_model_may_have_its_own_budget():
    p = plan("report", set=["mlp.epochs=10", "cnn.epochs=4", "cnn.channels=8,8"])
    assert p.groups["dropout-mlp/mlp"].epochs == 10 and p.groups["dropout-cnn/cnn"].epochs == 4
    assert p.groups["dropout-mlp/mlp"].grace_period == 5 and p.groups["dropout-cnn/cnn"].grace_period == 2
    assert p.max_trial_epochs == 9 * 10 + 9 * 4 + 2 * 10 + 3 * 4 + 1 * 4  # distinct trials only
    with pytest.raises(UserError, match="matches no trial of order"):
        plan("order", set=["mlp.epochs=3"])


def test_searches_default_to_a_concurrency_cap_and_validate_it():
    p = plan("search-mlp", samples=5)
    assert sweep._max_concurrent(SweepArgs("search-mlp"), p) == sweep.SEARCH_CONCURRENCY
    assert sweep._max_concurrent(SweepArgs("search-mlp", max_concurrent=2), p) == 2
    assert sweep._max_concurrent(SweepArgs("dropout-mlp"), plan("dropout-mlp")) is None
    with pytest.raises(UserError, match="--max-concurrent 0"):
        sweep._max_concurrent(SweepArgs("search-mlp", max_concurrent=0), p)
    assert list(p.groups) == ["search-mlp/mlp"] and p.groups["search-mlp/mlp"].scheduler == "asha"


def _searcher(seed: int):
    from ray import tune as ray_tune

    from tune.trainable import METRIC, PrunableOptunaSearch

    s = PrunableOptunaSearch(seed=seed)
    s.set_search_properties(METRIC, "min", {"dropout": ray_tune.uniform(0.0, 0.9), "lr": ray_tune.loguniform(1e-4, 1e-2)})
    return s


def test_a_seeded_search_repeats_its_draws():
    a, b, c = _searcher(0), _searcher(0), _searcher(1)
    draws = [[s.suggest(f"t{i}") for i in range(3)] for s in (a, b, c)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_a_trial_asha_cut_is_pruned_not_completed():
    import optuna

    s = _searcher(0)
    s.suggest("cut"), s.suggest("done")
    s.on_trial_result("cut", {"best_val_loss": 1.5, "training_iteration": 1})
    s.on_trial_complete("cut", {"best_val_loss": 1.5, "training_iteration": 1, "final": False})
    s.on_trial_complete("done", {"best_val_loss": 1.2, "training_iteration": 3, "final": True})
    states = [t.state for t in s._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert s._ot_study.trials[1].value == 1.2


def test_every_trial_config_round_trips_through_dict_and_mlflow_params():
    from tune.config import TrialConfig

    for t in catalogue.expand("report", seeds=2) + catalogue.expand("dropout-kind") + catalogue.expand("order-all"):
        cfg = t.config
        assert TrialConfig.from_dict(cfg.to_dict()) == cfg
        as_params = {k: str(v) for k, v in cfg.to_dict().items()}  # what MLflow hands back
        assert TrialConfig.from_dict(as_params) == cfg and TrialConfig.from_dict(as_params).key() == cfg.key()


def test_overrides_scoped_to_a_model_touch_only_that_model():
    sets = catalogue.parse_assignments(["epochs=7", "cnn.channels=8,8", "mlp.hidden=16"], "--set")
    assert catalogue.apply_overrides({"model": "mlp", "hidden": 1024}, sets) == {"model": "mlp", "hidden": "16",
                                                                                 "epochs": "7"}
    assert catalogue.apply_overrides({"model": "cnn"}, sets) == {"model": "cnn", "epochs": "7", "channels": "8,8"}
    with pytest.raises(UserError, match="unknown config key 'warmup'"):
        catalogue.parse_assignments(["warmup=3"], "--set")
    with pytest.raises(UserError, match="is not key=value"):
        catalogue.parse_assignments(["epochs"], "--set")


def test_progress_counts_epochs_and_ends_and_bounds_the_eta():
    from types import SimpleNamespace

    from tune.trainable import Progress

    p = Progress(trials=3, max_trial_epochs=12, every=0)
    a, b, c = (SimpleNamespace(trial_id=t, last_result={}) for t in "abc")
    for t in (a, b):
        p.on_trial_start(0, [], t)
    for epoch in (1, 2):
        for t in (a, b):
            t.last_result = {"epoch": epoch, "epoch_seconds": 2.0, "final": False}
            p.on_trial_result(0, [], t, t.last_result)
    b.last_result["final"] = False  # the scheduler stopped b after epoch 2
    p.on_trial_complete(0, [], b)
    p.on_trial_start(0, [], c)
    # 4 epochs of 2 s seen, 8 left at most, 2 running: at most 8 s
    assert p.line() == ("progress: 4 of at most 12 trial-epochs; trials 2 running, 0 done, 1 cut, 0 errored of 3; "
                        "ETA at most 0:00:08")
    a.last_result = {"epoch": 4, "epoch_seconds": 2.0, "final": True}
    p.on_trial_complete(0, [], a)
    p.on_trial_error(0, [], c)
    assert "0 running, 1 done, 1 cut, 1 errored" in p.line() and "ETA after the first epochs" in p.line()
