"""The report: REPORT.md and REPORT.html, one PNG per figure and one CSV per table, from a fetched Study.

Every number comes from the runs. The sections follow the catalogue: each experiment declares
how it is read (a rate grid, a layer ablation, block orders against a reference, a search), and
gets the section of its kind, numbered in catalogue order; the comparisons of the ablation and
order sections form one family for the Holm correction.
"""

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import claims, figures, tables
from analysis.document import Document, anchor
from analysis.fetch import Study
from analysis.figures import Line, Panel
from analysis.tables import ALPHA, CONFIDENCE, Comparison
from tune import catalogue, tracking
from tune.config import UserError
from tune.tracking import relative

MARKER = ".analysis-report"
MODEL_NAMES = {"mlp": "MLP", "cnn": "CNN"}
LAYER_NAMES = {"bn": ("BN", "BatchNorm"), "dropout": ("dropout", "Dropout"), "relu": ("ReLU", "ReLU"),
               "pool": ("pooling", "MaxPool")}
# (scale, decimals) per kind of metric: accuracies are shown in percent.
KINDS = {"loss": (1, 4), "acc": (100, 2), "epoch": (1, 1)}
LOSS_AND_ACC = (("loss", "loss", "cross-entropy", 1), ("accuracy", "acc", "accuracy (%)", 100))
FOUR_PANELS = (("train loss", "train_loss", "cross-entropy", 1), ("validation loss", "val_loss", "cross-entropy", 1),
               ("train accuracy", "train_acc", "accuracy (%)", 100), ("validation accuracy", "val_acc", "accuracy (%)", 100))
HOLM_FAMILY = "the ablation and block-order sections"


# --- numbers as text ---------------------------------------------------------------------


def number(value, kind: str) -> str:
    scale, decimals = KINDS[kind]
    if value is None or not np.isfinite(value):
        return "–"
    value = value * scale
    if kind == "epoch" and float(value).is_integer():
        return str(int(value))
    return f"{value:.{decimals}f}"


def stat_text(s: tables.Stat, kind: str) -> str:
    """One value with one seed; mean ± std [95 % CI] with several."""
    if s.n < 2 or not np.isfinite(s.std):
        return number(s.mean, kind)
    return f"{number(s.mean, kind)} ± {number(s.std, kind)} [{number(s.ci_low, kind)}, {number(s.ci_high, kind)}]"


def cell(row: pd.Series, metric: str, kind: str) -> str:
    """A configuration table's statistic of `metric` as text."""
    return stat_text(tables.Stat(int(row["seeds"]), *(row[f"{metric}_{s}"] for s in ("mean", "std", "ci_low", "ci_high"))),
                     kind)


def cells(table: pd.DataFrame, metric: str, kind: str) -> list[str]:
    return [cell(row, metric, kind) for _, row in table.iterrows()]


MIN_VAL = ("min val loss", "min_val_loss", "loss")
BEST_EPOCH = ("epoch of min", "min_val_epoch", "epoch")
VAL_ACC = ("val acc there (%)", "val_acc_at_min", "acc")
TEST_LOSS = ("test loss", "test_loss", "loss")
TEST_ACC = ("test acc (%)", "test_acc", "acc")
FINAL_TRAIN = ("final train loss", "final_train_loss", "loss")


def stat_columns(table: pd.DataFrame, *columns) -> dict[str, list[str]]:
    """Display columns from (header, metric, kind) triples."""
    return {header: cells(table, metric, kind) for header, metric, kind in columns}


def stop_columns(table: pd.DataFrame) -> dict:
    return {"stopped": table["stopped"], "seeds": table["seeds"]}


def p_text(p: float) -> str:
    return "–" if not np.isfinite(p) else (f"{p:.1e}" if p < 0.001 else f"{p:.3f}")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def csv_of(table: pd.DataFrame, by: list[str], metrics) -> pd.DataFrame:
    """The CSV form of a configuration table: its labels, seeds and every statistic as numbers."""
    cols = ["label", *by, "config_key", "seeds", "stopped"]
    cols += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci_low", "ci_high")]
    return table[cols].assign(run_ids=table["run_ids"].map(";".join))


# --- the sections ------------------------------------------------------------------------


@dataclass
class Context:
    study: Study
    report: Document
    runs: pd.DataFrame
    """usable selected runs, with tables.summarize_runs' columns; a shared run has a row per experiment"""
    history: pd.DataFrame
    every_run: pd.DataFrame
    """every selected run, usable or not"""
    comparisons: list[Comparison] = field(default_factory=list)
    sweeps: dict = field(default_factory=dict)
    """single-axis rate grids that have runs: experiment -> their table, best row, best epoch, figure"""

    def of(self, experiment: str) -> pd.DataFrame:
        return self.runs[self.runs["experiment"] == experiment]

    def line(self, label: str, run_ids, metric: str, color, style: str = "-") -> Line:
        """The mean curve of `metric` over `run_ids`, with the last points of the seeds the scheduler stopped."""
        ends = tables.run_ends(self.history, self.runs[self.runs["run_id"].isin(run_ids)].drop_duplicates("run_id"),
                               metric)
        return Line(label, tables.curve(self.history, run_ids, metric), color, style, ends)

    def lines(self, table: pd.DataFrame, metric: str, colors) -> list[Line]:
        return [self.line(row["label"], row["run_ids"], metric, color) for (_, row), color in zip(table.iterrows(), colors)]

    def four_panels(self, table: pd.DataFrame, colors) -> list[Panel]:
        return [Panel(title, ylabel, self.lines(table, metric, colors), scale) for title, metric, ylabel, scale in FOUR_PANELS]


