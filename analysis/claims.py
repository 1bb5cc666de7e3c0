"""The original study's claims, each judged against our runs by a written rule.

The study: 100 epochs, batch 100, Adam at lr 1e-3, hidden 1024, the last 10,000 training images
for validation (40,000 to train), test metrics at the best-validation epoch, one seed.

Only runs that ran their whole budget count (`stopped_by=completed`): a trial the scheduler cut
is not a final result. Each verdict is one of VERDICTS, by the rule of its kind in RULES.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import tables
from tune.catalogue import CNN_FULL, CNN_RATE, MLP_RATE

ALPHA = tables.ALPHA
STUDY_EPOCHS, STUDY_TRAIN_IMAGES = 100, 40000
NULL_MARGIN = 0.01  # "no real difference": under 1 point of test accuracy
VALUE_MARGIN = 0.01  # one seed "consistent" with a reported accuracy: within 1 point of it
VERDICTS = ("reproduced", "consistent", "contradicted", "not testable")
RULES = {
    "direction": "reproduced: ≥2 seeds a side and the difference in the claim's direction with Welch p < 0.05; "
                 "consistent: the difference in the claim's direction without that; contradicted: against it.",
    "best": "reproduced: ≥2 seeds per rate, the claimed rate has the best mean and every other rate's mean lies "
            "outside its 95% CI; consistent: the claimed rate has the best mean, or (≥2 seeds) its 95% CI holds the "
            "best mean; contradicted: otherwise.",
    "value": f"testable only at the study's budget ({STUDY_EPOCHS} epochs, {STUDY_TRAIN_IMAGES:,} training images); "
             "reproduced: ≥2 seeds and the reported accuracy inside our 95% CI; consistent: one seed within "
             f"{NULL_MARGIN * 100:g} point of it; contradicted: otherwise.",
    "differ": "reproduced: ≥2 seeds, the validation-best and test-best rates differ, and the test-best rate's test "
              "accuracy beats the validation-best's with Welch p < 0.05; consistent: the two rates differ; "
              "contradicted: they are the same rate.",
    "trend": "reproduced: ≥2 seeds per rate and Spearman's ρ over the completed runs of the claim's sign with "
             "p < 0.05; consistent: ρ of the claim's sign; contradicted: ρ of the other sign or 0; "
             "not testable: fewer than 3 rates completed.",
    "null": f"reproduced: ≥2 seeds a side, |difference| < {NULL_MARGIN * 100:g} point and Welch p ≥ 0.05; "
            f"consistent: |difference| < {NULL_MARGIN * 100:g} point; contradicted: otherwise.",
    "every": "the direction rule at every dropout rate both models completed: reproduced if reproduced at every "
             "rate, contradicted if contradicted at any, else consistent.",
}


@dataclass(frozen=True)
class Finding:
    ours: str
    verdict: str
    why: str = ""
    runs: pd.DataFrame | None = None
    """the runs the finding used: its budget is read from them"""


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    original: str
    rule: str
    judge: Callable[["Evidence"], Finding]


class Evidence:
    """The completed runs of each experiment, and the study's arms picked from them."""

    def __init__(self, runs: pd.DataFrame):
        self.runs = tables.full_budget(runs)

    def of(self, experiment: str, model: str | None = None, **fields) -> pd.DataFrame:
        r = self.runs[self.runs["experiment"] == experiment]
        if model is not None:
            r = r[r["model"] == model]
        for name, value in fields.items():
            r = r[np.isclose(r[name], value)] if isinstance(value, float) else r[r[name] == value]
        return r

    def grid(self, model: str) -> pd.DataFrame:
        return self.of(f"dropout-{model}", model)


def acc(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value * 100:.2f}%"


def stat_acc(s: tables.Stat) -> str:
    if s.n >= 2 and np.isfinite(s.ci_low):
        return f"{s.mean * 100:.2f}% [{s.ci_low * 100:.2f}, {s.ci_high * 100:.2f}]"
    return acc(s.mean)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def missing(*frames: pd.DataFrame, what: str) -> Finding | None:
    if any(f.empty for f in frames):
        return Finding("–", "not testable", f"no completed run of {what}")
    return None


def seeds(*frames: pd.DataFrame) -> int:
    return min(int(f.groupby("config_key").size().min()) for f in frames)


