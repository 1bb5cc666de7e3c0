"""trial-overhead: the same training as (a) a bare loop and (b) one Ray Tune trial of a real sweep.

(a) a fresh process loads the data, sets torch's threads to the trial's CPUs (1), and times
    `tune.train.train(cfg, data)` from the call to its return.
(b) `python -m tune sweep` (the CLI `make sweep` runs) with a one-trial grid of the same config:
    FIFO, one CPU per trial, MLflow logging to a fresh SQLite store, checkpoints every 10 epochs
    and at the end, as the defaults have it. Its time is Ray's own `time_total_s` on the trial's
    last result.json line: every iteration, with reporting, MLflow logging and checkpointing
    inside, and no timer of ours in the loop.

Each repetition runs (a) and (b) side by side, at the same time, one core each and at the same
niceness (Ray starts its workers at 15). On this shared 2-core machine other processes' load
swings by half within minutes (a sequential a-b-b-a run of this benchmark measured the same (a)
at 247 s and 145 s), which no sequential order cancels; a pair running together sees the same
load. (a) loads its data first and then waits until (b)'s trial has opened its MLflow run, the
step right before its train() call, so both train over the same stretch of time. The full
variant also runs a calibration pair of two (a)s: its ratio is the method's own spread.
ratio = the median over repetitions of (a) / (b), per model; the JSON's `ratio` is the lower.

startup_seconds: from launching the sweep process to the trial's first epoch, as the MLflow
timestamp of that epoch's metrics (logged right before the epoch is reported to Ray).

The breakdown (what a report, an MLflow log_metrics and a checkpoint cost) compares Ray's
time_this_iter_s with the loop's own epoch_seconds within (b); it explains the ratio, it is not it.
"""

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

NAME = "trial-overhead"
TARGETS = {"ratio": (">=", 0.95)}
RAY_WORKER_NICENESS = 15
# experiment of the catalogue -> the one grid point the trial runs.
EXPERIMENTS = {"mlp": ("dropout-mlp", "0.5"), "cnn": ("dropout-cnn", "0.5")}
SIZES = {
    # 10 epochs on the full 40k training split: the per-epoch costs show, and the default
    # checkpoint_every (10) checkpoints once, at the end, as a real trial's last epoch does.
    # The CNN on a subset, still long enough (~1.5 min here) that its fixed cost is not all we see.
    "full": {"reps": {"mlp": 2, "cnn": 2}, "extras": True,
             "mlp": {"limit": 0, "eval_limit": 0, "epochs": 10},
             "cnn": {"limit": 5000, "eval_limit": 1000, "epochs": 4}},
    # One pair each, ~50 s (MLP) and ~40 s (CNN) of training. A trial's fixed cost inside Ray's
    # clock (opening its MLflow run, ~0.1 s) is well under 1% of that; a single pair's spread (+-4%) is not.
    "quick": {"reps": {"mlp": 1, "cnn": 1}, "extras": False,
              "mlp": {"limit": 0, "eval_limit": 2000, "epochs": 6},
              "cnn": {"limit": 3000, "eval_limit": 500, "epochs": 4}},
}


def trial_config(model: str, size: dict, data: str, data_dir: str):
    """The TrialConfig the sweep builds for this one-trial grid, built the same way (catalogue.expand)."""
    from tune import catalogue
    from tune.data import resolve

    experiment, rate = EXPERIMENTS[model]
    base = {"data": resolve(data), "data_dir": os.path.abspath(data_dir)}
    sets = {k: str(v) for k, v in size.items()}
    [(_, cfg)] = catalogue.expand(experiment, sets, {"dropout": rate}, 1, base)
    return cfg


def bare(cfg_dict: dict, threads: int, go_file: str) -> dict:
    """(a), in this (fresh) process: load, say ready, wait for the go file, train."""
    import torch

    from tune.config import TrialConfig
    from tune.data import load
    from tune.train import train

    torch.set_num_threads(threads)
    # Ray's raylet starts its workers at niceness 15 (its worker_niceness default): run (a) alike,
    # or on a shared machine it would win the CPU from the trial.
    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    cfg = TrialConfig.from_dict(cfg_dict)
    dataset = load(cfg.data, cfg.data_dir)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.01)
    epochs = []

    def on_epoch(metrics, _state):
        epochs.append(metrics["epoch_seconds"])

    t0 = time.perf_counter()
    train(cfg, dataset, on_epoch=on_epoch)
    return {"seconds": time.perf_counter() - t0, "epoch_seconds": epochs, "threads": torch.get_num_threads(),
            "niceness": os.nice(0)}