def budget_note(runs: pd.DataFrame) -> str:
    """A comparison's arms get the same budget: say whether every run had it."""
    runs = runs.drop_duplicates("run_id")
    short = len(runs) - len(tables.full_budget(runs))
    if not short:
        return "Every arm ran its whole budget."
    return (f"{short} of {len(runs)} runs stopped before their whole budget (see `stopped`): "
            "they are shown, but no comparison uses them.")


def seeds_note(table: pd.DataFrame) -> str:
    if (table["seeds"] >= 2).any():
        return f"Cells are mean ± std [{CONFIDENCE:.0%} CI of the mean] over the seeds of each configuration."
    return "One seed per configuration: single values, no spread."


def sentence(c: Comparison, tested: int) -> str:
    head = (f"**{c.name}**: {c.diff * 100:+.1f} points of test accuracy ({number(c.a.mean, 'acc')} % vs "
            f"{number(c.b.mean, 'acc')} %)")
    if not c.testable:
        return head + f"; {c.a.n} vs {c.b.n} seeds, so no significance can be claimed."
    if not np.isfinite(c.p):
        return head + f"; p undefined: every seed on both sides gave the same value ({c.a.n} vs {c.b.n} seeds)."
    verdict = "survives" if c.survives else "does not survive"
    return (head + f", p = {p_text(c.p)} (Welch t-test, {c.a.n} vs {c.b.n} seeds); Holm-adjusted over the {tested} "
            f"tested comparisons of {HOLM_FAMILY}, p = {p_text(c.p_holm)}: {verdict} at α = {ALPHA}.")


def ablation_comparisons(exp: catalogue.Experiment, runs: pd.DataFrame) -> list[Comparison]:
    """With against without the experiment's layer, per model, on test accuracy."""
    short = LAYER_NAMES[exp.layer][0]
    out = []
    for model in sorted(runs["model"].unique()) if len(runs) else []:
        m = runs[runs["model"] == model]
        has = tables.with_layer(m, exp.layer)
        if has.any() and (~has).any():
            out.append(tables.compare(exp.name, f"{short} vs no-{short} on the {MODEL_NAMES[model]}", "test_acc",
                                      m.loc[has, "test_acc"], m.loc[~has, "test_acc"]))
    return out


def order_comparisons(exp: catalogue.Experiment, runs: pd.DataFrame) -> list[Comparison]:
    """Every order against the experiment's reference order, on test accuracy."""
    if runs.empty or exp.reference not in set(runs["order"]):
        return []
    ref = runs[runs["order"] == exp.reference]["test_acc"]
    return [tables.compare(exp.name, f"order {order} vs {exp.reference} ({exp.name})", "test_acc",
                           runs[runs["order"] == order]["test_acc"], ref)
            for order in sorted(set(runs["order"]) - {exp.reference})]


COMPARISONS = {"ablation": ablation_comparisons, "orders": order_comparisons}


def plan_comparisons(ctx: Context, experiments: list[catalogue.Experiment]) -> None:
    """Every comparison on test accuracy, made up front so the Holm correction sees the whole family."""
    for exp in experiments:
        if exp.analysis in COMPARISONS:
            ctx.comparisons += COMPARISONS[exp.analysis](exp, tables.full_budget(ctx.of(exp.name)))
    tables.adjust(ctx.comparisons)


def tested(ctx: Context) -> int:
    return sum(np.isfinite(c.p) for c in ctx.comparisons)


def is_smoke(runs: pd.DataFrame) -> bool:
    """Runs of `--smoke`, or no bigger than it: they show the pipeline works, nothing more."""
    small = (runs["epochs"] <= catalogue.SMOKE["epochs"]) | ((runs["limit"] > 0) & (runs["limit"] <= catalogue.SMOKE["limit"]))
    return bool(runs["smoke"].any() or small.any())


# --- the sections ------------------------------------------------------------------------


def section_setup(ctx: Context) -> None:
    r = ctx.report
    r.text("The settings the runs actually used, read from their MLflow params (where they differ, each value is "
           "listed with the experiments that used it). Optimizer Adam on cross-entropy; the split takes the "
           "validation images from the end of the (fixed-seed shuffled) training set.")
    r.table("setup", tables.setup_table(ctx.every_run), caption="Defaults and hyperparameters.")
    shared = ctx.every_run[ctx.every_run["shared"]].drop_duplicates("run_id")
    if len(shared):
        r.text("Shared trials: a configuration that several experiments need ran once and every section reads the same "
               "run. " + "; ".join(f"{row.model} dropout {row.dropout:g} order {row.order} seed {row.seed}: run "
                                   f"`{row.run_id[:8]}` in `{row.home}`, read by "
                                   + ", ".join(f"`{e}`" for e in ctx.every_run[ctx.every_run['run_id'] == row.run_id]
                                               ["experiment"]) for row in shared.itertuples()) + ".")