# --- the rules -----------------------------------------------------------------------------


def direction(a: pd.DataFrame, b: pd.DataFrame, metric: str, sign: int, label: str, what: str) -> Finding:
    """The claim: `metric` of a minus b has `sign` (+1: a is higher)."""
    if (f := missing(a, b, what=what)) is not None:
        return f
    c = tables.compare("claims", label, metric, a[metric], b[metric])
    scale, unit = (100, " points") if metric.endswith("acc") else (1, "")
    ours = f"{label}: {c.diff * scale:+.2f}{unit} ({c.a.n} vs {c.b.n} seeds" + (
        f", p = {c.p:.3g})" if np.isfinite(c.p) else ")")
    if not np.isfinite(c.diff) or np.sign(c.diff) != sign:
        return Finding(ours, "contradicted", "the difference points the other way"
                       + (" (significant)" if np.isfinite(c.p) and c.p < ALPHA else ""), pd.concat([a, b]))
    if c.testable and np.isfinite(c.p) and c.p < ALPHA:
        return Finding(ours, "reproduced", "", pd.concat([a, b]))
    return Finding(ours, "consistent", "in the claim's direction" + (
        ", not significant" if c.testable else ", one seed"), pd.concat([a, b]))


def best(grid: pd.DataFrame, rate: float, what: str) -> Finding:
    """The claim: `rate` has the lowest minimum validation loss on the grid."""
    if (f := missing(grid, what=what)) is not None:
        return f
    per_rate = {r: tables.stat(g["min_val_loss"]) for r, g in grid.groupby("dropout")}
    winner = min(per_rate, key=lambda r: per_rate[r].mean)
    ours = f"best {winner:g} (min val loss {per_rate[winner].mean:.4f}, {len(per_rate)} rates completed)"
    claimed = next((per_rate[r] for r in per_rate if math.isclose(r, rate)), None)
    if claimed is None:
        return Finding(ours, "not testable", f"rate {rate:g} did not complete (cut by the scheduler or not run)", grid)
    n = seeds(grid)
    is_best = math.isclose(winner, rate)
    if n >= 2 and is_best and all(not claimed.ci_low <= s.mean <= claimed.ci_high
                                  for r, s in per_rate.items() if not math.isclose(r, rate)):
        return Finding(ours, "reproduced", "", grid)
    if is_best:
        return Finding(ours, "consistent", "best by mean" + (", others inside its CI" if n >= 2 else ", one seed"), grid)
    if n >= 2 and claimed.ci_low <= per_rate[winner].mean <= claimed.ci_high:
        return Finding(ours, "consistent", f"{rate:g}'s 95% CI holds the best mean", grid)
    return Finding(ours, "contradicted", f"{winner:g} is best, not {rate:g}", grid)


def value(runs: pd.DataFrame, reported: float, what: str) -> Finding:
    """The claim: test accuracy equals `reported` at the study's budget."""
    if (f := missing(runs, what=what)) is not None:
        return f
    s, loss = tables.stat(runs["test_acc"]), tables.stat(runs["test_loss"])
    ours = f"test acc {stat_acc(s)}, test loss {loss.mean:.4f} ({plural(s.n, 'seed')})"
    epochs, images = int(runs["epochs"].max()), runs["train_images"].min()
    if epochs < STUDY_EPOCHS or not images >= STUDY_TRAIN_IMAGES:  # unknown (NaN) is not the study's budget
        return Finding(ours, "not testable", f"a {STUDY_EPOCHS}-epoch figure; measured at {epochs} epochs on "
                                             f"{images:,.0f} training images", runs)
    if s.n >= 2 and np.isfinite(s.ci_low):
        inside = s.ci_low <= reported <= s.ci_high
        return Finding(ours, "reproduced" if inside else "contradicted",
                       "" if inside else "the reported value is outside our 95% CI", runs)
    close = abs(s.mean - reported) <= VALUE_MARGIN
    return Finding(ours, "consistent" if close else "contradicted",
                   f"one seed, {'within' if close else 'more than'} {VALUE_MARGIN * 100:g} point", runs)