def _run_opened(db: Path) -> bool:
    """Whether the sweep's trial has created its MLflow run (read-only, so a missing store stays missing)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)) as c:
            return c.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def run_pair(cfg, model: str, size: dict, data: str, data_dir: str, workdir: Path, tag: str,
             sides: tuple[str, str] = ("a", "b"), checkpoint_every: int = 10) -> list[dict]:
    """Run two sides at the same time: "a" (bare loop) or "b" (a sweep's trial). Returns their results in order."""
    go = workdir / f"go-{tag}"
    bares = [subprocess.Popen([sys.executable, "-m", "bench.trial_overhead", "bare", json.dumps(cfg.to_dict()), "1", str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.REPO)
             for side in sides if side == "a"]
    sweep = None
    if "b" in sides:
        sweep = start_sweep(model, size, data, data_dir, workdir, tag, checkpoint_every)
    try:
        for proc in bares:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bare run failed: {proc.stderr.read()[-2000:]}")
        while sweep is not None and not _run_opened(sweep["db"]):
            if sweep["proc"].poll() is not None:
                break
            time.sleep(0.02)
        go.touch()
        results = iter([finish_sweep(sweep)] if sweep else [])
    except BaseException:
        for proc in bares:  # our own children: do not leave them training
            proc.kill()
        raise
    outs = []
    for proc in bares:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"bare run failed: {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    bare_results = iter(outs)
    return [next(bare_results) if side == "a" else next(results) for side in sides]


def start_sweep(model: str, size: dict, data: str, data_dir: str, workdir: Path, tag: str, checkpoint_every: int) -> dict:
    """(b): launch one real sweep process (its own Ray instance, storage and MLflow store)."""
    experiment, rate = EXPERIMENTS[model]
    sweep_id = f"bench-{model}-{tag}"
    storage = workdir / "ray_results"
    cmd, env = common.sweep_command(experiment, sweep_id, data, data_dir, workdir, size, "--grid", f"dropout={rate}",
                                    "--scheduler", "fifo", "--cpus-per-trial", "1", "--checkpoint-every", str(checkpoint_every))
    log = open(workdir / f"{sweep_id}.log", "w")
    launched_wall, launched = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"proc": proc, "log": log, "launched_wall": launched_wall, "launched": launched, "storage": storage,
            "sweep_id": sweep_id, "experiment": experiment, "db": workdir / f"{sweep_id}.db"}


def finish_sweep(sweep: dict) -> dict:
    """Wait for the sweep; Ray's figures for its only trial, and MLflow's clock of its run."""
    from mlflow import MlflowClient

    proc, storage, sweep_id, launched_wall = sweep["proc"], sweep["storage"], sweep["sweep_id"], sweep["launched_wall"]
    proc.wait()
    wall = time.perf_counter() - sweep["launched"]
    sweep["log"].close()
    found = list((storage / sweep_id).glob("*/result.json"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"sweep failed (exit {proc.returncode}): {Path(sweep['log'].name).read_text()[-3000:]}")
    result_file = found[0]
    results = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    params = json.loads((result_file.parent / "params.json").read_text())
    state_files = list(result_file.parent.glob("checkpoint_*/state.pt"))
    client = MlflowClient(f"sqlite:///{sweep['db']}")
    [run] = client.search_runs([client.get_experiment_by_name(sweep["experiment"]).experiment_id],
                               f"tags.sweep_id = '{sweep_id}'")
    first_logged = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "val_loss")) / 1000
    return {"seconds": results[-1]["time_total_s"], "sweep_wall_seconds": wall,
            # The trial logs an epoch to MLflow right before it reports it to Ray.
            "startup_seconds": first_logged - launched_wall,
            "launch_to_run_open_seconds": run.info.start_time / 1000 - launched_wall,
            "run_open_to_end_seconds": (run.info.end_time - run.info.start_time) / 1000,
            "time_this_iter_s": [r["time_this_iter_s"] for r in results],
            "epoch_seconds": [r["epoch_seconds"] for r in results],
            "checkpoint_bytes": max((f.stat().st_size for f in state_files), default=0),
            "config": {k: v for k, v in params["trial"].items() if k != "parts"}}


