"""The claims section's verdicts, from frames with known values: each rule gives each verdict it can."""

import numpy as np
import pandas as pd
import pytest

from analysis import claims
from tune.catalogue import CNN_FULL, MLP_FULL

RATES = [0.1, 0.3, 0.5, 0.7, 0.8, 0.9]


def run(experiment: str, model: str, dropout: float, order: str, seed: int, **metrics) -> dict:
    return {"experiment": experiment, "model": model, "dropout": dropout, "order": order, "seed": seed,
            "config_key": f"{experiment}-{model}-{dropout}-{order}", "stopped_by": "completed", "epochs": 100,
            "epochs_run": 100, "train_images": 40000.0, "min_val_loss": 1.0, "min_val_epoch": 10, "test_acc": 0.5,
            "test_loss": 1.0, "final_train_loss": 0.5} | metrics


def study(seeds: int = 3, noise: float = 0.001, **overrides) -> pd.DataFrame:
    """A study whose every claim holds clearly, unless `overrides` (name -> function of a row) change it."""
    rng = np.random.default_rng(0)
    rows = []
    for model, best_rate, acc, test_best in (("mlp", 0.8, 0.5643, 0.7), ("cnn", 0.5, 0.7478, 0.1)):
        for rate in RATES:
            for s in range(seeds):
                gap = abs(rate - best_rate)
                rows.append(run(f"dropout-{model}", model, rate, MLP_FULL if model == "mlp" else CNN_FULL, s,
                                min_val_loss=1 + gap + rng.normal(0, noise), min_val_epoch=int(10 + 50 * rate) + s % 2,
                                final_train_loss=0.2 + rate + rng.normal(0, noise),
                                # the reported accuracy at the validation-best rate; the test-best rate another
                                test_acc=acc + 0.05 * (abs(best_rate - test_best) - abs(rate - test_best))
                                + rng.normal(0, noise),
                                test_loss=1.0))
        full = MLP_FULL if model == "mlp" else CNN_FULL
        for s in range(seeds):
            e = rng.normal(0, noise, 4)
            rows += [run("bn-ablation", model, best_rate, full, s, test_acc=acc + e[0], final_train_loss=0.3 + e[1]),
                     run("bn-ablation", model, best_rate, full.replace("bn,", ""), s, test_acc=acc - 0.03 + e[2],
                         final_train_loss=0.5 + e[3])]
            sign = 1 if model == "mlp" else -1
            rows += [run("dropout-ablation", model, best_rate, full, s, test_acc=acc + e[0], final_train_loss=0.3 + e[1]),
                     run("dropout-ablation", model, 0.0, full.replace(",dropout", ""), s,
                         test_acc=acc - sign * 0.03 + e[2], final_train_loss=0.1 + e[3])]
    for s in range(seeds):
        e = rng.normal(0, noise, 3)
        rows += [run("order", "cnn", 0.5, CNN_FULL, s, test_acc=0.7478 + e[0]),
                 run("order", "cnn", 0.5, "relu,bn,dropout,pool", s, test_acc=0.7293 + e[1]),
                 run("order", "cnn", 0.5, "bn,relu,pool,dropout", s, test_acc=0.7478 + 0.002 + e[2])]
    runs = pd.DataFrame(rows)
    for column, change in overrides.items():
        runs[column] = [change(r) for r in runs.itertuples()]
    return runs


def verdicts(runs: pd.DataFrame, smoke: bool = False) -> dict[str, str]:
    judged = claims.judge(runs, smoke)
    assert set(judged["verdict"]) <= set(claims.VERDICTS)
    return {f"{r.claim} {r.statement}": r.verdict for r in judged.itertuples()}


def verdict(runs, claim: str, words: str = "", smoke=False) -> str:
    found = [v for k, v in verdicts(runs, smoke).items() if k.startswith(claim + " ") and words in k]
    assert len(found) == 1, (claim, words, found)
    return found[0]


def test_a_clear_study_with_seeds_reproduces_every_claim():
    v = verdicts(study())
    assert len(v) == len(claims.CLAIMS) == 22
    assert set(v.values()) == {"reproduced"}, {k: x for k, x in v.items() if x != "reproduced"}


def test_one_seed_is_at_most_consistent():
    v = verdicts(study(seeds=1))
    assert "reproduced" not in v.values()
    # C3's single values: within 1 point of the reported figures, so consistent too
    assert set(v.values()) == {"consistent"}, {k: x for k, x in v.items() if x != "consistent"}


