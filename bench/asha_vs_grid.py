"""asha-vs-grid: the MLP dropout grid (9 rates) on real CIFAR-10 under FIFO and under ASHA.

Both sweeps are the real CLI (`python -m tune sweep dropout-mlp`), one CPU per trial, with
everything but the scheduler the same; ASHA runs with the catalogue's defaults. Each trial's
curve comes from its result.json lines. From the FIFO curves this benchmark also replays
Ray's ASHA offline for a grid of (grace period, reduction factor): the rung rule of
ray.tune.schedulers.AsyncHyperBandScheduler, trials started in grid order on as many slots
as the sweep had, every epoch taking one time unit; and again ORDERINGS times with each trial
running at its own speed (1 +- 5% units an epoch), for the other arrival orders at the rungs
that a real sweep's noise makes. The replay picks the cheapest setting that keeps the winner's
test accuracy within 0.5 points in 95% of those orders; the full variant confirms it with a
real ASHA run when it differs from the defaults.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

NAME = "asha-vs-grid"
TARGETS = {"epoch_fraction": ("<=", 0.4), "winner_gap_test_acc": ("<=", 0.5)}
EXPERIMENT = "dropout-mlp"
SIZES = {
    # The protocol: 20 epochs on the full 40k/10k/10k split.
    "full": {"sets": {"epochs": 20}, "confirm_recommended": True},
    # A subset and fewer epochs, so both sweeps fit in a few minutes on 2 cores.
    "quick": {"sets": {"epochs": 10, "limit": 3000, "eval_limit": 1000}, "confirm_recommended": False},
}
# Up to most of the run: on this grid the winner survives only with a long grace period.
# At 20 epochs: grace periods 1, 2, 3, 4, 6, 8, 9, 10, 12, 14, 16.
GRACE_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8)
REDUCTION_FACTORS = (2, 3, 4)
# Replays per setting with each trial's epochs lasting its own 1 +- JITTER time units: the
# arrival orders at the rungs that a real sweep's noise makes. A setting is recommended only if
# it keeps the winner's accuracy in KEEPS_WINNER of them.
ORDERINGS, JITTER, KEEPS_WINNER = 100, 0.05, 0.95
REPLAY_COLUMNS = ["grace", "rf", "epoch_fraction", "winner_dropout", "same_winner", "gap_points", "keeps_winner"]


def sweep(name: str, scheduler: str, sets: dict, data: str, data_dir: str, workdir: Path, extra=()) -> dict:
    """Run one sweep with the CLI; return its trials' result lines and its wall time."""
    cmd, env = common.sweep_command(EXPERIMENT, name, data, data_dir, workdir, sets, "--scheduler", scheduler, *extra)
    print(f"  {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    header = next((line for line in proc.stderr.splitlines() if line.startswith(f"sweep {name}:")), "")
    trials = []
    for result_file in sorted((workdir / "ray_results" / name).glob("*/result.json")):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        params = json.loads((result_file.parent / "params.json").read_text())["trial"]
        trials.append({"dropout": float(params["dropout"]), "trial_id": result_file.parent.name,
                       "curve": [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "val_acc", "best_val_loss",
                                                     "best_epoch", "test_acc", "time_this_iter_s", "time_total_s")}
                                 for r in lines]})
    trials.sort(key=lambda t: t["dropout"])
    return {"trials": trials, "wall_seconds": wall, "header": header}


def summary(run: dict) -> dict:
    """Trial-epochs, the winner (lowest best_val_loss) and its test accuracy at its best epoch."""
    last = [t["curve"][-1] | {"dropout": t["dropout"]} for t in run["trials"]]
    winner = min(last, key=lambda r: r["best_val_loss"])
    return {"trial_epochs": sum(r["epoch"] for r in last), "wall_seconds": run["wall_seconds"],
            "trial_seconds": sum(r["time_total_s"] for r in last),
            "winner_dropout": winner["dropout"], "winner_best_val_loss": winner["best_val_loss"],
            "winner_best_epoch": winner["best_epoch"], "winner_test_acc": winner["test_acc"],
            "epochs_run": {r["dropout"]: r["epoch"] for r in last},
            "best_epochs": {r["dropout"]: r["best_epoch"] for r in last}}