def section_claims(ctx: Context, smoke: bool) -> None:
    r = ctx.report
    r.text("What the original study found, against what these runs show. The study ran each configuration once, for "
           f"{claims.STUDY_EPOCHS} epochs on {claims.STUDY_TRAIN_IMAGES:,} training images (batch 100, Adam at lr 1e-3, "
           "hidden 1024, test metrics at the best-validation epoch). Only runs that ran their whole budget count here: "
           "a trial the scheduler cut is not a final result. `ours` gives mean [95% CI] where a configuration has "
           "several seeds; `budget` is what the finding was measured at.")
    found = claims.judge(ctx.runs, smoke)
    shown = found.drop(columns="rule")
    r.table("claims", shown, found, caption="The study's claims, judged.")
    counts = found["verdict"].value_counts()
    r.text("Verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in claims.VERDICTS) + ". Each verdict follows the "
           "rule of its claim's kind:")
    r.bullets([f"**{kind}** ({', '.join(found[found['rule'] == kind]['claim'].unique())}): {text}"
               for kind, text in claims.RULES.items() if (found["rule"] == kind).any()])


def section_rates(ctx: Context, exp: catalogue.Experiment) -> None:
    """A grid over dropout rates (and maybe other axes): validation loss per configuration."""
    r, runs = ctx.report, ctx.of(exp.name)
    axes = [a for a in exp.grid if a != "dropout"] + ["dropout"]
    table = tables.config_table(runs, axes)
    models = sorted(runs["model"].unique())
    name = " and ".join(MODEL_NAMES[m] for m in models)
    shown = pd.DataFrame({**{a: table[a] for a in axes[:-1]}, "dropout": table["dropout"].map(lambda v: f"{v:g}"),
                          **stat_columns(table, MIN_VAL, BEST_EPOCH, VAL_ACC, TEST_ACC), **stop_columns(table)})
    r.table(f"{exp.name}", shown, csv_of(table, axes, tables.RUN_METRICS),
            caption=f"Validation loss (minimum over epochs) per configuration, `{exp.name}`. {seeds_note(table)}")
    best = tables.best_row(table)
    mark = tables.min_epoch(ctx.history, best["run_ids"])
    r.text(f"Best configuration by minimum validation loss: **{best['label']}** (validation loss "
           f"{cell(best, 'min_val_loss', 'loss')} at epoch {cell(best, 'min_val_epoch', 'epoch')}).")
    if len(axes) > 1:
        series = {", ".join(map(str, key)): rate_series(g, "test_acc") for key, g in table.groupby(axes[:-1])}
        path = figures.against_rate(r.figure_path(f"{exp.name}_test_acc"), f"{name}: {exp.description}",
                                    "test accuracy (%)", series, scale=100)
        r.figure(path, f"{name} test accuracy against the dropout rate, one line per {', '.join(axes[:-1])}.")
        return
    path = figures.curves(r.figure_path(f"{exp.name}_val_loss"), f"{name}: validation loss per dropout rate",
                          [Panel("validation loss", "cross-entropy", ctx.lines(table, "val_loss",
                                                                               figures.ordered_colors(len(table))))],
                          legend_title="dropout")
    r.figure(path, f"{name} validation loss against epoch, one line per dropout rate.")
    train_val = list(zip(("train", "validation"), ("train", "val"), ("--", "-"), figures.category_colors(2)))
    panels = [Panel(title, ylabel, [ctx.line(label, best["run_ids"], f"{key}_{suffix}", color, style)
                                    for label, key, style, color in train_val], scale, mark_epoch=mark)
              for title, suffix, ylabel, scale in LOSS_AND_ACC]
    path = figures.curves(r.figure_path(f"{exp.name}_best_curves"), f"{name}, dropout {best['label']}: train and validation",
                          panels)
    r.figure(path, f"{name} at its best dropout rate ({best['label']}): train and validation loss and accuracy; the "
                   f"dotted line is the epoch of minimum validation loss ({mark}).")
    if len(models) == 1:
        ctx.sweeps[exp.name] = {"model": models[0], "table": table, "best": best, "mark": mark, "figure": path}