def breakdown(bs: list[dict], setup_a: float) -> dict:
    """Costs around the loop inside (b): Ray's iteration time minus the loop's own epoch time."""
    middle = [it - ep for b in bs for it, ep in zip(b["time_this_iter_s"][1:-1], b["epoch_seconds"][1:-1])]
    return {"per_epoch_overhead_seconds": common.median(middle) if middle else None,
            "last_epoch_overhead_seconds": common.median([b["time_this_iter_s"][-1] - b["epoch_seconds"][-1] for b in bs]),
            # epoch 1 holds the trial's fixed costs (opening its MLflow run, Ray's first report) and train()'s setup,
            # which (a) has too: take (a)'s setup (its wall minus its epochs) off.
            "first_iteration_overhead_seconds":
                common.median([b["time_this_iter_s"][0] - b["epoch_seconds"][0] for b in bs]) - setup_a}


def measure(model: str, size: dict, reps: int, data: str, data_dir: str, workdir: Path, extras: bool) -> dict:
    cfg = trial_config(model, size, data, data_dir)
    pairs = []
    for rep in range(reps):
        print(f"{NAME}: {model} {size}, pair {rep + 1}/{reps}: (a) and (b) side by side", file=sys.stderr, flush=True)
        a, b = run_pair(cfg, model, size, data, data_dir, workdir, f"{model}-{rep}")
        if b["config"] != cfg.to_dict():
            raise RuntimeError(f"the sweep trained another config than the bare loop: {b['config']} vs {cfg.to_dict()}")
        pairs.append({"a": a, "b": b, "ratio": a["seconds"] / b["seconds"]})
        print(f"  (a) {a['seconds']:.1f} s, (b) {b['seconds']:.1f} s: ratio {pairs[-1]['ratio']:.3f}", file=sys.stderr)
    a_runs, b_runs = [p["a"] for p in pairs], [p["b"] for p in pairs]
    setup_a = common.median([r["seconds"] - sum(r["epoch_seconds"]) for r in a_runs])
    out = {"ratio": common.median([p["ratio"] for p in pairs]), "pair_ratios": [p["ratio"] for p in pairs],
           "a_seconds": common.median([r["seconds"] for r in a_runs]),
           "b_seconds": common.median([r["seconds"] for r in b_runs]),
           "startup_seconds": common.median([b["startup_seconds"] for b in b_runs]),
           "startup_minus_first_epoch_seconds": common.median([b["startup_seconds"] - b["epoch_seconds"][0] for b in b_runs]),
           "launch_to_run_open_seconds": common.median([b["launch_to_run_open_seconds"] for b in b_runs]),
           # A cross-check on Ray's clock, which leaves out the waits while the driver takes each result:
           # (a) against the MLflow run's span (opened before train(), closed after the last epoch's log).
           "ratio_mlflow_span": common.median([p["a"]["seconds"] / p["b"]["run_open_to_end_seconds"] for p in pairs]),
           "sweep_wall_seconds": common.median([b["sweep_wall_seconds"] for b in b_runs]),
           "epochs": cfg.epochs,
           "epoch_seconds_a": common.median([e for r in a_runs for e in r["epoch_seconds"]]),
           "epoch_seconds_b": common.median([e for b in b_runs for e in b["epoch_seconds"]]),
           "checkpoint_bytes": max(b["checkpoint_bytes"] for b in b_runs),
           "a_threads": a_runs[0]["threads"], "a_niceness": a_runs[0]["niceness"],
           **breakdown(b_runs, setup_a)}
    # The same trial at 100 epochs (the study's length), from the measured fixed and per-epoch costs.
    epoch_a = (out["a_seconds"] - setup_a) / cfg.epochs
    fixed = out["first_iteration_overhead_seconds"] + out["last_epoch_overhead_seconds"]
    out["projected_ratio_100_epochs"] = 100 * epoch_a / (100 * epoch_a + fixed + 98 * (out["per_epoch_overhead_seconds"] or 0))
    details = {"pairs": pairs}
    if extras:
        print(f"{NAME}: {model} calibration pair: (a) and (a)", file=sys.stderr, flush=True)
        a1, a2 = run_pair(cfg, model, size, data, data_dir, workdir, f"{model}-calibration", sides=("a", "a"))
        out["calibration_ratio"] = a1["seconds"] / a2["seconds"]
        print(f"{NAME}: {model} (a) and (b) with --checkpoint-every 1", file=sys.stderr, flush=True)
        a, b1 = run_pair(cfg, model, size, data, data_dir, workdir, f"{model}-ckpt1", checkpoint_every=1)
        every = [it - ep for it, ep in zip(b1["time_this_iter_s"][1:-1], b1["epoch_seconds"][1:-1])]
        out["checkpoint_seconds"] = common.median(every) - (out["per_epoch_overhead_seconds"] or 0)
        out["ratio_checkpoint_every_1"] = a["seconds"] / b1["seconds"]
        details.update(calibration=[a1, a2], checkpoint_every_1={"a": a, "b": b1})
    shown = ("model", "dropout", "limit", "eval_limit", "epochs", "data")
    return {"figures": out, "details": details, "config": {k: v for k, v in cfg.to_dict().items() if k in shown}}