class Bracket:
    """ray.tune.schedulers.async_hyperband._Bracket (one bracket, stop_last_trials=True), for replays."""

    def __init__(self, grace: int, max_t: int, rf: int):
        self.rf = rf
        n_rungs = int(np.log(max_t / grace) / np.log(rf) + 1)
        self.rungs = [(grace * rf**k, {}) for k in reversed(range(n_rungs))]

    def on_result(self, trial: int, epoch: int, reward: float) -> bool:
        """True to stop the trial."""
        for milestone, recorded in self.rungs:
            if epoch < milestone or trial in recorded:
                continue
            stop = bool(recorded) and reward < np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100)
            recorded[trial] = reward
            return stop
        return False


def replay(trials: list[dict], grace: int, rf: int, slots: int, rng: random.Random | None = None) -> dict:
    """Successive halving on recorded curves: which epoch each trial would have stopped at.

    Every epoch takes one time unit (the trials are one network at one speed), or with `rng`
    each trial's epochs take its own 1 +- JITTER units, as processes sharing a machine run at
    their own speeds. Trials that start together then reach a rung in either order, as they do
    in a real sweep, and on a close grid that order can decide who passes.
    """
    max_t = max(len(t["curve"]) for t in trials)
    bracket = Bracket(grace, max_t, rf)
    pending = list(range(len(trials)))
    running: dict[int, tuple[float, int]] = {}  # trial -> (time its next epoch ends, that epoch)
    stopped_at, speed = {}, {}
    now = 0.0

    def start(i, at):
        speed[i] = 1.0 + (rng.uniform(-JITTER, JITTER) if rng else 0.0)
        running[i] = (at + speed[i], 1)

    while pending and len(running) < slots:
        start(pending.pop(0), now)
    while running:
        i, (now, epoch) = min(running.items(), key=lambda kv: (kv[1][0], kv[0]))
        row = trials[i]["curve"][epoch - 1]
        done = epoch >= max_t or epoch == len(trials[i]["curve"])
        if not done and bracket.on_result(i, epoch, -row["best_val_loss"]):
            done = True
        if done:
            stopped_at[i] = epoch
            del running[i]
            if pending:
                start(pending.pop(0), now)
        else:
            running[i] = (now + speed[i], epoch + 1)
    last = {i: trials[i]["curve"][e - 1] for i, e in stopped_at.items()}
    win = min(last, key=lambda i: last[i]["best_val_loss"])
    return {"trial_epochs": sum(stopped_at.values()), "winner_dropout": trials[win]["dropout"],
            "winner_test_acc": last[win]["test_acc"]}


def replays(fifo: dict, slots: int) -> list[dict]:
    """One row per (grace, rf): the replay in grid order, and the share of ORDERINGS jittered replays
    that keep the winner's accuracy."""
    full = summary(fifo)
    max_t = max(len(t["curve"]) for t in fifo["trials"])
    bound = TARGETS["winner_gap_test_acc"][1]
    rows = []
    for rf in REDUCTION_FACTORS:
        for grace in sorted({max(1, round(f * max_t)) for f in GRACE_FRACTIONS} - {max_t}):
            r = replay(fifo["trials"], grace, rf, slots)
            rng = random.Random(grace * 100 + rf)
            jittered = [replay(fifo["trials"], grace, rf, slots, rng) for _ in range(ORDERINGS)]
            rows.append({"grace": grace, "rf": rf, "epoch_fraction": r["trial_epochs"] / full["trial_epochs"],
                         "winner_dropout": r["winner_dropout"], "same_winner": r["winner_dropout"] == full["winner_dropout"],
                         "gap_points": 100 * (full["winner_test_acc"] - r["winner_test_acc"]),
                         "keeps_winner": sum(100 * (full["winner_test_acc"] - j["winner_test_acc"]) <= bound
                                             for j in jittered) / ORDERINGS})
    return rows