def section_ablation(ctx: Context, exp: catalogue.Experiment) -> None:
    r, runs = ctx.report, ctx.of(exp.name)
    short, long = LAYER_NAMES[exp.layer]
    runs = runs.assign(variant=np.where(tables.with_layer(runs, exp.layer), f"with {short}", f"without {short}"))
    table = tables.config_table(runs, ["model", "variant"])
    table["label"] = [lab.split(", ", 1)[1] for lab in table["label"]]
    first = runs.drop_duplicates("config_key").set_index("config_key")
    shown = pd.DataFrame({"model": table["model"].map(MODEL_NAMES), "variant": table["label"],
                          "order": table["config_key"].map(first["order"]),
                          "dropout": table["config_key"].map(first["dropout"]),
                          **stat_columns(table, MIN_VAL, BEST_EPOCH, TEST_LOSS, TEST_ACC), **stop_columns(table)})
    r.table(f"{exp.name}", shown, csv_of(table, ["model", "variant"], tables.RUN_METRICS),
            caption=f"With against without {long}, `{exp.name}`. {budget_note(runs)} {seeds_note(table)}")
    r.bullets([sentence(c, tested(ctx)) for c in ctx.comparisons if c.section == exp.name])
    for model in sorted(runs["model"].unique()):
        part = table[table["model"] == model]
        path = figures.curves(r.figure_path(f"{exp.name}_{model}_curves"), f"{MODEL_NAMES[model]}: with and without {short}",
                              ctx.four_panels(part, figures.category_colors(len(part))))
        r.figure(path, f"{MODEL_NAMES[model]} with against without {long}: train and validation loss and accuracy.")


def module_text(row: pd.Series) -> str:
    """The network the run trained, as it logged it."""
    return row["network"] or "(not logged: a run from before runs logged their network)"


def section_orders(ctx: Context, exp: catalogue.Experiment) -> None:
    r, runs = ctx.report, ctx.of(exp.name)
    table = tables.config_table(runs, ["order"]).sort_values("test_acc_mean", ascending=False, kind="stable")
    comparisons = {c.name: c for c in ctx.comparisons if c.section == exp.name}
    diff, p = [], []
    for order in table["order"]:
        c = comparisons.get(f"order {order} vs {exp.reference} ({exp.name})")
        diff.append("reference" if order == exp.reference else (f"{c.diff * 100:+.1f}" if c else "–"))
        p.append(p_text(c.p) if c else "–")
    shown = pd.DataFrame({"order": table["label"], **stat_columns(table, TEST_ACC),
                          f"Δ test acc vs {exp.reference} (points)": diff, "p (Welch)": p,
                          **stat_columns(table, TEST_LOSS, MIN_VAL, BEST_EPOCH), **stop_columns(table)})
    r.table(f"{exp.name}", shown, csv_of(table, ["order"], tables.RUN_METRICS),
            caption=f"Block orders of `{exp.name}`, best test accuracy first. {budget_note(runs)} {seeds_note(table)}")
    r.bullets([sentence(c, tested(ctx)) for c in comparisons.values()])
    colors = figures.category_colors(len(table))
    path = figures.curves(r.figure_path(f"{exp.name}_curves"), f"Block orders ({exp.name})",
                          ctx.four_panels(table, colors), legend_title="order")
    r.figure(path, f"Train and validation curves for each block order of `{exp.name}`.")
    for _, row in table.iterrows():
        first = runs[runs["config_key"] == row["config_key"]].iloc[0]
        summary = f"order {row['label']}: module structure" if len(table) > 6 else None
        if summary is None:
            r.text(f"Order `{row['label']}` (test accuracy {cell(row, 'test_acc', 'acc')} %):")
        r.code(module_text(first), summary)


def section_search(ctx: Context, exp: catalogue.Experiment) -> None:
    r, runs = ctx.report, ctx.of(exp.name)
    top = runs.sort_values("min_val_loss").head(10)
    shown = pd.DataFrame({"dropout": top["dropout"].map(lambda v: f"{v:.3f}"), "lr": top["lr"].map(lambda v: f"{v:.2e}"),
                          "order": top["order"], "min val loss": top["min_val_loss"].map(lambda v: number(v, "loss")),
                          "epoch of min": top["min_val_epoch"].map(lambda v: number(v, "epoch")),
                          "test acc (%)": top["test_acc"].map(lambda v: number(v, "acc")),
                          "stopped": [tables.stop_summary(top.iloc[[i]]) for i in range(len(top))]})
    r.table(f"{exp.name}", shown, top.drop(columns=["start_time", "end_time"]),
            caption=f"`{exp.name}`: the {len(top)} best of {len(runs)} trials by minimum validation loss.")


EXPERIMENT_SECTIONS: dict[str, Callable[[Context, catalogue.Experiment], None]] = {
    "rates": section_rates, "ablation": section_ablation, "orders": section_orders, "search": section_search}


def experiment_title(exp: catalogue.Experiment) -> str:
    return f"{exp.description[0].upper()}{exp.description[1:]} (`{exp.name}`)"


def section_train_val(ctx: Context) -> None:
    r = ctx.report
    rows, notes = [], []
    for s in ctx.sweeps.values():
        ids, mark, name = s["best"]["run_ids"], s["mark"], MODEL_NAMES[s["model"]]
        train, val = tables.curve(ctx.history, ids, "train_loss"), tables.curve(ctx.history, ids, "val_loss")
        at = lambda c, e: float(c.loc[c["epoch"] == e, "mean"].iloc[0]) if (c["epoch"] == e).any() else math.nan
        last = int(val["epoch"].max())
        rows.append({"model": name, "dropout": s["best"]["label"], "epoch of min val loss": mark, "last epoch": last,
                     "train loss there": number(at(train, mark), "loss"), "val loss there": number(at(val, mark), "loss"),
                     "train loss at the last epoch": number(at(train, last), "loss"),
                     "val loss at the last epoch": number(at(val, last), "loss")})
        if mark == last:
            notes.append(f"{name}: the validation loss is lowest at the last epoch run ({last}); early stopping would "
                         f"not have stopped it.")
        else:
            notes.append(f"{name}: from epoch {mark} to {last} the validation loss changed by "
                         f"{at(val, last) - at(val, mark):+.4f} while the training loss changed by "
                         f"{at(train, last) - at(train, mark):+.4f}; early stopping would have saved {last - mark} epochs.")
    r.table("train_vs_val", pd.DataFrame(rows), caption="The best configuration of each dropout grid (mean curves over "
            "its seeds; its figure, with the epoch of minimum validation loss dotted, is in the grid's section).")
    r.bullets(notes)


