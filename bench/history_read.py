"""history-read: the report's metric-history read, MLflow's public client against our private bulk paths.

A store of N runs as sweeps log them (per epoch: the six epoch metrics; on each new best, the five
best-epoch ones; EPOCHS epochs each), read whole by each path of analysis/fetch.py:

  sqlite  public  MlflowClient.get_metric_history per (run, key), on a thread pool (fetch._threaded_points)
          private one SELECT per chunk of runs on MLflow's metric table (fetch._sql_points)
  server  public  the same client calls against a real `mlflow server` on that store
          private the server's bulk-history endpoint, /ajax-api/.../get-history-bulk (fetch._rest_points)

Each pair runs side by side (interleave: A B, B A, ...), and each path must return the same points.
ratio = median public time / median private time, per store kind: a private path stays only where
this is large (the fetch module falls back to the public path whenever a private one fails).
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

NAME = "history-read"
SIZES = {"full": {"runs": 200, "epochs": 100, "reps": 3}, "quick": {"runs": 200, "epochs": 20, "reps": 2},
         "tiny": {"runs": 6, "epochs": 4, "reps": 1}}


def build_store(uri: str, runs: int, epochs: int) -> list[str]:
    from mlflow.entities import Metric

    from tune import tracking
    from tune.config import TrialConfig

    ids = []
    for i in range(runs):
        cfg = TrialConfig(dropout=round(0.1 + 0.8 * (i % 9) / 8, 2), seed=i // 9)
        run = tracking.TrialRun.open(uri, "dropout-mlp", cfg, {"sweep_id": "bench", "trial_id": f"t{i}"})
        metrics, best, t0 = [], float("inf"), int(time.time() * 1000)
        for e in range(1, epochs + 1):
            val = 2.0 / e + 0.01 * ((e * 7 + i) % 5)
            if val < best:
                best = val
                metrics += [Metric(k, v, t0 + e, e) for k, v in (("best_epoch", e), ("best_val_acc", 0.5),
                                                                 ("test_loss", val), ("test_acc", 0.5))]
            metrics += [Metric(k, v, t0 + e, e) for k, v in (("train_loss", 1 / e), ("train_acc", 0.5), ("val_loss", val),
                                                             ("val_acc", 0.5), ("epoch_seconds", 1.0),
                                                             ("best_val_loss", best))]
        for start in range(0, len(metrics), 1000):
            run.client.log_batch(run.run_id, metrics=metrics[start:start + 1000])
        run.finish("completed")
        ids.append(run.run_id)
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    from tune import tracking

    try:
        tracking.check_reachable(f"http://127.0.0.1:{port}", wait=120)
    except Exception:
        proc.kill()
        raise
    return proc


def run(args) -> dict:
    from mlflow import MlflowClient

    from analysis import fetch

    variant = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = SIZES[variant]
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "mlflow.db"
        uri = f"sqlite:///{db}"
        t0 = time.perf_counter()
        run_ids = build_store(uri, size["runs"], size["epochs"])
        print(f"  store: {size['runs']} runs x {size['epochs']} epochs in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        port = free_port()
        server = start_server(db, port)
        try:
            local, remote = MlflowClient(uri), MlflowClient(f"http://127.0.0.1:{port}")
            epochs_of = dict.fromkeys(run_ids, size["epochs"])
            paths = {
                "sqlite public": lambda: fetch._threaded_points(local, run_ids, fetch.HISTORY_KEYS),
                "sqlite private": lambda: fetch._sql_points(local._tracking_client.store, run_ids, fetch.HISTORY_KEYS),
                "server public": lambda: fetch._threaded_points(remote, run_ids, fetch.HISTORY_KEYS),
                "server private": lambda: fetch._rest_points(remote._tracking_client.store, run_ids, epochs_of,
                                                             fetch.HISTORY_KEYS),
            }
            points = {}

            def timed(name):
                def once():
                    start = time.perf_counter()
                    points[name] = paths[name]()
                    return time.perf_counter() - start
                return once

            seconds = {}
            for kind in ("sqlite", "server"):
                seconds.update(common.interleave({f"{kind} public": timed(f"{kind} public"),
                                                  f"{kind} private": timed(f"{kind} private")}, size["reps"]))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    frames = {name: fetch.history_frame(p) for name, p in points.items()}
    same = all(frames[name].equals(frames["sqlite public"]) for name in frames)
    n_points = len(points["sqlite public"])
    medians = {name: common.median(s) for name, s in seconds.items()}
    figures = {"points": n_points, "same_points": same,
               "sqlite_ratio": medians["sqlite public"] / medians["sqlite private"],
               "server_ratio": medians["server public"] / medians["server private"],
               "seconds": medians}
    rows = [{"store": name.split()[0], "path": name.split()[1], "median s": medians[name],
             "points/s": n_points / medians[name]} for name in paths]
    print(common.table(rows))
    return common.record(
        NAME, variant, figures, targets={"same_points": (">=", True)},
        clocks={"seconds": "time.perf_counter() around one whole read of every run's history, medians over reps"},
        run={**size, "keys": list(fetch.HISTORY_KEYS), "threads": "fetch._threaded_points' pool"},
        details={"seconds": seconds})