def recommend(rows: list[dict]) -> dict:
    """The fewest epochs that keep the winner's accuracy (gap <= 0.5 points) in KEEPS_WINNER of the
    arrival orders; else the setting that keeps it most often."""
    keeps = [r for r in rows if r["keeps_winner"] >= KEEPS_WINNER]
    if keeps:
        return min(keeps, key=lambda r: (r["epoch_fraction"], r["grace"]))
    return max(rows, key=lambda r: (r["keeps_winner"], -r["epoch_fraction"]))


def replay_only(path: str, slots: int) -> dict:
    """--replay: the replay table from a saved result's FIFO curves, in seconds and without a sweep."""
    saved = json.loads(Path(path).read_text())
    trials = []
    for d, curve in sorted(saved["details"]["curves"].items(), key=lambda kv: float(kv[0])):
        best_epoch, rows = 0, []
        for r in curve:  # older results saved fewer fields
            best_epoch = r["epoch"] if r["val_loss"] <= r["best_val_loss"] else best_epoch
            rows.append({"time_total_s": float(r["epoch"]), "best_epoch": best_epoch, **r})
        trials.append({"dropout": float(d), "curve": rows})
    rows = replays({"trials": trials, "wall_seconds": 0.0}, slots)
    best = recommend(rows)
    print(f"offline replay of ASHA on the FIFO curves of {path} ({slots} trials at a time):")
    print(common.table(rows, REPLAY_COLUMNS))
    epochs = max(len(t["curve"]) for t in trials)
    return {"benchmark": NAME, "variant": "replay", "source": path, "slots": slots,
            "replay_recommended": {"grace": best["grace"], "reduction_factor": best["rf"],
                                   "grace_fraction": best["grace"] / epochs, "epoch_fraction": best["epoch_fraction"],
                                   "gap_points": best["gap_points"]},
            "replay": rows}


