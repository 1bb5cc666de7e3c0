"""The report: REPORT.md and REPORT.html, one PNG per figure and one CSV per table, from a fetched Study.

Every number comes from the runs. Sections whose experiment is missing say so
and are skipped; comparisons in sections 5-7 form one family for the Holm correction.
"""

import base64
import html
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures, tables
from analysis.fetch import Study
from analysis.figures import Line, Panel
from analysis.tables import ALPHA, CONFIDENCE, Comparison
from tune.catalogue import CNN_FULL
from tune.config import TrialConfig, UserError

MARKER = ".analysis-report"
MODEL_NAMES = {"mlp": "MLP", "cnn": "CNN"}
# (scale, decimals) per kind of metric: accuracies are shown in percent.
KINDS = {"loss": (1, 4), "acc": (100, 2), "epoch": (1, 1)}
LOSS_AND_ACC = (("loss", "loss", "cross-entropy", 1), ("accuracy", "acc", "accuracy (%)", 100))
FOUR_PANELS = (("train loss", "train_loss", "cross-entropy", 1), ("validation loss", "val_loss", "cross-entropy", 1),
               ("train accuracy", "train_acc", "accuracy (%)", 100), ("validation accuracy", "val_acc", "accuracy (%)", 100))


# --- the document --------------------------------------------------------------------------


