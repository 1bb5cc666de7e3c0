"""The table builders on frames with known values, checked against numpy's and scipy's own results."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import fetch, tables


def make_runs(rows: list[dict]) -> pd.DataFrame:
    """Runs as tune.tracking.read_runs gives them; only what a test sets differs from a default MLP run."""
    base = {"experiment": "dropout-mlp", "sweep_id": "s1", "model": "mlp", "dropout": 0.5, "order": "bn,relu,dropout",
            "dropout_kind": "element", "lr": 1e-3, "epochs": 4, "seed": 0, "stopped_by": "completed", "scheduler": "asha",
            "start_time": pd.Timestamp("2026-01-01", tz="UTC"), "test_loss": math.nan, "test_acc": math.nan,
            "best_val_loss": math.nan}
    runs = pd.DataFrame([base | r for r in rows])
    if "config_key" not in runs:
        runs["config_key"] = [f"{r.model}-{r.dropout}-{r.order}-{r.lr}" for r in runs.itertuples()]
    return runs


def make_history(curves: dict[str, list[float]]) -> pd.DataFrame:
    """run_id -> val_loss per epoch; train curves derived from it, epoch_seconds 1."""
    rows = []
    for run_id, val in curves.items():
        for epoch, v in enumerate(val, start=1):
            rows.append({"run_id": run_id, "epoch": epoch, "val_loss": v, "val_acc": 1 - v / 4, "train_loss": v / 2,
                         "train_acc": 1 - v / 8, "epoch_seconds": 1.0})
    return pd.DataFrame(rows)


def test_stat_matches_numpy_and_scipy():
    v = [0.612, 0.645, 0.581, 0.668, 0.630]
    s = tables.stat(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert s.n == 5
    assert s.mean == pytest.approx(np.mean(v), abs=1e-15)
    assert s.std == pytest.approx(np.std(v, ddof=1), abs=1e-15)
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_stat_of_one_seed_has_no_spread():
    s = tables.stat([0.5, math.nan])
    assert (s.n, s.mean) == (1, 0.5) and math.isnan(s.std) and math.isnan(s.ci_low)
    assert tables.stat([]).n == 0


def test_welch_p_matches_scipy_and_the_formula():
    a, b = [0.70, 0.72, 0.69, 0.71], [0.66, 0.69, 0.64]
    p = tables.welch_p(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-15)
    # Welch-Satterthwaite by hand: the test is Welch's, not Student's.
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-10)
    assert p != pytest.approx(stats.ttest_ind(a, b).pvalue, rel=1e-3)
    c = tables.compare("5", "x", "test_acc", a, b)
    assert c.diff == pytest.approx(np.mean(a) - np.mean(b)) and c.testable and c.p == p


def test_one_seed_a_side_is_not_testable():
    assert math.isnan(tables.welch_p([0.7], [0.6, 0.65]))
    assert not tables.compare("5", "x", "test_acc", [0.7], [0.6, 0.65]).testable


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    adjusted = tables.holm([0.01, 0.04, math.nan, 0.03, 0.005])
    assert adjusted[:2] == [pytest.approx(0.03), pytest.approx(0.06)]
    assert math.isnan(adjusted[2])
    assert adjusted[3:] == [pytest.approx(0.06), pytest.approx(0.02)]
    comparisons = [tables.compare("5", n, "test_acc", a, b) for n, a, b in
                   (("big", [0.9, 0.91, 0.92], [0.5, 0.51, 0.52]), ("none", [0.5, 0.6, 0.7], [0.55, 0.6, 0.65]))]
    tables.adjust(comparisons)
    assert comparisons[0].survives and not comparisons[1].survives
    assert comparisons[0].p_holm == pytest.approx(min(1, 2 * comparisons[0].p))


@pytest.fixture
def sweep():
    runs = make_runs([
        {"run_id": "a0", "dropout": 0.1, "seed": 0, "test_loss": 1.10, "test_acc": 0.60},
        {"run_id": "a1", "dropout": 0.1, "seed": 1, "test_loss": 1.20, "test_acc": 0.58},
        {"run_id": "b0", "dropout": 0.5, "seed": 0, "test_loss": 1.00, "test_acc": 0.62},
        {"run_id": "b1", "dropout": 0.5, "seed": 1, "test_loss": 1.05, "test_acc": 0.66},
        {"run_id": "c0", "dropout": 0.9, "seed": 0, "test_loss": 1.50, "test_acc": 0.40, "stopped_by": "scheduler"},
    ])
    history = make_history({
        "a0": [1.4, 1.2, 1.3, 1.35], "a1": [1.5, 1.3, 1.25, 1.4],
        "b0": [1.3, 1.0, 1.0, 1.1],  # a tie: the later epoch (3) is the best, as the trainer picks
        "b1": [1.2, 1.1, 0.9, 0.95],
        "c0": [1.6, 1.45],
    })
    return tables.summarize_runs(runs, history), history


def test_summaries_per_run(sweep):
    runs, _ = sweep
    r = runs.set_index("run_id")
    assert r.loc["b0", "min_val_loss"] == 1.0 and r.loc["b0", "min_val_epoch"] == 3
    assert r.loc["c0", "epochs_run"] == 2 and r.loc["a0", "epochs_run"] == 4
    assert r.loc["a1", "final_train_loss"] == 0.7 and r.loc["a1", "compute_seconds"] == 4.0
    assert r.loc["a0", "val_acc_at_min"] == pytest.approx(1 - 1.2 / 4)


def test_dropout_table_best_rate_epoch_and_statistics(sweep):
    runs, history = sweep
    table = tables.config_table(runs, ["dropout"])
    assert list(table["label"]) == ["0.1", "0.5", "0.9"] and list(table["seeds"]) == [2, 2, 1]
    best = tables.best_row(table)
    assert best["dropout"] == 0.5 and sorted(best["run_ids"]) == ["b0", "b1"]
    mins = [1.0, 0.9]
    assert best["min_val_loss_mean"] == pytest.approx(np.mean(mins))
    assert best["min_val_loss_std"] == pytest.approx(np.std(mins, ddof=1))
    lo, hi = stats.t.interval(0.95, 1, loc=np.mean(mins), scale=stats.sem(mins))
    assert (best["min_val_loss_ci_low"], best["min_val_loss_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert best["min_val_epoch_mean"] == 3.0 and best["test_acc_mean"] == pytest.approx(0.64)
    # The epoch of minimum mean validation loss over the two seeds: means 1.25, 1.05, 0.95, 1.025.
    assert tables.min_epoch(history, best["run_ids"]) == 3
    assert table.loc[2, "stopped"] == "scheduler at epoch 2" and table.loc[0, "stopped"] == "2x completed (4 epochs)"
    assert math.isnan(table.loc[2, "min_val_loss_std"])
    # The test-best rate by accuracy is also 0.5 here; by loss too.
    assert tables.best_row(table, "test_acc", "max")["dropout"] == 0.5
    curve = tables.curve(history, ["a0", "a1"], "val_loss")
    assert list(curve["mean"]) == pytest.approx([1.45, 1.25, 1.275, 1.375]) and list(curve["n"]) == [2, 2, 2, 2]
    ends = tables.run_ends(history, runs, "val_loss")
    assert list(ends["run_id"]) == ["c0"] and ends["epoch"].iloc[0] == 2


def test_labels_name_what_tells_clashing_configs_apart():
    runs = make_runs([{"run_id": "x", "lr": 1e-3}, {"run_id": "y", "lr": 1e-2}])
    runs = tables.summarize_runs(runs, make_history({"x": [1.0], "y": [0.9]}))
    table = tables.config_table(runs, ["dropout"])
    assert sorted(table["label"]) == ["0.5 (lr=0.001)", "0.5 (lr=0.01)"]


def test_with_and_without_a_layer():
    runs = make_runs([{"order": "bn,relu,dropout", "dropout": 0.5}, {"order": "relu,dropout", "dropout": 0.5},
                      {"order": "bn,relu", "dropout": 0.0}, {"order": "bn,relu,dropout", "dropout": 0.0}])
    assert list(tables.with_layer(runs, "bn")) == [True, False, True, True]
    assert list(tables.with_layer(runs, "dropout")) == [True, True, False, False]


def test_usable_drops_diverged_and_empty_runs(sweep):
    runs, _ = sweep
    runs = pd.concat([runs, runs.iloc[[0]].assign(run_id="e", stopped_by="error"),
                      runs.iloc[[0]].assign(run_id="z", epochs_run=0)])
    kept, left_out = tables.usable(runs)
    assert sorted(left_out["run_id"]) == ["e", "z"] and len(kept) == 5


def test_scheduler_efficiency_and_winners(sweep):
    runs, _ = sweep
    sched = tables.scheduler_table(runs).iloc[0]
    assert (sched["trials"], sched["trial_epochs"], sched["full_grid_epochs"]) == (5, 18, 20)
    assert sched["saved_fraction"] == pytest.approx(0.1) and sched["stopped_by_scheduler"] == 1
    counts = tables.stop_epochs(runs)
    assert counts.set_index(["last_epoch", "stopped_by"])["trials"].to_dict() == {(2, "scheduler"): 1, (4, "completed"): 4}
    asha = runs.assign(best_val_loss=runs["min_val_loss"])
    fifo = asha.assign(sweep_id="f", scheduler="fifo", run_id=asha["run_id"] + "f",
                       best_val_loss=[1.2, 1.25, 1.0, 0.9, 0.5])  # run to the end, 0.9 wins
    win = tables.winners(asha, pd.concat([asha, fifo])).iloc[0]
    assert (win["asha_winner"], win["fifo_winner"], win["same_winner"]) == ("dropout=0.5", "dropout=0.9", False)
    assert win["asha_best_val_loss"] == pytest.approx(0.95) and win["shared_configs"] == 3


def test_setup_table_reads_the_params(sweep):
    runs, _ = sweep
    logged = "Sequential(\n  (0): Conv2d(...)\n  (3): MaxPool2d(kernel_size=2, stride=2, padding=1, dilation=1)\n)"
    cnn = runs.iloc[[0]].assign(model="cnn", channels="32,64", kernels="3,7", experiment="dropout-cnn", batch_size=50,
                                network=logged)
    setup = tables.setup_table(pd.concat([runs.assign(channels="64,128", kernels="3,5", batch_size=100), cnn]).assign(
        hidden=1024, data="synthetic", val_size=500, limit=0, eval_limit=300, normalize="center", select_by="val_loss",
        patience=0)).set_index("setting")["value"]
    assert setup["batch size"] == "100 (dropout-mlp); 50 (dropout-cnn)"
    assert setup["paddings (kernel // 2)"] == "1,3" and setup["channels per conv block"] == "32,64"
    assert setup["split: training images (limit)"] == "all" and setup["seeds"] == "0, 1"
    # the pooling the runs logged, not the one today's code would build
    assert setup["pooling (after each block)"] == "MaxPool2d(kernel_size=2, stride=2, padding=1, dilation=1)"
    unlogged = tables.setup_table(cnn.assign(network=None, hidden=1024, data="synthetic", val_size=500, limit=0,
                                             eval_limit=300, normalize="center", select_by="val_loss", patience=0))
    assert unlogged.set_index("setting").loc["pooling (after each block)", "value"].startswith("not logged")


def test_select_runs_latest_sweep_one_sweep_or_pooled():
    t = lambda day: pd.Timestamp(f"2026-01-{day:02d}", tz="UTC")
    runs = make_runs([
        {"run_id": "old0", "sweep_id": "s1", "start_time": t(1), "seed": 0},
        {"run_id": "new0", "sweep_id": "s2", "start_time": t(2), "seed": 0},
        {"run_id": "new1", "sweep_id": "s2", "start_time": t(2), "seed": 1},
        {"run_id": "cnn0", "sweep_id": "s1", "start_time": t(1), "experiment": "dropout-cnn", "model": "cnn"},
        {"run_id": "old2", "sweep_id": "s1", "start_time": t(1), "seed": 2},  # a seed only the older sweep ran
    ])
    latest, _ = fetch.select_runs(runs)
    assert sorted(latest["run_id"]) == ["cnn0", "new0", "new1"]
    one, _ = fetch.select_runs(runs, sweep="s1")
    assert sorted(one["run_id"]) == ["cnn0", "old0", "old2"]
    pooled, _ = fetch.select_runs(runs, pool=True)
    assert sorted(pooled["run_id"]) == ["cnn0", "new0", "new1", "old2"]  # old0 is new0's configuration and seed


def test_history_frame_keeps_the_latest_of_a_relogged_point():
    points = [("r", "val_loss", 1, 100, 2.0), ("r", "val_loss", 1, 200, 1.5), ("r", "test_acc", 1, 100, 0.4)]
    h = fetch.history_frame(points)
    assert h.loc[0, "val_loss"] == 1.5 and h.loc[0, "test_acc"] == 0.4 and math.isnan(h.loc[0, "train_loss"])
    assert list(fetch.history_frame([]).columns[:2]) == ["run_id", "epoch"]


def test_experiment_names_expand():
    assert fetch.expand_experiments(["report"]) == ["dropout-mlp", "dropout-cnn", "bn-ablation", "dropout-ablation", "order"]
    assert fetch.expand_experiments(["order,order-all", "order"]) == ["order", "order-all"]
    assert "report" not in fetch.expand_experiments(None) and "search-cnn" in fetch.expand_experiments(None)
