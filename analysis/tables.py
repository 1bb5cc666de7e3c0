"""The report's numbers, from plain DataFrames: no MLflow here, so every builder is testable on a frame.

`runs` has one row per run (run_id, experiment, sweep_id, config_key, stopped_by, the
TrialConfig fields, test_loss, test_acc); `history` one row per (run_id, epoch) with
the epoch metrics. `summarize_runs` adds what the sections need from the history.
Seeds of one configuration share a config_key; every statistic is over seeds.
"""

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from tune.config import best_index, has_layer

CONFIDENCE = 0.95
ALPHA = 0.05
# Summaries of one run; each is a column `summarize_runs` adds, so `config_table` can aggregate it.
RUN_METRICS = ("min_val_loss", "min_val_epoch", "val_acc_at_min", "test_loss", "test_acc", "epochs_run",
               "final_train_loss", "final_train_acc", "compute_seconds")
# Fields that never tell two configurations apart in a label.
NOT_A_SETTING = ("seed", "data_dir", "device", "compile", "channels_last", "amp")


@dataclass(frozen=True)
class Stat:
    """Mean over n seeds, the sample std (ddof=1) and the two-sided t confidence interval of the mean."""

    n: int
    mean: float
    std: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan


def stat(values) -> Stat:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Stat(0, math.nan)
    if len(v) == 1:
        return Stat(1, float(v[0]))
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, len(v) - 1)) * std / math.sqrt(len(v))
    return Stat(len(v), float(v.mean()), std, float(v.mean()) - half, float(v.mean()) + half)