def section_test(ctx: Context) -> None:
    r = ctx.report
    rows, summary, statements = [], [], []
    for s in ctx.sweeps.values():
        table, best, name = s["table"], s["best"], MODEL_NAMES[s["model"]]
        for _, row in table.iterrows():
            rows.append({"model": name, "dropout": row["label"],
                         **{h: cell(row, m, k) for h, m, k in (BEST_EPOCH, TEST_LOSS, TEST_ACC)},
                         "selected on validation": "yes" if row.name == best.name else "",
                         "stopped": row["stopped"], "seeds": row["seeds"]})
        summary.append({"Model": f"{name} (dropout {best['label']})", "Test loss": cell(best, "test_loss", "loss"),
                        "Test acc": cell(best, "test_acc", "acc") + " %"})
        for metric, mode, what in (("test_acc", "max", "test accuracy"), ("test_loss", "min", "test loss")):
            top = tables.best_row(table, metric, mode)
            if top.name == best.name or top[f"{metric}_mean"] == best[f"{metric}_mean"]:
                statements.append(f"{name}: the rate best on validation ({best['label']}) is also best on {what}.")
            else:
                kind = "acc" if metric == "test_acc" else "loss"
                statements.append(f"**{name}: the rate best on validation ({best['label']}) is not the rate "
                                  f"best on {what} ({top['label']}: {cell(top, metric, kind)} against "
                                  f"{cell(best, metric, kind)}).**")
    r.table("test_all", pd.DataFrame(rows), caption="Test loss and accuracy at each run's best-validation epoch "
            "(for a trial the scheduler stopped: its best epoch so far).")
    r.table("test_selected", pd.DataFrame(summary), caption="The validation-selected model of each dropout grid.")
    r.bullets(statements)