def differ(grid: pd.DataFrame, what: str) -> Finding:
    """The claim: the rate best on validation is not the rate best on test."""
    if (f := missing(grid, what=what)) is not None:
        return f
    means = grid.groupby("dropout")[["min_val_loss", "test_acc"]].mean()
    val_best, test_best = means["min_val_loss"].idxmin(), means["test_acc"].idxmax()
    ours = f"validation-best {val_best:g}, test-best {test_best:g}"
    if math.isclose(val_best, test_best):
        return Finding(ours, "contradicted", "the same rate is best on both", grid)
    a, b = grid[np.isclose(grid["dropout"], test_best)], grid[np.isclose(grid["dropout"], val_best)]
    p = tables.welch_p(a["test_acc"], b["test_acc"])
    if seeds(grid) >= 2 and np.isfinite(p) and p < ALPHA:
        return Finding(ours + f" (p = {p:.3g})", "reproduced", "", grid)
    return Finding(ours, "consistent", "the rates differ" + (", not significant" if seeds(grid) >= 2 else ", one seed"),
                   grid)


def trend(grid: pd.DataFrame, metric: str, sign: int, label: str, what: str) -> Finding:
    """The claim: `metric` rises (sign +1) with the dropout rate."""
    if (f := missing(grid, what=what)) is not None:
        return f
    if grid["dropout"].nunique() < 3:
        return Finding("–", "not testable", f"{grid['dropout'].nunique()} rates completed; a trend needs 3", grid)
    rho, p = tables.spearman(grid["dropout"], grid[metric])
    if not np.isfinite(rho):
        return Finding(f"{label}: every run has the same value", "not testable", "ρ is undefined without variation", grid)
    ours = f"{label}: Spearman ρ = {rho:+.2f} (p = {p:.3g}, {len(grid)} runs)"
    if np.sign(rho) != sign:
        return Finding(ours, "contradicted", "ρ has the other sign or is 0", grid)
    if seeds(grid) >= 2 and p < ALPHA:
        return Finding(ours, "reproduced", "", grid)
    return Finding(ours, "consistent", "ρ of the claim's sign" + (", not significant" if seeds(grid) >= 2 else ", one seed"),
                   grid)


def null(a: pd.DataFrame, b: pd.DataFrame, label: str, what: str) -> Finding:
    """The claim: a and b differ by less than NULL_MARGIN in test accuracy."""
    if (f := missing(a, b, what=what)) is not None:
        return f
    c = tables.compare("claims", label, "test_acc", a["test_acc"], b["test_acc"])
    ours = f"{label}: {c.diff * 100:+.2f} points ({c.a.n} vs {c.b.n} seeds" + (f", p = {c.p:.3g})" if np.isfinite(c.p) else ")")
    small = abs(c.diff) < NULL_MARGIN
    if small and c.testable and np.isfinite(c.p) and c.p >= ALPHA:
        return Finding(ours, "reproduced", "", pd.concat([a, b]))
    if small and not (c.testable and np.isfinite(c.p) and c.p < ALPHA):
        return Finding(ours, "consistent", "under 1 point" + (", one seed" if not c.testable else ""), pd.concat([a, b]))
    return Finding(ours, "contradicted", "1 point or more, or significant", pd.concat([a, b]))


def every_rate(e: Evidence) -> Finding:
    mlp, cnn = e.grid("mlp"), e.grid("cnn")
    if (f := missing(mlp, cnn, what="both dropout grids")) is not None:
        return f
    rates = sorted(set(np.round(mlp["dropout"], 6)) & set(np.round(cnn["dropout"], 6)))
    if not rates:
        return Finding("–", "not testable", "no dropout rate completed in both grids")
    found = [direction(cnn[np.isclose(cnn["dropout"], r)], mlp[np.isclose(mlp["dropout"], r)], "test_acc", +1,
                       f"{r:g}", "") for r in rates]
    diffs = [tables.stat(cnn[np.isclose(cnn["dropout"], r)]["test_acc"]).mean
             - tables.stat(mlp[np.isclose(mlp["dropout"], r)]["test_acc"]).mean for r in rates]
    ours = (f"CNN − MLP test acc {min(diffs) * 100:+.1f} to {max(diffs) * 100:+.1f} points over {len(rates)} rates; "
            f"CNN {acc(cnn['test_acc'].mean())}, MLP {acc(mlp['test_acc'].mean())} on average")
    verdicts = [f.verdict for f in found]
    runs = pd.concat([mlp, cnn])
    if "contradicted" in verdicts:
        return Finding(ours, "contradicted", "at rate " + ", ".join(f.ours.split(":")[0] for f in found
                                                                     if f.verdict == "contradicted"), runs)
    if all(v == "reproduced" for v in verdicts):
        return Finding(ours, "reproduced", "", runs)
    return Finding(ours, "consistent", f"higher at every rate, significant at {verdicts.count('reproduced')} of {len(rates)}",
                   runs)