class Report:
    """Blocks of a document, written as Markdown and as HTML; tables also go to CSV, figures to PNG."""

    def __init__(self, out: Path):
        self.out = out
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(("text", f"_{text}_"))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def code(self, text: str, summary: str | None = None) -> None:
        self.blocks.append(("code", text, summary))

    def table(self, name: str, shown: pd.DataFrame, data: pd.DataFrame | None = None, caption: str = "") -> None:
        """`shown` goes in the document; `data` (raw numbers, default `shown`) to tables/<name>.csv."""
        path = self.out / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        (shown if data is None else data).to_csv(path, index=False)
        self.blocks.append(("table", shown, caption, f"tables/{name}.csv"))

    def figure_path(self, name: str) -> Path:
        return self.out / "figures" / f"{name}.png"

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", path.relative_to(self.out).as_posix(), caption))

    def markdown(self) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "text":
                out.append(rest[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "code":
                block = "```\n" + rest[0].rstrip() + "\n```"
                out.append(f"<details><summary>{rest[1]}</summary>\n\n{block}\n\n</details>" if rest[1] else block)
            elif kind == "table":
                shown, caption, csv = rest
                head = f"{caption} " if caption else ""
                out.append(f"{head}([CSV]({csv}))\n\n" + markdown_table(shown))
            elif kind == "figure":
                out.append(f"![{rest[1]}]({rest[0]})\n\n_{rest[1]}_")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        body = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                body.append(f'<h{rest[0]} id="{anchor(rest[1])}">{inline(rest[1])}</h{rest[0]}>')
            elif kind == "text":
                body.append(f"<p>{inline(rest[0])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "code":
                pre = f"<pre>{html.escape(rest[0].rstrip())}</pre>"
                body.append(f"<details><summary>{html.escape(rest[1])}</summary>{pre}</details>" if rest[1] else pre)
            elif kind == "table":
                shown, caption, csv = rest
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
                cells = "".join("<tr>" + "".join(f"<td>{inline(str(v))}</td>" for v in row) + "</tr>"
                                for row in shown.itertuples(index=False))
                body.append(f'<p>{inline(caption)} (<a href="{csv}">CSV</a>)</p><table><tr>{head}</tr>{cells}</table>')
            elif kind == "figure":
                data = base64.b64encode((self.out / rest[0]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                            f"<figcaption>{inline(rest[1])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;"
                 "padding:8px;font-size:12px;overflow-x:auto}figcaption{font-style:italic;font-size:13px}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>Study report</title><style>{style}</style>"
                f"</head><body>{''.join(body)}</body></html>\n")


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def anchor(title: str) -> str:
    """GitHub's heading anchor, so the table of contents links work in both renderings."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())


def inline(text: str) -> str:
    """Markdown's `code`, **bold**, _italic_ and [link](url) as HTML; everything else escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<em>\1</em>", s)
        s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        out.append(s)
    return "".join(out)


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
    report: Report
    runs: pd.DataFrame
    """usable selected runs, with tables.summarize_runs' columns"""
    history: pd.DataFrame
    every_run: pd.DataFrame
    """every selected run, usable or not"""
    comparisons: list[Comparison] = field(default_factory=list)
    sweeps: dict = field(default_factory=dict)

    def of(self, experiment: str) -> pd.DataFrame:
        return self.runs[self.runs["experiment"] == experiment]

    def missing(self, experiment: str) -> bool:
        """Whether `experiment` has no runs here; if so the report says so and how to make them."""
        if len(self.of(experiment)):
            return False
        if experiment not in self.study.experiments:
            why = "is not among the experiments asked for (`--experiment`)"
        elif not (self.study.all_runs["experiment"] == experiment).any():
            why = f"has no runs in this store; run it with `python -m tune sweep {experiment}`"
        elif not (self.every_run["experiment"] == experiment).any():
            why = "has no runs in the selected sweep (see the run inventory for its sweeps)"
        else:
            why = "has no usable runs: each one diverged or finished no epoch"
        self.report.note(f"Skipped: experiment `{experiment}` {why}.")
        return True

    def line(self, label: str, run_ids, metric: str, color, style: str = "-") -> Line:
        """The mean curve of `metric` over `run_ids`, with the last points of the seeds the scheduler stopped."""
        ends = tables.run_ends(self.history, self.runs[self.runs["run_id"].isin(run_ids)], metric)
        return Line(label, tables.curve(self.history, run_ids, metric), color, style, ends)

    def lines(self, table: pd.DataFrame, metric: str, colors) -> list[Line]:
        return [self.line(row["label"], row["run_ids"], metric, color) for (_, row), color in zip(table.iterrows(), colors)]

    def four_panels(self, table: pd.DataFrame, colors) -> list[Panel]:
        return [Panel(title, ylabel, self.lines(table, metric, colors), scale) for title, metric, ylabel, scale in FOUR_PANELS]


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
            f"tested comparisons of sections 5–7, p = {p_text(c.p_holm)}: {verdict} at α = {ALPHA}.")


def plan_comparisons(ctx: Context) -> None:
    """Sections 5-7's comparisons on test accuracy, made up front so the Holm correction sees all of them."""
    for section, exp, token, short in (("5", "bn-ablation", "bn", "BN"), ("6", "dropout-ablation", "dropout", "dropout")):
        runs = ctx.of(exp)
        for model in sorted(runs["model"].unique()) if len(runs) else []:
            m = runs[runs["model"] == model]
            has = tables.with_layer(m, token)
            if has.any() and (~has).any():
                ctx.comparisons.append(tables.compare(section, f"{short} vs no-{short} on the {MODEL_NAMES[model]}",
                                                      "test_acc", m.loc[has, "test_acc"], m.loc[~has, "test_acc"]))
    for exp in ("order", "order-all"):
        runs = ctx.of(exp)
        if runs.empty or CNN_FULL not in set(runs["order"]):
            continue
        ref = runs[runs["order"] == CNN_FULL]["test_acc"]
        for order in sorted(set(runs["order"]) - {CNN_FULL}):
            ctx.comparisons.append(tables.compare("7", f"order {order} vs {CNN_FULL} ({exp})", "test_acc",
                                                  runs[runs["order"] == order]["test_acc"], ref))
    tables.adjust(ctx.comparisons)


def tested(ctx: Context) -> int:
    return sum(np.isfinite(c.p) for c in ctx.comparisons)


def section_setup(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "0. Setup")
    r.text("The settings the runs actually used, read from their MLflow params (where they differ, each value is "
           "listed with the experiments that used it). Optimizer Adam on cross-entropy; the split takes the "
           "validation images from the end of the (fixed-seed shuffled) training set.")
    r.table("s0_setup", tables.setup_table(ctx.every_run), caption="Defaults and hyperparameters.")


def section_sweep(ctx: Context, number_: int, model: str) -> None:
    r, exp, name = ctx.report, f"dropout-{model}", MODEL_NAMES[model]
    r.heading(2, f"{number_}. {name} dropout sweep")
    if ctx.missing(exp):
        return
    runs = ctx.of(exp)
    table = tables.config_table(runs, ["dropout"])
    shown = pd.DataFrame({"dropout": table["label"], **stat_columns(table, MIN_VAL, BEST_EPOCH, VAL_ACC),
                          **stop_columns(table)})
    r.table(f"s{number_}_{model}_sweep", shown, csv_of(table, ["dropout"], tables.RUN_METRICS),
            caption=f"Validation loss (minimum over epochs) per dropout rate, `{exp}`. {seeds_note(table)}")
    best = tables.best_row(table)
    mark = tables.min_epoch(ctx.history, best["run_ids"])
    r.text(f"Best dropout rate by minimum validation loss: **{best['label']}** (validation loss "
           f"{cell(best, 'min_val_loss', 'loss')} at epoch {cell(best, 'min_val_epoch', 'epoch')}).")
    path = figures.curves(r.figure_path(f"s{number_}_{model}_val_loss"), f"{name}: validation loss per dropout rate",
                          [Panel("validation loss", "cross-entropy", ctx.lines(table, "val_loss",
                                                                               figures.ordered_colors(len(table))))],
                          legend_title="dropout")
    r.figure(path, f"{name} validation loss against epoch, one line per dropout rate.")
    train_val = list(zip(("train", "validation"), ("train", "val"), ("--", "-"), figures.category_colors(2)))
    panels = [Panel(title, ylabel, [ctx.line(label, best["run_ids"], f"{key}_{suffix}", color, style)
                                    for label, key, style, color in train_val], scale, mark_epoch=mark)
              for title, suffix, ylabel, scale in LOSS_AND_ACC]
    path = figures.curves(r.figure_path(f"s{number_}_{model}_best_curves"),
                          f"{name}, dropout {best['label']}: train and validation", panels)
    r.figure(path, f"{name} at its best dropout rate ({best['label']}): train and validation loss and accuracy; the "
                   f"dotted line is the epoch of minimum validation loss ({mark}).")
    ctx.sweeps[model] = {"table": table, "best": best, "mark": mark, "figure": path}


def section_train_val(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "3. Train vs validation")
    if not ctx.sweeps:
        r.note("Skipped: neither dropout sweep has runs.")
        return
    rows, notes = [], []
    for model, s in ctx.sweeps.items():
        ids, mark, name = s["best"]["run_ids"], s["mark"], MODEL_NAMES[model]
        train, val = tables.curve(ctx.history, ids, "train_loss"), tables.curve(ctx.history, ids, "val_loss")
        at = lambda c, e: float(c.loc[c["epoch"] == e, "mean"].iloc[0]) if (c["epoch"] == e).any() else math.nan
        last = int(val["epoch"].max())
        rows.append({"model": name, "dropout": s["best"]["label"], "epoch of min val loss": mark, "last epoch": last,
                     "train loss there": number(at(train, mark), "loss"), "val loss there": number(at(val, mark), "loss"),
                     "train loss at the last epoch": number(at(train, last), "loss"),
                     "val loss at the last epoch": number(at(val, last), "loss")})
        r.figure(s["figure"], f"{name} at dropout {s['best']['label']}: the dotted line marks epoch {mark}, the minimum "
                              f"of the validation loss, where early stopping would stop.")
        if mark == last:
            notes.append(f"{name}: the validation loss is lowest at the last epoch run ({last}); early stopping would "
                         f"not have stopped it.")
        else:
            notes.append(f"{name}: from epoch {mark} to {last} the validation loss changed by "
                         f"{at(val, last) - at(val, mark):+.4f} while the training loss changed by "
                         f"{at(train, last) - at(train, mark):+.4f}; early stopping would have saved {last - mark} epochs.")
    r.table("s3_train_vs_val", pd.DataFrame(rows), caption="The best configuration of each model (mean curves over its seeds).")
    r.bullets(notes)


def section_test(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "4. Test results")
    if not ctx.sweeps:
        r.note("Skipped: neither dropout sweep has runs.")
        return
    rows, summary, statements = [], [], []
    for model, s in ctx.sweeps.items():
        table, best = s["table"], s["best"]
        for _, row in table.iterrows():
            rows.append({"model": MODEL_NAMES[model], "dropout": row["label"],
                         **{h: cell(row, m, k) for h, m, k in (BEST_EPOCH, TEST_LOSS, TEST_ACC)},
                         "selected on validation": "yes" if row.name == best.name else "",
                         "stopped": row["stopped"], "seeds": row["seeds"]})
        summary.append({"Model": f"{MODEL_NAMES[model]} (dropout {best['label']})", "Test loss": cell(best, "test_loss", "loss"),
                        "Test acc": cell(best, "test_acc", "acc") + " %"})
        for metric, mode, what in (("test_acc", "max", "test accuracy"), ("test_loss", "min", "test loss")):
            top = tables.best_row(table, metric, mode)
            if top.name == best.name or top[f"{metric}_mean"] == best[f"{metric}_mean"]:
                statements.append(f"{MODEL_NAMES[model]}: the rate best on validation ({best['label']}) is also best on {what}.")
            else:
                kind = "acc" if metric == "test_acc" else "loss"
                statements.append(f"**{MODEL_NAMES[model]}: the rate best on validation ({best['label']}) is not the rate "
                                  f"best on {what} ({top['label']}: {cell(top, metric, kind)} against "
                                  f"{cell(best, metric, kind)}).**")
    r.table("s4_test_all", pd.DataFrame(rows), caption="Test loss and accuracy at each run's best-validation epoch "
            "(for a trial the scheduler stopped: its best epoch so far).")
    r.table("s4_test_selected", pd.DataFrame(summary), caption="The validation-selected model of each architecture.")
    r.bullets(statements)


def section_ablation(ctx: Context, section: str, exp: str, token: str, short: str, long: str) -> None:
    r = ctx.report
    r.heading(2, f"{section}. {long} ablation")
    if ctx.missing(exp):
        return
    runs = ctx.of(exp)
    runs = runs.assign(variant=np.where(tables.with_layer(runs, token), f"with {short}", f"without {short}"))
    table = tables.config_table(runs, ["model", "variant"])
    table["label"] = [lab.split(", ", 1)[1] for lab in table["label"]]
    shown = pd.DataFrame({"model": table["model"].map(MODEL_NAMES), "variant": table["label"],
                          "order": [runs[runs["config_key"] == k]["order"].iloc[0] for k in table["config_key"]],
                          "dropout": [runs[runs["config_key"] == k]["dropout"].iloc[0] for k in table["config_key"]],
                          **stat_columns(table, MIN_VAL, BEST_EPOCH, TEST_LOSS, TEST_ACC), **stop_columns(table)})
    r.table(f"s{section}_{token}_ablation", shown, csv_of(table, ["model", "variant"], tables.RUN_METRICS),
            caption=f"With against without {long}, `{exp}`. {seeds_note(table)}")
    r.bullets([sentence(c, tested(ctx)) for c in ctx.comparisons if c.section == section])
    for model in sorted(runs["model"].unique()):
        part = table[table["model"] == model]
        path = figures.curves(r.figure_path(f"s{section}_{model}_{token}_curves"),
                              f"{MODEL_NAMES[model]}: with and without {short}",
                              ctx.four_panels(part, figures.category_colors(len(part))))
        r.figure(path, f"{MODEL_NAMES[model]} with against without {long}: train and validation loss and accuracy.")


def module_text(row: pd.Series) -> str:
    from models import build_model

    cfg = TrialConfig.from_dict({f: row[f] for f in TrialConfig.__dataclass_fields__ if f in row})
    return str(build_model(cfg.model, order=cfg.order, dropout=cfg.dropout, dropout_kind=cfg.dropout_kind,
                           hidden=cfg.hidden, channels=cfg.conv_channels, kernels=cfg.conv_kernels))


def section_order(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "7. Block order")
    for exp in ("order", "order-all"):
        r.heading(3, f"`{exp}`")
        if ctx.missing(exp):
            continue
        runs = ctx.of(exp)
        table = tables.config_table(runs, ["order"]).sort_values("test_acc_mean", ascending=False, kind="stable")
        comparisons = {c.name: c for c in ctx.comparisons if c.section == "7" and c.name.endswith(f"({exp})")}
        diff, p = [], []
        for order in table["order"]:
            c = comparisons.get(f"order {order} vs {CNN_FULL} ({exp})")
            diff.append("reference" if order == CNN_FULL else (f"{c.diff * 100:+.1f}" if c else "–"))
            p.append(p_text(c.p) if c else "–")
        shown = pd.DataFrame({"order": table["label"], **stat_columns(table, TEST_ACC),
                              f"Δ test acc vs {CNN_FULL} (points)": diff, "p (Welch)": p,
                              **stat_columns(table, TEST_LOSS, MIN_VAL, BEST_EPOCH), **stop_columns(table)})
        r.table(f"s7_{exp}", shown, csv_of(table, ["order"], tables.RUN_METRICS),
                caption=f"CNN block orders, best test accuracy first. {seeds_note(table)}")
        r.bullets([sentence(c, tested(ctx)) for c in comparisons.values()])
        colors = figures.category_colors(len(table))
        path = figures.curves(r.figure_path(f"s7_{exp}_curves"), f"CNN block orders ({exp})",
                              ctx.four_panels(table, colors), legend_title="order")
        r.figure(path, f"CNN train and validation curves for each block order of `{exp}`.")
        for _, row in table.iterrows():
            first = runs[runs["config_key"] == row["config_key"]].iloc[0]
            summary = f"order {row['label']}: module structure" if len(table) > 6 else None
            if summary is None:
                r.text(f"Order `{row['label']}` (test accuracy {cell(row, 'test_acc', 'acc')} %):")
            r.code(module_text(first), summary)


def rate_series(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A configuration table as figures.against_rate draws it."""
    return pd.DataFrame({"x": table["dropout"], "mean": table[f"{metric}_mean"], "std": table[f"{metric}_std"],
                         "stopped": table["stopped"].str.contains("scheduler")})


def section_rates(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "8. Dropout-rate analysis")
    if not ctx.sweeps:
        r.note("Skipped: neither dropout sweep has runs.")
    for model, s in ctx.sweeps.items():
        table = s["table"]
        colors = figures.ordered_colors(len(table))
        panels = [Panel("train loss", "cross-entropy", ctx.lines(table, "train_loss", colors)),
                  Panel("train accuracy", "accuracy (%)", ctx.lines(table, "train_acc", colors), 100)]
        path = figures.curves(r.figure_path(f"s8_{model}_train_per_rate"), f"{MODEL_NAMES[model]}: training per dropout rate",
                              panels, legend_title="dropout")
        r.figure(path, f"{MODEL_NAMES[model]} train loss and accuracy, one line per dropout rate.")
        runs = ctx.of(f"dropout-{model}")
        done = runs[(runs["stopped_by"] == "completed") & (runs["epochs_run"] == runs["epochs"])]
        rho, p = tables.spearman(done["dropout"], done["final_train_loss"])
        if np.isfinite(rho):
            verdict = "supports" if rho > 0 and p < ALPHA else "does not support"
            r.text(f"{MODEL_NAMES[model]}: Spearman ρ between the dropout rate and the final train loss is {rho:.2f} "
                   f"(p = {p_text(p)}, {len(done)} completed runs); this {verdict} slower convergence at higher rates.")
        else:
            r.text(f"{MODEL_NAMES[model]}: fewer than three rates ran to completion, so no trend is computed.")
    if ctx.sweeps:
        series = lambda metric: {MODEL_NAMES[m]: rate_series(s["table"], metric) for m, s in ctx.sweeps.items()}
        path = figures.against_rate(r.figure_path("s8_best_epoch"), "Best epoch against dropout rate",
                                    "epoch of minimum validation loss", series("min_val_epoch"), integer_y=True)
        r.figure(path, "The best epoch (minimum validation loss) against the dropout rate, per model. For a "
                       "configuration the scheduler stopped (x) it is the best epoch before the stop.")
        path = figures.against_rate(r.figure_path("s8_test_acc"), "Test accuracy against dropout rate",
                                    "test accuracy (%)", series("test_acc"), scale=100)
        r.figure(path, "Test accuracy at the best-validation epoch against the dropout rate, per model.")
        rows = []
        for model, s in ctx.sweeps.items():
            for _, row in s["table"].iterrows():
                rows.append({"model": MODEL_NAMES[model], "dropout": row["label"],
                             **{h: cell(row, m, k) for h, m, k in (BEST_EPOCH, TEST_ACC, FINAL_TRAIN)}})
        r.table("s8_rates", pd.DataFrame(rows), caption="Best epoch and test accuracy per dropout rate.")
    r.heading(3, "Element against channel dropout")
    if ctx.missing("dropout-kind"):
        return
    table = tables.config_table(ctx.of("dropout-kind"), ["dropout_kind", "dropout"])
    shown = pd.DataFrame({"kind": table["dropout_kind"], "dropout": table["dropout"],
                          **stat_columns(table, MIN_VAL, BEST_EPOCH, TEST_ACC), **stop_columns(table)})
    r.table("s8_dropout_kind", shown, csv_of(table, ["dropout_kind", "dropout"], tables.RUN_METRICS),
            caption=f"CNN with element (Dropout) and channel (Dropout2d) dropout. {seeds_note(table)}")
    series = {kind: rate_series(g, "test_acc") for kind, g in table.groupby("dropout_kind")}
    path = figures.against_rate(r.figure_path("s8_dropout_kind"), "CNN: element against channel dropout",
                                "test accuracy (%)", series, scale=100)
    r.figure(path, "CNN test accuracy against the dropout rate, element against channel dropout.")


def section_seeds(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "9. Seeds")
    per_config = ctx.runs.groupby(["experiment", "config_key"]).size().rename("seeds").reset_index()
    shown = per_config.groupby("experiment").agg(configurations=("config_key", "size"),
                                                 seeds_min=("seeds", "min"), seeds_max=("seeds", "max"),
                                                 runs=("seeds", "sum")).reset_index()
    r.table("s9_seeds", shown, caption="Seeds per configuration (runs sharing a config_key).")
    if (per_config["seeds"] < 2).all():
        r.text("**Every configuration ran with one seed: no significance can be claimed.** The differences below are "
               "single runs. Rerun the sweeps with `--seeds 3` (or more) to get spreads, confidence intervals and p-values.")
    else:
        r.text(f"Where a configuration has K ≥ 2 seeds, tables show mean ± std [{CONFIDENCE:.0%} t-interval of the mean] "
               f"and curves a ±1 std band. Comparisons use Welch's t-test; a difference survives when its Holm-adjusted "
               f"p-value over the {tested(ctx)} tested comparisons of sections 5–7 is below {ALPHA}.")
    if ctx.comparisons:
        rows = [{"section": c.section, "comparison": c.name, "difference (points)": f"{c.diff * 100:+.1f}",
                 "a (%)": stat_text(c.a, "acc"), "b (%)": stat_text(c.b, "acc"), "seeds": f"{c.a.n} vs {c.b.n}",
                 "p (Welch)": p_text(c.p), "p (Holm)": p_text(c.p_holm),
                 "survives": ("yes" if c.survives else "no") if np.isfinite(c.p_holm) else "not testable"}
                for c in ctx.comparisons]
        data = pd.DataFrame([{"section": c.section, "comparison": c.name, "metric": c.metric,
                              **{f"{side}_{k}": v for side, st in (("a", c.a), ("b", c.b)) for k, v in vars(st).items()},
                              "difference": c.diff, "p_welch": c.p, "p_holm": c.p_holm} for c in ctx.comparisons])
        r.table("s9_comparisons", pd.DataFrame(rows), data, caption="Every comparison of sections 5–7 on test accuracy.")


def section_scheduler(ctx: Context) -> None:
    r = ctx.report
    r.heading(2, "10. Scheduler efficiency")
    ended = ctx.every_run[ctx.every_run["stopped_by"] != "running"]
    if len(ended) < len(ctx.every_run):
        r.note(f"Runs still running, left out of this section: {len(ctx.every_run) - len(ended)}.")
    sched = tables.scheduler_table(ended)
    shown = sched.assign(saved=[f"{v:.0%}" if np.isfinite(v) else "–" for v in sched["saved_fraction"]]).drop(
        columns="saved_fraction").rename(columns={"trial_epochs": "trial-epochs run", "full_grid_epochs": "full grid",
                                                  "stopped_by_scheduler": "stopped by scheduler"})
    r.table("s10_scheduler", shown, sched, caption="Trial-epochs run against a full grid (every trial to its epochs param).")
    asha = sched[sched["scheduler"] == "asha"]
    if len(asha):
        spent, full = asha["trial_epochs"].sum(), asha["full_grid_epochs"].sum()
        r.text(f"The ASHA sweeps ran {spent} of {full} trial-epochs: {1 - spent / full:.0%} of the compute of a full grid saved.")
    else:
        r.text("No sweep in this selection is tagged as run by ASHA (tag `scheduler`); runs without the tag count as unknown.")
    counts = tables.stop_epochs(ended)
    path = figures.stop_epochs(r.figure_path("s10_stop_epochs"), "Where each trial stopped", counts,
                               ctx.every_run.groupby("experiment")["epochs"].max().to_dict())
    r.figure(path, "Trials by the last epoch they ran, by why they stopped.")
    pivot = counts.pivot_table(index=["experiment", "last_epoch"], columns="stopped_by", values="trials",
                               aggfunc="sum", fill_value=0).reset_index()
    pivot.columns.name = None
    r.table("s10_stop_epochs", pivot, caption="Trials per last epoch and stop reason.")
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
    r.table("s10_winners", shown, win, caption="ASHA's winner against the winner of the latest FIFO sweep of the same "
            "experiment, by lowest best validation loss over the configurations both ran.")
    r.bullets([f"`{w['experiment']}`: " + ("no configuration in common with the FIFO sweep." if not w["shared_configs"]
              else f"ASHA's winner ({w['asha_winner']}) is also the full-run winner." if w["same_winner"]
              else f"ASHA's winner ({w['asha_winner']}) is not the full-run winner ({w['fifo_winner']}).")
               for _, w in win.iterrows()])


def section_inventory(ctx: Context) -> None:
    r, study = ctx.report, ctx.study
    r.heading(2, "11. Run inventory")
    inv = tables.inventory(ctx.every_run)
    shown = inv.assign(compute=inv["compute_seconds"].map(duration), wall=inv["wall_seconds"].map(duration),
                       started=inv["started"].map(lambda t: t.strftime("%Y-%m-%d %H:%M")),
                       git_commit=inv["git_commit"].map(lambda c: ", ".join(v[:12] + ("-dirty" if v.endswith("-dirty") else "")
                                                                            for v in c.split(", "))))
    shown = shown[["experiment", "sweep_id", "runs", "ended", "compute", "wall", "started", "data", "git_commit", "nodes"]]
    r.table("s11_inventory", shown, inv, caption="Sweeps in this report: compute is the sum of epoch times (h:mm:ss), "
            "wall the time from the first run's start to the last run's end.")
    r.text(f"Total compute: {duration(inv['compute_seconds'].sum())} over {len(ctx.every_run)} runs and "
           f"{inv['sweep_id'].nunique()} sweeps. Data: {', '.join(sorted(ctx.every_run['data'].astype(str).unique()))}.")
    r.table("s11_versions", tables.versions_table(ctx.every_run), caption="Package versions, from the `versions` tag.")
    shown_sweeps = set(zip(ctx.every_run["experiment"], ctx.every_run["sweep_id"]))
    others = study.all_runs[[pair not in shown_sweeps for pair in zip(study.all_runs["experiment"], study.all_runs["sweep_id"])]]
    if len(others):
        r.text("Other sweeps in the store, not in this report (`--sweep ID` shows one, `--all` pools them): " + ", ".join(
            f"`{s}` ({e}, {len(g)} runs)" for (e, s), g in others.groupby(["experiment", "sweep_id"])) + ".")
    left_out = ctx.every_run[~ctx.every_run["run_id"].isin(ctx.runs["run_id"])]
    if len(left_out):
        r.text("Runs left out of the statistics (diverged, or no finished epoch): " + ", ".join(
            f"`{row.run_id[:8]}` ({row.experiment}, {row.stopped_by})" for row in left_out.itertuples()) + ".")
    points = int(ctx.history[list(set(ctx.history.columns) - {"run_id", "epoch"})].notna().sum().sum())
    r.text(f"Read {len(study.all_runs)} runs and {points} metric points from `{study.uri}` in {study.fetch_seconds:.1f} s.")


def section_search(ctx: Context) -> None:
    present = [e for e in ("search-mlp", "search-cnn") if len(ctx.of(e))]
    if not present:
        return
    r = ctx.report
    r.heading(2, "12. Searches")
    for exp in present:
        top = ctx.of(exp).sort_values("min_val_loss").head(10)
        shown = pd.DataFrame({"dropout": top["dropout"].map(lambda v: f"{v:.3f}"), "lr": top["lr"].map(lambda v: f"{v:.2e}"),
                              "order": top["order"], "min val loss": top["min_val_loss"].map(lambda v: number(v, "loss")),
                              "epoch of min": top["min_val_epoch"].map(lambda v: number(v, "epoch")),
                              "test acc (%)": top["test_acc"].map(lambda v: number(v, "acc")),
                              "stopped": [tables.stop_summary(top.iloc[[i]]) for i in range(len(top))]})
        r.table(f"s12_{exp}", shown, top.drop(columns=["start_time", "end_time"]),
                caption=f"`{exp}`: the {len(top)} best of {len(ctx.of(exp))} trials by minimum validation loss.")


SECTIONS = ("0. Setup", "1. MLP dropout sweep", "2. CNN dropout sweep", "3. Train vs validation", "4. Test results",
            "5. BatchNorm ablation", "6. Dropout ablation", "7. Block order", "8. Dropout-rate analysis", "9. Seeds",
            "10. Scheduler efficiency", "11. Run inventory")


def build(study: Study, out: Path) -> Report:
    every_run = tables.summarize_runs(study.runs, study.history)
    runs, _ = tables.usable(every_run)
    ctx = Context(study, Report(out), runs, study.history, every_run)
    plan_comparisons(ctx)
    r = ctx.report
    r.heading(1, "Study report: BatchNorm and Dropout in small vision models")
    r.text(f"Generated by `python -m analysis report` from the MLflow store `{study.uri}`, showing {study.selection}: "
           f"{len(every_run)} runs of {every_run['experiment'].nunique()} experiments. Every number and figure below is "
           f"computed from those runs. Accuracies are in percent; each run's test metrics are those of its "
           f"best-validation epoch.")
    searches = "12. Searches" if runs["experiment"].isin(["search-mlp", "search-cnn"]).any() else None
    r.bullets([f"[{s}](#{anchor(s)})" for s in (*SECTIONS, searches) if s])
    section_setup(ctx)
    section_sweep(ctx, 1, "mlp")
    section_sweep(ctx, 2, "cnn")
    section_train_val(ctx)
    section_test(ctx)
    section_ablation(ctx, "5", "bn-ablation", "bn", "BN", "BatchNorm")
    section_ablation(ctx, "6", "dropout-ablation", "dropout", "dropout", "Dropout")
    section_order(ctx)
    section_rates(ctx)
    section_seeds(ctx)
    section_scheduler(ctx)
    section_inventory(ctx)
    section_search(ctx)
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


def write(study: Study, out: Path) -> Path:
    prepare_out(out)
    report = build(study, out)
    (out / "REPORT.md").write_text(report.markdown())
    (out / "REPORT.html").write_text(report.html())
    return out / "REPORT.md"