@dataclass
class Comparison:
    """a minus b on one metric, Welch's t-test over seeds, and the Holm-adjusted p over its family."""

    section: str
    name: str
    metric: str
    a: Stat
    b: Stat
    p: float
    p_holm: float = math.nan

    @property
    def diff(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def testable(self) -> bool:
        return self.a.n >= 2 and self.b.n >= 2

    @property
    def survives(self) -> bool:
        return bool(self.p_holm < ALPHA)


def welch_p(a, b) -> float:
    """Two-sided Welch t-test p-value; NaN with fewer than two seeds a side or no variance at all."""
    a = np.asarray([x for x in a if np.isfinite(x)], dtype=float)
    b = np.asarray([x for x in b if np.isfinite(x)], dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(section: str, name: str, metric: str, a, b) -> Comparison:
    return Comparison(section, name, metric, stat(a), stat(b), welch_p(a, b))


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values; NaN (untestable) entries stay NaN and do not count."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m, running = len(finite), 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def adjust(comparisons: list[Comparison]) -> None:
    for c, p in zip(comparisons, holm([c.p for c in comparisons])):
        c.p_holm = p


# --- per run -----------------------------------------------------------------------------


def summarize_runs(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Add per-run columns from the history: epochs_run, min_val_loss and its epoch (the later one on a
    tie, as the trainer picks), val_acc_at_min, final_train_loss/acc, compute_seconds.
    Test metrics stay the run's latest logged ones: those of its best-validation epoch so far."""
    h = history[history["val_loss"].notna()].sort_values(["run_id", "epoch"])
    at_min = h.loc[[g.index[best_index(g["val_loss"])] for _, g in h.groupby("run_id")]].set_index("run_id")
    last = h.drop_duplicates("run_id", keep="last").set_index("run_id")
    per_run = pd.DataFrame({
        "epochs_run": h.groupby("run_id")["epoch"].max(),
        "min_val_loss": at_min["val_loss"], "min_val_epoch": at_min["epoch"], "val_acc_at_min": at_min["val_acc"],
        "final_train_loss": last["train_loss"], "final_train_acc": last["train_acc"],
        "compute_seconds": history.groupby("run_id")["epoch_seconds"].sum(),
    })
    out = runs.drop(columns=[c for c in per_run if c in runs]).merge(per_run, left_on="run_id", right_index=True,
                                                                     how="left")
    out["epochs_run"] = out["epochs_run"].fillna(0).astype(int)
    out["compute_seconds"] = out["compute_seconds"].fillna(0.0)
    for key in ("test_loss", "test_acc"):
        if key not in out:
            out[key] = math.nan
        if key in history:  # a run whose latest values are missing from `runs`: its last logged one
            logged = (history.dropna(subset=[key]).sort_values("epoch").drop_duplicates("run_id", keep="last")
                      .set_index("run_id")[key])
            out[key] = out[key].fillna(out["run_id"].map(logged))
    return out


def usable(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs the statistics use, runs left out): a diverged run or one without a finished epoch says nothing."""
    bad = (runs["stopped_by"] == "error") | (runs["epochs_run"] == 0)
    return runs[~bad].reset_index(drop=True), runs[bad].reset_index(drop=True)


def full_budget(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that ran their whole budget: only these compare like with like (a cut or killed run stopped early)."""
    return runs[(runs["stopped_by"] == "completed") & (runs["epochs_run"] >= runs["epochs"])]


def with_layer(runs: pd.DataFrame, token: str) -> pd.Series:
    """Whether each run has the layer (tune.config.has_layer)."""
    return pd.Series([has_layer(o, token, d) for o, d in zip(runs["order"], runs["dropout"])], index=runs.index, dtype=bool)


def stop_summary(runs: pd.DataFrame) -> str:
    """Where a configuration's seeds stopped, e.g. "completed (3 epochs)" or "2x scheduler at epoch 1"."""
    labels = [f"completed ({e} epochs)" if s == "completed" else f"{s} at epoch {e}"
              for s, e in zip(runs["stopped_by"], runs["epochs_run"])]
    return ", ".join(f"{n}x {label}" if n > 1 else label for label, n in sorted(Counter(labels).items()))


# --- per configuration -------------------------------------------------------------------


def varying_fields(runs: pd.DataFrame) -> list[str]:
    from tune.config import TrialConfig

    return [f for f in TrialConfig.__dataclass_fields__
            if f in runs and f not in NOT_A_SETTING and runs[f].astype(str).nunique() > 1]


def config_table(runs: pd.DataFrame, by: list[str], metrics=RUN_METRICS) -> pd.DataFrame:
    """One row per configuration (config_key), sorted by `by`: n seeds, run ids, where they stopped, and per
    metric its mean, std and confidence interval. `label` names the configuration by `by`, plus any other
    setting that differs between configurations sharing those values."""
    rows = []
    for key, g in runs.groupby("config_key", sort=False):
        row = {b: g[b].iloc[0] for b in by} | {"config_key": key, "seeds": len(g), "run_ids": list(g["run_id"]),
                                               "stopped": stop_summary(g)}
        for m in metrics:
            s = stat(g[m]) if m in g else Stat(0, math.nan)
            row |= {f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high}
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(by, kind="stable").reset_index(drop=True)
    table.insert(0, "label", table[by].astype(str).agg(", ".join, axis=1) if len(by) > 1 else table[by[0]].astype(str))
    first = runs.drop_duplicates("config_key").set_index("config_key")
    for label, clash in table.groupby("label"):
        if len(clash) > 1:
            extra = [f for f in varying_fields(first.loc[clash["config_key"]]) if f not in by]
            for i in clash.index:
                cfg = first.loc[table.at[i, "config_key"]]
                table.at[i, "label"] = f"{label} ({', '.join(f'{f}={cfg[f]}' for f in extra) or table.at[i, 'config_key']})"
    return table


def best_row(table: pd.DataFrame, metric: str = "min_val_loss", mode: str = "min") -> pd.Series:
    """The configuration with the best mean `metric`; on a tie the first row (the table's order)."""
    values = table[f"{metric}_mean"]
    return table.loc[values.idxmin() if mode == "min" else values.idxmax()]


def curve(history: pd.DataFrame, run_ids, metric: str) -> pd.DataFrame:
    """Mean, std and seed count of `metric` at each epoch over `run_ids` (a stopped seed drops out)."""
    h = history[history["run_id"].isin(list(run_ids))].dropna(subset=[metric])
    g = h.groupby("epoch")[metric]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()


def min_epoch(history: pd.DataFrame, run_ids) -> int:
    """The epoch of minimum mean validation loss over `run_ids`: where early stopping would stop."""
    c = curve(history, run_ids, "val_loss")
    return int(c.loc[c["mean"][::-1].idxmin(), "epoch"]) if len(c) else 0


def run_ends(history: pd.DataFrame, runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The last logged point of each run the scheduler stopped: the figures mark them."""
    stopped = runs.loc[runs["stopped_by"] == "scheduler", "run_id"]
    h = history[history["run_id"].isin(stopped)].dropna(subset=[metric]).sort_values("epoch")
    return h.drop_duplicates("run_id", keep="last")[["run_id", "epoch", metric]]


def spearman(x, y) -> tuple[float, float]:
    """Rank correlation and its p-value; NaN with fewer than three distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 3:
        return math.nan, math.nan
    r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


# --- the study's settings, the scheduler and the inventory -------------------------------


def _distinct(runs: pd.DataFrame, values: pd.Series, fmt=str) -> str:
    """The values of a setting: one value, or per group of experiments what they used (a searched
    setting as its range)."""
    per_experiment = {}
    for exp, v in values.groupby(runs["experiment"]):
        used = sorted(v.unique())
        per_experiment[exp] = (fmt(used[0]) if len(used) == 1 else ", ".join(map(fmt, used)) if len(used) <= 4
                               else f"{fmt(used[0])} to {fmt(used[-1])} ({len(used)} values)")
    texts = sorted(set(per_experiment.values()))
    if len(texts) == 1:
        return texts[0]
    return "; ".join(f"{t} ({', '.join(e for e, v in sorted(per_experiment.items()) if v == t)})" for t in texts)


def setup_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The settings the runs used, read from their params: (setting, applies to, value)."""
    def count(n):
        return "all" if int(n) == 0 else str(int(n))

    cnn, mlp = runs[runs["model"] == "cnn"], runs[runs["model"] == "mlp"]
    # What the runs logged, not what today's models/ would build.
    logged = cnn.get("network", pd.Series(dtype=object)).dropna()
    pools = sorted({m for text in logged for m in re.findall(r"MaxPool2d\([^)]*\)", text)})
    pool = ", ".join(pools) or "not logged (runs from before runs logged their network)"
    rows = [("batch size", "all", _distinct(runs, runs["batch_size"])),
            ("epochs", "all", _distinct(runs, runs["epochs"])),
            ("learning rate (Adam)", "all", _distinct(runs, runs["lr"], lambda v: f"{v:.3g}")),
            ("input normalization", "all", _distinct(runs, runs["normalize"])),
            ("best epoch selected by", "all", _distinct(runs, runs["select_by"])),
            ("early-stopping patience", "all", _distinct(runs, runs["patience"], lambda p: p or "off"))]
    if len(mlp):
        rows.append(("hidden units", "mlp", _distinct(mlp, mlp["hidden"])))
    if len(cnn):
        rows += [("channels per conv block", "cnn", _distinct(cnn, cnn["channels"])),
                 ("kernel sizes", "cnn", _distinct(cnn, cnn["kernels"])),
                 ("paddings (kernel // 2)", "cnn",
                  _distinct(cnn, cnn["kernels"].map(lambda k: ",".join(str(int(v) // 2) for v in k.split(","))))),
                 ("pooling (after each block)", "cnn", pool)]
    rows += [("data source", "all", _distinct(runs, runs["data"])),
             ("split: validation images (val_size)", "all", _distinct(runs, runs["val_size"])),
             ("split: training images (limit)", "all", _distinct(runs, runs["limit"], count)),
             ("split: validation and test images each (eval_limit)", "all", _distinct(runs, runs["eval_limit"], count)),
             ("seeds", "all", ", ".join(str(v) for v in sorted(runs["seed"].astype(int).unique())))]
    return pd.DataFrame(rows, columns=["setting", "applies to", "value"])


def scheduler_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, sweep): trial-epochs run against a full grid (each trial's epochs param)."""
    rows = []
    for (exp, sweep), g in runs.groupby(["experiment", "sweep_id"], sort=True):
        spent, full = int(g["epochs_run"].sum()), int(g["epochs"].sum())
        rows.append({"experiment": exp, "sweep_id": sweep, "scheduler": ",".join(sorted(g["scheduler"].unique())),
                     "trials": len(g), "trial_epochs": spent, "full_grid_epochs": full,
                     "saved_fraction": 1 - spent / full if full else math.nan,
                     "stopped_by_scheduler": int((g["stopped_by"] == "scheduler").sum())})
    return pd.DataFrame(rows)


def stop_epochs(runs: pd.DataFrame) -> pd.DataFrame:
    """How many trials of each experiment stopped at each epoch, and why."""
    counts = runs.groupby(["experiment", "epochs_run", "stopped_by"]).size().rename("trials").reset_index()
    return counts.rename(columns={"epochs_run": "last_epoch"})


def describe_config(row: pd.Series, fields: list[str]) -> str:
    return ", ".join(f"{f}={row[f]:g}" if isinstance(row[f], float) else f"{f}={row[f]}" for f in fields) or "-"


def winners(selected: pd.DataFrame, all_runs: pd.DataFrame) -> pd.DataFrame:
    """For each experiment whose selected sweep ran ASHA: its winner (lowest mean best_val_loss over seeds)
    against the winner of the latest FIFO sweep of the same experiment, on the configurations both ran."""
    rows = []
    for exp, asha in selected[selected["scheduler"] == "asha"].groupby("experiment"):
        fifo_all = all_runs[(all_runs["experiment"] == exp) & (all_runs["scheduler"] == "fifo")]
        if fifo_all.empty:
            continue
        fifo_sweep = fifo_all.groupby("sweep_id")["start_time"].max().idxmax()
        fifo = fifo_all[fifo_all["sweep_id"] == fifo_sweep]
        shared = sorted(set(asha["config_key"]) & set(fifo["config_key"]))
        if not shared:
            rows.append({"experiment": exp, "asha_sweep": asha["sweep_id"].iloc[0], "fifo_sweep": fifo_sweep,
                         "shared_configs": 0, "asha_winner": None, "asha_best_val_loss": math.nan, "fifo_winner": None,
                         "fifo_best_val_loss": math.nan, "same_winner": None})
            continue
        fields = varying_fields(pd.concat([asha, fifo])) or ["config_key"]

        def winner(runs):
            means = runs[runs["config_key"].isin(shared)].groupby("config_key")["best_val_loss"].mean()
            return means.idxmin(), means.min()

        (a_key, a_loss), (f_key, f_loss) = winner(asha), winner(fifo)
        rows.append({"experiment": exp, "asha_sweep": asha["sweep_id"].iloc[0], "fifo_sweep": fifo_sweep,
                     "shared_configs": len(shared), "asha_configs": asha["config_key"].nunique(),
                     "fifo_configs": fifo["config_key"].nunique(),
                     "asha_winner": describe_config(asha[asha["config_key"] == a_key].iloc[0], fields),
                     "asha_best_val_loss": a_loss,
                     "fifo_winner": describe_config(fifo[fifo["config_key"] == f_key].iloc[0], fields),
                     "fifo_best_val_loss": f_loss, "same_winner": a_key == f_key})
    return pd.DataFrame(rows)


def inventory(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, sweep): run counts, how runs ended, compute, when, on what data, code and nodes."""
    rows = []
    for (exp, sweep), g in runs.groupby(["experiment", "sweep_id"], sort=True):
        end = g["end_time"].max() if g["end_time"].notna().any() else g["start_time"].max()
        rows.append({"experiment": exp, "sweep_id": sweep, "runs": len(g),
                     "ended": ", ".join(f"{n} {s}" for s, n in sorted(Counter(g["stopped_by"]).items())),
                     "compute_seconds": float(g["compute_seconds"].sum()),
                     "wall_seconds": (end - g["start_time"].min()).total_seconds(),
                     "started": g["start_time"].min(), "data": ", ".join(sorted(g["data"].astype(str).unique())),
                     "git_commit": ", ".join(sorted(g["git_commit"].fillna("unknown").unique())),
                     "nodes": int(g["node_id"].nunique())})
    return pd.DataFrame(rows)


def versions_table(runs: pd.DataFrame) -> pd.DataFrame:
    v = runs.assign(versions=runs["versions"].fillna("unknown"))
    return (v.groupby("versions").agg(runs=("run_id", "size"), sweeps=("sweep_id", lambda s: ", ".join(sorted(set(s)))))
            .reset_index())