def ablation_arms(e: Evidence, experiment: str, model: str, token: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = e.of(experiment, model)
    has = tables.with_layer(runs, token) if len(runs) else pd.Series(dtype=bool)
    return runs[has], runs[~has]


def _ablation_claims() -> list[Claim]:
    out = []
    for model, name in (("mlp", "MLP"), ("cnn", "CNN")):
        def with_without(token, exp, model=model):
            return lambda e: ablation_arms(e, exp, model, token)

        bn, do = with_without("bn", "bn-ablation"), with_without("dropout", "dropout-ablation")
        out += [
            Claim("C6", f"{name}: removing BatchNorm worsens the final result.", "lower test accuracy without BN",
                  "direction", lambda e, bn=bn, name=name: direction(*bn(e), "test_acc", +1, "with − without BN",
                                                                      f"both {name} arms of bn-ablation")),
            Claim("C6", f"{name}: removing BatchNorm slows convergence.", "higher train loss without BN",
                  "direction", lambda e, bn=bn, name=name: direction(*bn(e), "final_train_loss", -1,
                                                                      "final train loss, with − without BN",
                                                                      f"both {name} arms of bn-ablation")),
            Claim("C7", f"{name}: removing dropout speeds up convergence on the training set.",
                  "lower train loss without dropout", "direction",
                  lambda e, do=do, name=name: direction(*do(e), "final_train_loss", +1,
                                                        "final train loss, with − without dropout",
                                                        f"both {name} arms of dropout-ablation")),
        ]
    out += [
        Claim("C7", "MLP: dropout improves test accuracy.", "higher with dropout", "direction",
              lambda e: direction(*ablation_arms(e, "dropout-ablation", "mlp", "dropout"), "test_acc", +1,
                                  "with − without dropout", "both MLP arms of dropout-ablation")),
        Claim("C7", "CNN: dropout lowers test accuracy.", "lower with dropout", "direction",
              lambda e: direction(*ablation_arms(e, "dropout-ablation", "cnn", "dropout"), "test_acc", -1,
                                  "with − without dropout", "both CNN arms of dropout-ablation")),
    ]
    return out


def _order(e: Evidence, order: str) -> pd.DataFrame:
    return e.of("order", "cnn", order=order)


CLAIMS: list[Claim] = [
    Claim("C1", "MLP: the best dropout rate by validation loss, on the grid 0.1–0.9, is 0.8.", f"{MLP_RATE:g}", "best",
          lambda e: best(e.grid("mlp"), MLP_RATE, "the MLP dropout grid")),
    Claim("C2", "CNN: the best dropout rate by validation loss is 0.5.", f"{CNN_RATE:g}", "best",
          lambda e: best(e.grid("cnn"), CNN_RATE, "the CNN dropout grid")),
    Claim("C3", f"MLP at {MLP_RATE:g}: test loss 1.3157, test accuracy 56.43%.", "56.43% (loss 1.3157)", "value",
          lambda e: value(e.grid("mlp").pipe(lambda g: g[np.isclose(g["dropout"], MLP_RATE)]), 0.5643,
                          f"the MLP at {MLP_RATE:g}")),
    Claim("C3", f"CNN at {CNN_RATE:g}: test loss 0.7572, test accuracy 74.78%.", "74.78% (loss 0.7572)", "value",
          lambda e: value(e.grid("cnn").pipe(lambda g: g[np.isclose(g["dropout"], CNN_RATE)]), 0.7478,
                          f"the CNN at {CNN_RATE:g}")),
    Claim("C4", "The CNN is far better than the MLP at every dropout rate.", "about 75% against about 55%", "every",
          every_rate),
    Claim("C5", "MLP: the rate best on validation is not the rate best on test.", "validation 0.8, test 0.7", "differ",
          lambda e: differ(e.grid("mlp"), "the MLP dropout grid")),
    Claim("C5", "CNN: the rate best on validation is not the rate best on test.", "validation 0.5, test 0.1", "differ",
          lambda e: differ(e.grid("cnn"), "the CNN dropout grid")),
    *_ablation_claims(),
    Claim("C8", "ReLU before BN (conv, relu, bn, dropout, pool) is slightly worse than BN before ReLU.",
          "72.93% against 74.78%", "direction",
          lambda e: direction(_order(e, "relu,bn,dropout,pool"), _order(e, CNN_FULL), "test_acc", -1,
                              "relu,bn − bn,relu", "both orders in `order`")),
    Claim("C9", "Swapping MaxPool and Dropout (conv, bn, relu, pool, dropout) makes no real difference.",
          "no real difference", "null",
          lambda e: null(_order(e, "bn,relu,pool,dropout"), _order(e, CNN_FULL), "pool,dropout − dropout,pool",
                         "both orders in `order`")),
    *[Claim("C10", f"{name}: a higher dropout rate converges more slowly: the final train loss rises with the rate.",
            "rises with the rate", "trend",
            lambda e, m=m, name=name: trend(e.grid(m), "final_train_loss", +1, "rate vs final train loss",
                                            f"the {name} dropout grid"))
      for m, name in (("mlp", "MLP"), ("cnn", "CNN"))],
    *[Claim("C11", f"{name}: a higher dropout rate gives a later best epoch.", "later with the rate", "trend",
            lambda e, m=m, name=name: trend(e.grid(m), "min_val_epoch", +1, "rate vs best epoch",
                                            f"the {name} dropout grid"))
      for m, name in (("mlp", "MLP"), ("cnn", "CNN"))],
    Claim("C12", "The CNN favours low dropout, the MLP high dropout.", f"CNN {CNN_RATE:g} or lower, MLP {MLP_RATE:g}",
          "direction", lambda e: favours(e)),
]


def favours(e: Evidence) -> Finding:
    """Judged as a direction: the MLP's best rate minus the CNN's, over seeds (each seed's best rate)."""
    mlp, cnn = e.grid("mlp"), e.grid("cnn")
    if (f := missing(mlp, cnn, what="both dropout grids")) is not None:
        return f

    def best_rates(grid):
        """Each seed's best run: one sample of "the best rate" per seed."""
        return grid.sort_values("min_val_loss").drop_duplicates("seed").assign(config_key=f"best {grid['model'].iloc[0]}")

    return direction(best_rates(mlp), best_rates(cnn), "dropout", +1, "MLP's best rate − CNN's", "both dropout grids")


def budget(runs: pd.DataFrame | None) -> str:
    if runs is None or runs.empty:
        return "–"
    epochs = sorted(set(runs["epochs"].astype(int)))
    images = sorted(set(runs["train_images"].dropna().astype(int))) or ["?"]
    return (f"{'/'.join(map(str, epochs))} epochs, {'/'.join(f'{i:,}' if i != '?' else i for i in images)} training images, "
            f"{plural(seeds(runs), 'seed')}")


def judge(runs: pd.DataFrame, smoke: bool) -> pd.DataFrame:
    """One row per claim: the original figure, ours, the budget, the verdict and why."""
    e = Evidence(runs)
    rows = []
    for c in sorted(CLAIMS, key=lambda c: int(c.id[1:])):
        f = c.judge(e)
        verdict, why = f.verdict, f.why
        if smoke:
            verdict, why = "not testable", "smoke-sized runs show the pipeline works; they are not evidence"
        elif verdict != "not testable" and f.runs is not None and int(f.runs["epochs"].max()) < STUDY_EPOCHS:
            epochs = "/".join(str(e) for e in sorted(set(f.runs["epochs"].astype(int))))
            why = (why + "; " if why else "") + f"at {epochs} epochs, not the study's {STUDY_EPOCHS}"
        rows.append({"claim": c.id, "statement": c.text, "original": c.original, "ours": f.ours,
                     "budget": budget(f.runs), "verdict": verdict, "why": why, "rule": c.rule})
    return pd.DataFrame(rows)