def rate_series(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A configuration table as figures.against_rate draws it."""
    return pd.DataFrame({"x": table["dropout"], "mean": table[f"{metric}_mean"], "std": table[f"{metric}_std"],
                         "stopped": table["stopped"].str.contains("scheduler")})


def section_rate_effects(ctx: Context) -> None:
    r = ctx.report
    for exp, s in ctx.sweeps.items():
        table, name = s["table"], MODEL_NAMES[s["model"]]
        colors = figures.ordered_colors(len(table))
        panels = [Panel("train loss", "cross-entropy", ctx.lines(table, "train_loss", colors)),
                  Panel("train accuracy", "accuracy (%)", ctx.lines(table, "train_acc", colors), 100)]
        path = figures.curves(r.figure_path(f"{exp}_train_per_rate"), f"{name}: training per dropout rate",
                              panels, legend_title="dropout")
        r.figure(path, f"{name} train loss and accuracy, one line per dropout rate.")
        runs = ctx.of(exp)
        done = tables.full_budget(runs)
        rho, p = tables.spearman(done["dropout"], done["final_train_loss"])
        if np.isfinite(rho):
            verdict = "supports" if rho > 0 and p < ALPHA else "does not support"
            r.text(f"{name}: Spearman ρ between the dropout rate and the final train loss is {rho:.2f} "
                   f"(p = {p_text(p)}, {len(done)} completed runs); this {verdict} slower convergence at higher rates.")
        else:
            r.text(f"{name}: fewer than three rates ran to completion, so no trend is computed.")
    series = lambda metric: {MODEL_NAMES[s["model"]]: rate_series(s["table"], metric) for s in ctx.sweeps.values()}
    path = figures.against_rate(r.figure_path("best_epoch_per_rate"), "Best epoch against dropout rate",
                                "epoch of minimum validation loss", series("min_val_epoch"), integer_y=True)
    r.figure(path, "The best epoch (minimum validation loss) against the dropout rate, per model. For a "
                   "configuration the scheduler stopped (x) it is the best epoch before the stop.")
    path = figures.against_rate(r.figure_path("test_acc_per_rate"), "Test accuracy against dropout rate",
                                "test accuracy (%)", series("test_acc"), scale=100)
    r.figure(path, "Test accuracy at the best-validation epoch against the dropout rate, per model.")
    rows = [{"model": MODEL_NAMES[s["model"]], "dropout": row["label"],
             **{h: cell(row, m, k) for h, m, k in (BEST_EPOCH, TEST_ACC, FINAL_TRAIN)}}
            for s in ctx.sweeps.values() for _, row in s["table"].iterrows()]
    r.table("rates", pd.DataFrame(rows), caption="Best epoch and test accuracy per dropout rate.")


def section_seeds(ctx: Context) -> None:
    r = ctx.report
    per_config = ctx.runs.groupby(["experiment", "config_key"]).size().rename("seeds").reset_index()
    shown = per_config.groupby("experiment").agg(configurations=("config_key", "size"),
                                                 seeds_min=("seeds", "min"), seeds_max=("seeds", "max"),
                                                 runs=("seeds", "sum")).reset_index()
    r.table("seeds", shown, caption="Seeds per configuration (runs sharing a config_key).")
    if (per_config["seeds"] < 2).all():
        r.text("**Every configuration ran with one seed: no significance can be claimed.** The differences below are "
               "single runs. Rerun the sweeps with `--seeds 3` (or more) to get spreads, confidence intervals and p-values.")
    else:
        r.text(f"Where a configuration has K ≥ 2 seeds, tables show mean ± std [{CONFIDENCE:.0%} t-interval of the mean] "
               f"and curves a ±1 std band. Comparisons use Welch's t-test; a difference survives when its Holm-adjusted "
               f"p-value over the {tested(ctx)} tested comparisons of {HOLM_FAMILY} is below {ALPHA}.")
    if ctx.comparisons:
        rows = [{"experiment": c.section, "comparison": c.name, "difference (points)": f"{c.diff * 100:+.1f}",
                 "a (%)": stat_text(c.a, "acc"), "b (%)": stat_text(c.b, "acc"), "seeds": f"{c.a.n} vs {c.b.n}",
                 "p (Welch)": p_text(c.p), "p (Holm)": p_text(c.p_holm),
                 "survives": ("yes" if c.survives else "no") if np.isfinite(c.p_holm) else "not testable"}
                for c in ctx.comparisons]
        data = pd.DataFrame([{"experiment": c.section, "comparison": c.name, "metric": c.metric,
                              **{f"{side}_{k}": v for side, st in (("a", c.a), ("b", c.b)) for k, v in vars(st).items()},
                              "difference": c.diff, "p_welch": c.p, "p_holm": c.p_holm} for c in ctx.comparisons])
        r.table("comparisons", pd.DataFrame(rows), data,
                caption=f"Every comparison of {HOLM_FAMILY} on test accuracy, between runs that ran their whole budget.")


def section_scheduler(ctx: Context) -> None:
    r = ctx.report
    ended = ctx.every_run[ctx.every_run["stopped_by"] != "running"]
    if len(ended) < len(ctx.every_run):
        r.note(f"Runs still running, left out of this section: {len(ctx.every_run) - len(ended)}.")
    r.text("Each experiment ran under its own scheduler, and ASHA ranked a trial only against its own group (the same "
           "experiment and model). A trial shared with a FIFO experiment counts in its ASHA group's rankings but is "
           "never stopped.")
    sched = tables.scheduler_table(ended)
    shown = sched.assign(saved=[f"{v:.0%}" if np.isfinite(v) else "–" for v in sched["saved_fraction"]]).drop(
        columns="saved_fraction").rename(columns={"trial_epochs": "trial-epochs run", "full_grid_epochs": "full grid",
                                                  "stopped_by_scheduler": "stopped by scheduler"})
    r.table("scheduler", shown, sched, caption="Trial-epochs run against a full grid (every trial to its epochs param).")
    asha = sched[sched["scheduler"] == "asha"]
    if len(asha):
        spent, full = asha["trial_epochs"].sum(), asha["full_grid_epochs"].sum()
        r.text(f"The ASHA experiments ran {spent} of {full} trial-epochs: {1 - spent / full:.0%} of the compute of a "
               f"full grid saved.")
    else:
        r.text("No experiment in this selection is tagged as run by ASHA (tag `scheduler`); runs without the tag count "
               "as unknown.")
    counts = tables.stop_epochs(ended)
    path = figures.stop_epochs(r.figure_path("stop_epochs"), "Where each trial stopped", counts,
                               ctx.every_run.groupby("experiment")["epochs"].max().to_dict())
    r.figure(path, "Trials by the last epoch they ran, by why they stopped.")
    pivot = counts.pivot_table(index=["experiment", "last_epoch"], columns="stopped_by", values="trials",
                               aggfunc="sum", fill_value=0).reset_index()
    pivot.columns.name = None
    r.table("stop_epochs", pivot, caption="Trials per last epoch and stop reason.")
    win = tables.winners(ended, ctx.study.all_runs)
    if win.empty:
        r.text("No FIFO sweep of the same experiments is in the store, so ASHA's winner cannot be checked against the "
               "full-run winner; run one with `python -m tune sweep EXP --scheduler fifo`.")
        return
    loss = lambda v: number(v, "loss")
    shown = pd.DataFrame({"experiment": win["experiment"], "FIFO sweep": win["fifo_sweep"],
                          "configurations in common": win["shared_configs"], "ASHA winner": win["asha_winner"],
                          "ASHA best val loss": win["asha_best_val_loss"].map(loss), "FIFO winner": win["fifo_winner"],
                          "FIFO best val loss": win["fifo_best_val_loss"].map(loss),
                          "same": win["same_winner"].map({True: "yes", False: "no"})})
    r.table("winners", shown, win, caption="ASHA's winner against the winner of the latest FIFO sweep of the same "
            "experiment, by lowest best validation loss over the configurations both ran.")
    r.bullets([f"`{w['experiment']}`: " + ("no configuration in common with the FIFO sweep." if not w["shared_configs"]
              else f"ASHA's winner ({w['asha_winner']}) is also the full-run winner." if w["same_winner"]
              else f"ASHA's winner ({w['asha_winner']}) is not the full-run winner ({w['fifo_winner']}).")
               for _, w in win.iterrows()])


def section_inventory(ctx: Context) -> None:
    r, study = ctx.report, ctx.study
    inv = tables.inventory(ctx.every_run)
    shown = inv.assign(compute=inv["compute_seconds"].map(duration), wall=inv["wall_seconds"].map(duration),
                       started=inv["started"].map(lambda t: t.strftime("%Y-%m-%d %H:%M")),
                       git_commit=inv["git_commit"].map(lambda c: ", ".join(v[:12] + ("-dirty" if v.endswith("-dirty") else "")
                                                                            for v in c.split(", "))))
    shown = shown[["experiment", "sweep_id", "runs", "ended", "compute", "wall", "started", "data", "git_commit", "nodes"]]
    r.table("inventory", shown, inv, caption="Sweeps in this report: compute is the sum of epoch times (h:mm:ss), "
            "wall the time from the first run's start to the last run's end. A shared run counts in every experiment "
            "that reads it.")
    distinct = ctx.every_run.drop_duplicates("run_id")
    r.text(f"Total compute: {duration(distinct['compute_seconds'].sum())} over {len(distinct)} runs and "
           f"{inv['sweep_id'].nunique()} sweeps. Data: {', '.join(sorted(ctx.every_run['data'].astype(str).unique()))}.")
    r.table("versions", tables.versions_table(distinct), caption="Package versions, from the `versions` tag.")
    shown_sweeps = set(zip(ctx.every_run["experiment"], ctx.every_run["sweep_id"]))
    others = study.all_runs[[pair not in shown_sweeps for pair in zip(study.all_runs["experiment"], study.all_runs["sweep_id"])]]
    if len(others):
        r.text("Other sweeps in the store, not in this report (`--sweep ID` shows one, `--all` pools them): " + ", ".join(
            f"`{s}` ({e}, {len(g)} runs)" for (e, s), g in others.groupby(["experiment", "sweep_id"])) + ".")
    left_out = distinct[~distinct["run_id"].isin(ctx.runs["run_id"])]
    if len(left_out):
        r.text("Runs left out of the statistics (diverged, or no finished epoch): " + ", ".join(
            f"`{row.run_id[:8]}` ({row.experiment}, {row.stopped_by})" for row in left_out.itertuples()) + ".")
    if study.unreadable:
        r.text(f"**{len(study.unreadable)} runs left out** because their params do not read back as a config "
               "(a table never shows a default in place of what ran): " + "; ".join(study.unreadable) + ".")
    points = int(ctx.history[list(set(ctx.history.columns) - {"run_id", "epoch"})].notna().sum().sum())
    r.text(f"Read {study.all_runs['run_id'].nunique()} runs and {points} metric points from `{study.uri}` in "
           f"{study.fetch_seconds:.1f} s.")


def missing_note(ctx: Context, exp: str) -> str:
    """Why `exp` has no section: it was not asked for, has no runs, or none usable."""
    if exp not in ctx.study.experiments:
        return "not among the experiments asked for (`--experiment`)"
    if not (ctx.study.all_runs["experiment"] == exp).any():
        return f"no runs in this store; run it with `python -m tune sweep {exp}`"
    if not (ctx.every_run["experiment"] == exp).any():
        return "no runs in the selected sweep (see the run inventory for its sweeps)"
    return "no usable runs: each one diverged or finished no epoch"


def provenance(runs: pd.DataFrame, smoke: bool, command: str, machine: str) -> dict[str, str]:
    """The report's header: what ran, at which commit and budget, read from the runs (`command` and
    `machine` are not in them: the caller says)."""
    distinct = runs.drop_duplicates("run_id")

    def of(model, column):
        values = sorted(set(distinct.loc[distinct["model"] == model, column].dropna().astype(int)))
        return "/".join(str(v) for v in values) or "none"

    seeds = distinct.groupby("config_key")["seed"].nunique()
    full = tables.full_budget(distinct)
    completed = ", ".join(f"{m} {int((full['model'] == m).sum())} of {int((distinct['model'] == m).sum())}"
                          for m in ("mlp", "cnn") if (distinct["model"] == m).any())
    end = distinct["end_time"].max() if distinct["end_time"].notna().any() else distinct["start_time"].max()
    return {"command": command, "commit": ", ".join(sorted(distinct["git_commit"].fillna("unknown").unique())),
            "smoke": str(smoke).lower(), "mlp_epochs": of("mlp", "epochs"), "mlp_train_images": of("mlp", "train_images"),
            "cnn_epochs": of("cnn", "epochs"), "cnn_train_images": of("cnn", "train_images"),
            "seeds": "/".join(str(v) for v in sorted(set(seeds))), "runs_with_whole_budget": completed, "wall_time": duration(
                (end - distinct["start_time"].min()).total_seconds()), "machine": machine}


def build(study: Study, out: Path, command: str = "unknown", machine: str = "unknown") -> Document:
    study = dataclasses.replace(study, uri=relative(study.uri), runs=study.runs.assign(
        data=study.runs["data"].astype(str).map(relative), data_dir=study.runs["data_dir"].astype(str).map(relative)))
    every_run = tables.summarize_runs(study.runs, study.history)
    runs, _ = tables.usable(every_run)
    ctx = Context(study, Document(out), runs, study.history, every_run)
    experiments = [e for e in catalogue.CATALOGUE.values() if e.analysis]
    present = [e for e in experiments if len(ctx.of(e.name))]
    plan_comparisons(ctx, present)
    smoke = is_smoke(every_run)
    # The sections, in order: each experiment's by its declared kind, then what reads across them.
    sections: list[tuple[str, Callable[[], None]]] = [
        ("Setup", lambda: section_setup(ctx)), ("The study's claims", lambda: section_claims(ctx, smoke))]
    sections += [(experiment_title(e), lambda e=e: EXPERIMENT_SECTIONS[e.analysis](ctx, e)) for e in present]
    rate_grids = [e for e in present if e.analysis == "rates" and list(e.grid) == ["dropout"]]
    if rate_grids:
        sections += [("Train vs validation", lambda: section_train_val(ctx)), ("Test results", lambda: section_test(ctx)),
                     ("Dropout-rate effects", lambda: section_rate_effects(ctx))]
    sections += [("Seeds", lambda: section_seeds(ctx)), ("Scheduler efficiency", lambda: section_scheduler(ctx)),
                 ("Run inventory", lambda: section_inventory(ctx))]
    titles = [f"{i}. {title}" for i, (title, _) in enumerate(sections)]

    r = ctx.report
    # YAML front matter: a script reads it, GitHub shows it as a table.
    r.text("---\n" + "\n".join(f"{k}: {v}" for k, v in provenance(every_run, smoke, command, machine).items()) + "\n---")
    r.heading(1, "Study report: BatchNorm and Dropout in small vision models")
    if smoke:
        r.warning("**Smoke run: these numbers show that the pipeline works; they are not evidence.** The runs are "
                  f"`--smoke` sized (at most {catalogue.SMOKE['epochs']} epochs or {catalogue.SMOKE['limit']:,} "
                  "training images), so every claim below is marked not testable.")
    distinct = every_run.drop_duplicates("run_id")
    r.text(f"Generated by `python -m analysis report` from the MLflow store `{study.uri}`, showing {study.selection}: "
           f"{len(distinct)} runs of {every_run['experiment'].nunique()} experiments. Every number and figure below is "
           f"computed from those runs. Accuracies are in percent; each run's test metrics are those of its "
           f"best-validation epoch.")
    r.bullets([f"[{t}](#{anchor(t)})" for t in titles])
    absent = [e.name for e in experiments if e not in present]
    if absent:
        r.note("Not in this report: " + "; ".join(f"`{e}` ({missing_note(ctx, e)})" for e in absent) + ".")
    # Rate grids come before the sections that read across them (ctx.sweeps).
    for title, (_, write_section) in zip(titles, sections):
        r.heading(2, title)
        write_section()
    return r


def check_out(out: Path) -> None:
    """Refuse an --out that is a file or a folder holding something other than an earlier report."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"--out {out} is not empty and holds no earlier report; pass a new or empty folder")