def reuse_actors(data: str, data_dir: str, workdir: Path) -> dict:
    """Two sweeps of short trials (6 MLP trials of one small epoch) side by side: reuse_actors off and on.

    Both are the CLI, with --no-reuse-actors and --reuse-actors (the default). Measured: each
    sweep's wall time from launch to exit, and its trials' summed time_total_s.
    """
    procs = {}
    print(f"{NAME}: 6 short trials per sweep, reuse_actors off and on side by side", file=sys.stderr, flush=True)
    for flag in ("off", "on"):
        sweep_id = f"bench-reuse-{flag}"
        cmd, env = common.sweep_command("dropout-mlp", sweep_id, data, data_dir, workdir,
                                        {"epochs": 1, "limit": 2000, "eval_limit": 1000},
                                        "--reuse-actors" if flag == "on" else "--no-reuse-actors",
                                        "--grid", "dropout=0.1,0.2,0.3,0.4,0.5,0.6", "--scheduler", "fifo")
        log = open(workdir / f"{sweep_id}.log", "w")
        procs[flag] = (sweep_id, time.perf_counter(), subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log,
                                                                      stderr=subprocess.STDOUT), log)
    ended = {}
    while len(ended) < len(procs):  # each sweep's own end, not when this loop gets to it
        for flag, (_, _, proc, _) in procs.items():
            if flag not in ended and proc.poll() is not None:
                ended[flag] = time.perf_counter()
        time.sleep(0.05)
    runs = {}
    for flag, (sweep_id, t0, proc, log) in procs.items():
        log.close()
        wall = ended[flag] - t0
        if proc.returncode != 0:
            raise RuntimeError(f"reuse_actors={flag} sweep failed: {Path(log.name).read_text()[-3000:]}")
        lasts = [json.loads(f.read_text().splitlines()[-1]) for f in (workdir / "ray_results" / sweep_id).glob("*/result.json")]
        runs[flag] = {"wall_seconds": wall, "trials": len(lasts), "processes": len({r["pid"] for r in lasts}),
                      "trial_seconds": sum(r["time_total_s"] for r in lasts)}
    off, on = runs["off"]["wall_seconds"], runs["on"]["wall_seconds"]
    return {"figures": {"wall_off_seconds": off, "wall_on_seconds": on, "wall_ratio_on_over_off": on / off,
                        "saved_per_trial_seconds": (off - on) / 6}, "runs": runs}