def run(args) -> dict:
    from tune import catalogue

    if args.replay:
        return replay_only(args.replay, os.cpu_count() or 1)
    variant = "quick" if args.quick or args.tiny else "full"
    size = SIZES[variant]
    exp = catalogue.get(EXPERIMENT)
    epochs = int(size["sets"]["epochs"])
    default_grace = max(1, round(epochs * exp.grace_fraction))
    slots = os.cpu_count() or 1  # one CPU per trial: as many trials at once as cores
    workdir = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    try:
        print(f"{NAME} ({variant}): FIFO then ASHA (grace {default_grace}, rf {exp.reduction_factor}), "
              f"{len(exp.grid['dropout'])} trials, {size['sets']}", file=sys.stderr, flush=True)
        fifo = sweep("fifo", "fifo", size["sets"], args.data, args.data_dir, workdir)
        asha = sweep("asha", "asha", size["sets"], args.data, args.data_dir, workdir)
        table_rows = replays(fifo, slots)
        best = recommend(table_rows)
        confirm = None
        if size["confirm_recommended"] and (best["grace"], best["rf"]) != (default_grace, exp.reduction_factor):
            confirm = sweep("asha-recommended", "asha", size["sets"], args.data, args.data_dir, workdir,
                            extra=("--grace-period", str(best["grace"]), "--reduction-factor", str(best["rf"])))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    f, a = summary(fifo), summary(asha)
    figures = {"epoch_fraction": a["trial_epochs"] / f["trial_epochs"],
               "same_winner": a["winner_dropout"] == f["winner_dropout"],
               "winner_gap_test_acc": 100 * (f["winner_test_acc"] - a["winner_test_acc"]),
               "fifo_trial_epochs": f["trial_epochs"], "asha_trial_epochs": a["trial_epochs"],
               "fifo_wall_seconds": f["wall_seconds"], "asha_wall_seconds": a["wall_seconds"],
               "wall_fraction": a["wall_seconds"] / f["wall_seconds"],
               "fifo_winner_dropout": f["winner_dropout"], "asha_winner_dropout": a["winner_dropout"],
               "fifo_winner_test_acc": f["winner_test_acc"], "asha_winner_test_acc": a["winner_test_acc"],
               "asha_grace_period": default_grace, "asha_reduction_factor": exp.reduction_factor,
               "replay_recommended": {"grace": best["grace"], "reduction_factor": best["rf"],
                                      "grace_fraction": best["grace"] / epochs,
                                      "epoch_fraction": best["epoch_fraction"], "gap_points": best["gap_points"]}}
    if confirm is not None:
        c = summary(confirm)
        figures["recommended_epoch_fraction"] = c["trial_epochs"] / f["trial_epochs"]
        figures["recommended_same_winner"] = c["winner_dropout"] == f["winner_dropout"]
        figures["recommended_winner_gap_test_acc"] = 100 * (f["winner_test_acc"] - c["winner_test_acc"])
    rows = [{"scheduler": "fifo", "trial-epochs": f["trial_epochs"], "wall s": f["wall_seconds"],
             "winner dropout": f["winner_dropout"], "best epoch": f["winner_best_epoch"],
             "test acc": f["winner_test_acc"], "gap pts": 0.0},
            {"scheduler": f"asha grace {default_grace} rf {exp.reduction_factor} (defaults)", "trial-epochs": a["trial_epochs"],
             "wall s": a["wall_seconds"], "winner dropout": a["winner_dropout"], "best epoch": a["winner_best_epoch"],
             "test acc": a["winner_test_acc"], "gap pts": figures["winner_gap_test_acc"]}]
    if confirm is not None:
        rows.append({"scheduler": f"asha grace {best['grace']} rf {best['rf']} (replay's pick)",
                     "trial-epochs": c["trial_epochs"], "wall s": c["wall_seconds"], "winner dropout": c["winner_dropout"],
                     "best epoch": c["winner_best_epoch"], "test acc": c["winner_test_acc"],
                     "gap pts": figures["recommended_winner_gap_test_acc"]})
    print(common.table(rows))
    print("\nFIFO best epochs by dropout: " + ", ".join(f"{k:g}: {v}" for k, v in f["best_epochs"].items()))
    print("ASHA epochs run by dropout: " + ", ".join(f"{k:g}: {v}" for k, v in a["epochs_run"].items()))
    print(f"\noffline replay of ASHA on the FIFO curves ({slots} trials at a time):")
    print(common.table(table_rows, REPLAY_COLUMNS))
    return common.record(
        NAME, variant, figures, targets=TARGETS,
        clocks={"wall_seconds": "time.perf_counter() in this process around each `python -m tune sweep` subprocess, "
                                "from launch to exit (Ray start-up and shutdown included)",
                "trial-epochs": "the sum over trials of the last epoch each reported (Ray's result.json)",
                "replay": "simulated time: every epoch of every trial lasts one unit"},
        run={"experiment": EXPERIMENT, "sets": size["sets"], "data": args.data, "cpus_per_trial": 1, "slots": slots,
             "trials": len(fifo["trials"]), "metric": "best_val_loss (min)", "time_attr": "epoch",
             "fifo_header": fifo["header"], "asha_header": asha["header"]},
        details={"fifo": f, "asha": a, "replay": table_rows,
                 "recommended_run": summary(confirm) if confirm is not None else None,
                 "curves": {t["dropout"]: t["curve"] for t in fifo["trials"]},
                 "asha_curves": {t["dropout"]: len(t["curve"]) for t in asha["trials"]}},
    )