@pytest.mark.parametrize("claim, words, change", [
    ("C1", "", lambda r: 0.5 if r.experiment == "dropout-mlp" and r.dropout == 0.3 else r.min_val_loss),
    ("C3", "MLP", lambda r: 0.50 if r.experiment == "dropout-mlp" and r.dropout == 0.8 else r.test_acc),
    ("C6", "CNN: removing BatchNorm worsens", lambda r: 0.9 if r.experiment == "bn-ablation" and r.model == "cnn"
     and "bn" not in r.order else r.test_acc),
    ("C8", "", lambda r: 0.80 if r.order == "relu,bn,dropout,pool" else r.test_acc),
    ("C9", "", lambda r: 0.70 if r.order == "bn,relu,pool,dropout" else r.test_acc),
])
def test_an_effect_against_the_claim_contradicts_it(claim, words, change):
    column = {"C1": "min_val_loss"}.get(claim, "test_acc")
    assert verdict(study(**{column: change}), claim, words) == "contradicted"


def test_trends_and_best_rates_against_the_claim():
    flat = study(final_train_loss=lambda r: 1.0 - r.dropout)  # falls with the rate: C10 contradicted
    assert verdict(flat, "C10", "MLP") == "contradicted"
    same = study(test_acc=lambda r: 0.6 - abs(r.dropout - 0.8) if r.experiment == "dropout-mlp" else r.test_acc)
    assert verdict(same, "C5", "MLP") == "contradicted"  # the validation-best rate is also test-best


def test_a_tie_inside_the_confidence_interval_is_only_consistent():
    noisy = study(noise=0.05)  # rates 0.7 and 0.9 lie inside 0.8's interval
    assert verdict(noisy, "C1") == "consistent"
    # with BN ahead by 1.7 points on average, but the seeds overlap: the claim's direction, not significant
    spread = {True: [0.55, 0.56, 0.50], False: [0.52, 0.53, 0.51]}
    overlap = study(test_acc=lambda r: spread["bn" in r.order][r.seed] if r.experiment == "bn-ablation"
                    and r.model == "mlp" else r.test_acc)
    assert verdict(overlap, "C6", "MLP: removing BatchNorm worsens") == "consistent"


def test_not_testable_smoke_missing_arms_cut_trials_and_budget():
    assert set(verdicts(study(), smoke=True).values()) == {"not testable"}
    no_orders = study()
    no_orders = no_orders[no_orders["experiment"] != "order"]
    assert verdict(no_orders, "C8") == verdict(no_orders, "C9") == "not testable"
    # a trial the scheduler cut is no final result: with 0.8 cut, C1 cannot be judged
    cut = study(stopped_by=lambda r: "scheduler" if r.experiment == "dropout-mlp" and r.dropout == 0.8 else "completed")
    assert verdict(cut, "C1") == "not testable"
    # exact 100-epoch figures need the study's budget; direction claims say at which budget they were judged
    short = study(epochs=lambda r: 20, epochs_run=lambda r: 20)
    judged = claims.judge(short, smoke=False)
    c3 = judged[judged["claim"] == "C3"]
    assert set(c3["verdict"]) == {"not testable"} and c3["why"].str.contains("measured at 20 epochs").all()
    others = judged[judged["claim"] != "C3"]
    assert set(others["verdict"]) == {"reproduced"} and others["why"].str.contains("at 20 epochs, not the study's 100").all()
    assert (judged["budget"] == "20 epochs, 40,000 training images, 3 seeds").all()


def test_comparisons_and_the_header_count_only_runs_that_ran_their_whole_budget():
    """A killed arm (an interrupted study) must not be compared with a completed one: unequal budgets."""
    from analysis import report
    from tune import catalogue

    runs = study(seeds=1)
    killed = (runs["experiment"] == "bn-ablation") & (runs["model"] == "cnn") & ~runs["order"].str.contains("bn")
    runs.loc[killed, ["stopped_by", "epochs_run"]] = ["killed", 29]
    ctx = report.Context(study=None, report=None, runs=runs, history=None, every_run=runs)
    report.plan_comparisons(ctx, [catalogue.CATALOGUE["bn-ablation"]])
    assert [c.name for c in ctx.comparisons] == ["BN vs no-BN on the MLP"]
    assert claims.judge(runs, False)["verdict"].tolist().count("not testable") >= 2  # both CNN BN claims

    runs = runs.assign(run_id=[str(i) for i in range(len(runs))], git_commit="abc", start_time=pd.Timestamp(0),
                       end_time=pd.Timestamp(60, unit="s"))
    header = report.provenance(runs, False, "cmd", "here")
    mlp, cnn = (runs["model"] == "mlp").sum(), (runs["model"] == "cnn").sum()
    assert header["runs_with_whole_budget"] == f"mlp {mlp} of {mlp}, cnn {cnn - killed.sum()} of {cnn}"


def test_a_comparison_table_says_which_arms_stopped_short():
    from analysis import report

    runs = study(seeds=1).assign(run_id=lambda r: [str(i) for i in range(len(r))])
    assert report.budget_note(runs) == "Every arm ran its whole budget."
    runs.loc[:1, "stopped_by"] = "killed"
    assert report.budget_note(runs).startswith(f"2 of {len(runs)} runs stopped before their whole budget")