def run(args) -> dict:
    variant = "quick" if args.quick or args.tiny else "full"
    size = SIZES[variant]
    workdir = Path(tempfile.mkdtemp(prefix="bench-trial-overhead-"))
    try:
        results = {m: measure(m, size[m], size["reps"][m], args.data, args.data_dir, workdir, size["extras"] and m == "mlp")
                   for m in ("mlp", "cnn")}
        reuse = reuse_actors(args.data, args.data_dir, workdir) if size["extras"] else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mlp, cnn = results["mlp"]["figures"], results["cnn"]["figures"]
    figures = {"ratio": min(mlp["ratio"], cnn["ratio"]), "mlp_ratio": mlp["ratio"], "cnn_ratio": cnn["ratio"],
               "startup_seconds": mlp["startup_seconds"], "cnn_startup_seconds": cnn["startup_seconds"],
               "per_epoch_overhead_seconds": mlp["per_epoch_overhead_seconds"],
               "first_iteration_overhead_seconds": mlp["first_iteration_overhead_seconds"],
               "mlp_ratio_mlflow_span": mlp["ratio_mlflow_span"],
               "projected_ratio_100_epochs": min(mlp["projected_ratio_100_epochs"], cnn["projected_ratio_100_epochs"]),
               "checkpoint_bytes": mlp["checkpoint_bytes"]}
    for key in ("calibration_ratio", "checkpoint_seconds", "ratio_checkpoint_every_1"):
        if key in mlp:
            figures[key] = mlp[key]
    if reuse is not None:
        figures["reuse_actors_wall_ratio"] = reuse["figures"]["wall_ratio_on_over_off"]
        figures["reuse_actors_saved_per_trial_seconds"] = reuse["figures"]["saved_per_trial_seconds"]
    rows = []
    for model, r in results.items():
        f = r["figures"]
        rows.append({"model": model, "epochs": f["epochs"], "(a) bare s": f["a_seconds"], "(b) trial s": f["b_seconds"],
                     "ratio a/b": f["ratio"], "startup s": f["startup_seconds"],
                     "per-epoch overhead s": "" if f["per_epoch_overhead_seconds"] is None else f["per_epoch_overhead_seconds"],
                     "1st-iteration overhead s": f["first_iteration_overhead_seconds"],
                     "checkpoint MB": f["checkpoint_bytes"] / 1e6})
    print(common.table(rows))
    if "checkpoint_seconds" in mlp:
        print(f"\nMLP checkpoint ({mlp['checkpoint_bytes'] / 1e6:.0f} MB state): {mlp['checkpoint_seconds']:.3f} s each; "
              f"ratio with --checkpoint-every 1: {mlp['ratio_checkpoint_every_1']:.3f}; "
              f"calibration pair (a) / (a): {mlp['calibration_ratio']:.3f}")
    if reuse is not None:
        r = reuse["figures"]
        print(f"reuse_actors, 6 one-epoch trials: sweep wall {r['wall_off_seconds']:.1f} s off, {r['wall_on_seconds']:.1f} s on "
              f"({r['saved_per_trial_seconds']:.1f} s saved per trial)")
    return common.record(
        NAME, variant, figures, targets=TARGETS,
        clocks={
            "a": "time.perf_counter() in a fresh process, from the call of tune.train.train(cfg, data) to its return; data "
                 "loaded before the clock starts; torch threads = the trial's CPUs (1); niceness 15, as Ray's workers",
            "b": "Ray's time_total_s on the trial's last result.json line: the sum of its iterations, each from Ray asking "
                 "the trainable for a result to the result (the first starts when the trial's function starts, before the "
                 "MLflow run opens; it includes reporting, MLflow logging and checkpoint writes)",
            "pairing": "(a) and (b) run at the same time, one core each; (a) starts its clock when (b)'s MLflow run appears "
                       "in the store (polled every 20 ms), just before (b)'s train() call",
            "startup_seconds": "time.time() in this process just before launching `python -m tune sweep`, to the MLflow "
                               "timestamp of the trial's first epoch metrics (logged right before the epoch's report)",
            "ratio_mlflow_span": "(a) over the trial's MLflow run from start_time (opened before train()) to end_time "
                                 "(closed after the last epoch's log): a cross-check that also holds the waits Ray's "
                                 "clock leaves out while the driver takes each result",
            "breakdown": "per-epoch overhead = Ray's time_this_iter_s minus the loop's own epoch_seconds (epochs 2..E-1); "
                         "first-iteration overhead = that for epoch 1, minus (a)'s setup (wall minus its epochs)",
        },
        run={"reps": size["reps"], "cpus_per_trial": 1, "checkpoint_every": 10, "scheduler": "fifo",
             "configs": {m: r["config"] for m, r in results.items()}},
        details={**{m: {"figures": r["figures"], **r["details"]} for m, r in results.items()}, "reuse_actors": reuse},
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare"]:
        print(json.dumps(bare(json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