def prepare_out(out: Path) -> None:
    """Empty a previous report in `out`, so no stale figure or table survives."""
    check_out(out)
    for sub in ("figures", "tables"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("REPORT.md", "REPORT.html"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m analysis report; the folder is replaced on each run\n")


def write(study: Study, out: Path, command: str = "unknown", machine: str = "unknown") -> Path:
    prepare_out(out)
    document = build(study, out, command, machine)
    (out / "REPORT.md").write_text(document.markdown())
    (out / "REPORT.html").write_text(document.html("Study report"))
    return out / "REPORT.md"


def attach(study: Study, out: Path) -> tuple[int, list[str]]:
    """Log the report (REPORT.md, REPORT.html, figures, tables) to the runs of the sweeps it read:
    (how many took it, one line for each that could not: the report on disk stands either way)."""
    c = tracking.client(study.uri)
    homes = [e.experiment_id for e in (c.get_experiment_by_name(n) for n in sorted(set(study.runs["home"]))) if e]
    sweeps = set(study.runs["sweep_id"])
    attached, failed = 0, []
    for run in tracking.sweep_parents(c, homes):
        if run.data.tags.get("sweep_id") in sweeps:
            try:
                c.log_artifacts(run.info.run_id, str(out), "report")
                attached += 1
            except Exception as e:  # noqa: BLE001 - a read-only user, an unwritable artifact store
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failed.append(f"could not attach the report to sweep run {run.info.run_id} ({first})")
    return attached, failed

