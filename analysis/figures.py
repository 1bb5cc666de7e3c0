"""The report's figures: matplotlib on the Agg backend, one PNG each, drawn from the tables' frames."""

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110
STOP_MARK = dict(marker="x", color="black", s=36, zorder=5, linewidths=1.5)


@dataclass
class Line:
    label: str
    curve: pd.DataFrame
    """epoch, mean, std, n (tables.curve)"""
    color: object = None
    style: str = "-"
    ends: pd.DataFrame | None = None
    """epoch and value of the seeds the scheduler stopped: marked with an x"""


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line]
    scale: float = 1.0
    """100 draws a fraction as percent"""
    mark_epoch: int | None = None
    """a dotted vertical line: the epoch of minimum validation loss"""


def ordered_colors(n: int) -> list:
    """Colors for an ordered variable (a dropout rate): dark to light, without viridis' pale yellow end."""
    return [plt.cm.viridis(x) for x in np.linspace(0.0, 0.85, max(n, 1))][:n]


def category_colors(n: int) -> list:
    cmap = plt.cm.tab10 if n <= 10 else plt.cm.tab20
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def curves(path: Path, title: str, panels: list[Panel], legend_title: str | None = None) -> Path:
    """Metric against epoch, one panel per metric, one line per group (mean over seeds, band: +-1 std)."""
    cols = min(len(panels), 2)
    rows = (len(panels) + cols - 1) // cols
    n_labels = len({line.label for p in panels for line in p.lines})
    legend_width = 2.4 if n_labels <= 12 else 3.6
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + legend_width, 3.6 * rows), squeeze=False,
                             layout="constrained")
    handles, stopped, banded = {}, False, False
    for ax, panel in zip(axes.flat, panels):
        for line in panel.lines:
            c = line.curve
            if c.empty:
                continue
            y = c["mean"] * panel.scale
            (h,) = ax.plot(c["epoch"], y, line.style, color=line.color, lw=1.6, label=line.label,
                           marker="o" if len(c) <= 3 else None, ms=3)
            handles.setdefault(line.label, h)
            spread = c["n"] >= 2
            if spread.any():
                band = (c["std"] * panel.scale).where(spread)
                ax.fill_between(c["epoch"], y - band, y + band, color=h.get_color(), alpha=0.18, lw=0)
                banded = True
            if line.ends is not None and len(line.ends):
                ax.scatter(line.ends["epoch"], line.ends.iloc[:, -1] * panel.scale, **STOP_MARK)
                stopped = True
        if panel.mark_epoch:
            ax.axvline(panel.mark_epoch, color="0.35", ls=":", lw=1.3)
            # The label goes on the side of the line with more room.
            left = panel.mark_epoch > np.mean(ax.get_xlim())
            ax.annotate(f"min val loss\nepoch {panel.mark_epoch}", (panel.mark_epoch, 1), xycoords=("data", "axes fraction"),
                        xytext=(-4 if left else 4, -4), textcoords="offset points", va="top",
                        ha="right" if left else "left", fontsize=8, color="0.25")
        if len(panels) > 1:
            ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    extra = []
    if stopped:
        extra.append(Line2D([], [], ls="", marker="x", color="black", label="stopped by the scheduler"))
    if banded:
        extra.append(plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=0.25, label="±1 std over seeds"))
    if handles or extra:
        fig.legend(list(handles.values()) + extra, list(handles) + [e.get_label() for e in extra], loc="outside right upper",
                   title=legend_title, fontsize=8 if n_labels <= 12 else 7, title_fontsize=9,
                   ncols=1 if n_labels <= 24 else 2)
    return _save(fig, path, title)


def against_rate(path: Path, title: str, ylabel: str, series: dict[str, pd.DataFrame], scale: float = 1.0,
                 xlabel: str = "dropout rate", integer_y: bool = False) -> Path:
    """One line per series (x, mean, std, stopped) over the dropout rate; error bars are +-1 std over seeds
    where there are several; an x marks a configuration the scheduler stopped."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    stopped = False
    for (label, s), color in zip(series.items(), category_colors(len(series))):
        s = s.sort_values("x")
        err = (s["std"] * scale).fillna(0) if "std" in s else None
        ax.errorbar(s["x"], s["mean"] * scale, yerr=err, marker="o", ms=4, capsize=3, lw=1.6, color=color, label=label)
        if "stopped" in s and s["stopped"].any():
            ax.scatter(s.loc[s["stopped"], "x"], s.loc[s["stopped"], "mean"] * scale, **STOP_MARK,
                       label=None if stopped else "stopped by the scheduler")
            stopped = True
    if integer_y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "stopped by the scheduler")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=9)
    return _save(fig, path, title)


def stop_epochs(path: Path, title: str, counts: pd.DataFrame, limits: dict[str, int]) -> Path:
    """Trials by the epoch they stopped at, stacked by why; one panel per experiment, its x axis up to
    `limits[experiment]` (the epochs a trial may run)."""
    experiments = sorted(counts["experiment"].unique())
    cols = min(3, len(experiments))
    rows = (len(experiments) + cols - 1) // cols
    reasons = sorted(counts["stopped_by"].unique())
    colors = dict(zip(reasons, category_colors(len(reasons))))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.8, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, exp in zip(axes.flat, experiments):
        table = counts[counts["experiment"] == exp].pivot_table(index="last_epoch", columns="stopped_by", values="trials",
                                                                 aggfunc="sum", fill_value=0)
        bottom = np.zeros(len(table))
        for reason in table.columns:
            ax.bar(table.index, table[reason], bottom=bottom, color=colors[reason], label=reason, width=0.7)
            bottom += table[reason].to_numpy()
        ax.set_title(exp, fontsize=10)
        ax.set_xlim(0.4, max(table.index.max(), limits.get(exp, 1)) + 0.6)
        ax.set_xlabel("last epoch run")
        ax.set_ylabel("trials")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(experiments):]:
        ax.set_visible(False)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in reasons], reasons, loc="outside right upper",
               title="stopped by", fontsize=8)
    return _save(fig, path, title)
