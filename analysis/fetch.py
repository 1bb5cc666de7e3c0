"""Read the study's runs from MLflow into pandas: one row per run, and one row per (run, epoch).
A run's tags and params become a row in tune.tracking.read_runs, beside the code that writes them.

Metric histories: the public path is MLflow's client, one get_metric_history call per (run, key) on a
thread pool. Two private bulk paths stand in front of it because `python -m bench history-read`
measured them much faster on a 200-run store (bench/results/history-read.json): on a SQL store one
query per chunk of runs on MLflow's metric table, on a tracking server its UI's bulk-history endpoint.
Either falls back to the public path when it fails (a changed schema, an older or proxied server).
"""

import math
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tune import catalogue, tracking
from tune.config import UserError

HISTORY_KEYS = tuple(dict.fromkeys(tracking.EPOCH_METRICS + tracking.BEST_METRICS))
# Limits of the tracking server's bulk-history endpoint (mlflow/server/handlers.py).
REST_MAX_RUNS, REST_MAX_POINTS = 100, 25000
SQL_CHUNK = 500  # run ids per IN (...) clause, well under SQLite's variable limit


@dataclass
class Study:
    uri: str
    experiments: list[str]
    """the experiments asked for, in catalogue order"""
    selection: str
    """which sweeps the report shows, in words"""
    runs: pd.DataFrame
    """the selected runs: run_id, experiment, status, start_time, end_time, the tags, the typed
    TrialConfig fields, and the latest value of each best-epoch metric"""
    history: pd.DataFrame
    """the selected runs' metrics per epoch: run_id, epoch, one column per metric key"""
    all_runs: pd.DataFrame
    """every run of the asked-for experiments, every sweep (same columns as runs, no history)"""
    fetch_seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)
    """runs left out because their params do not read back as a TrialConfig, each with why"""


def study_experiments() -> list[str]:
    """Every catalogue experiment that is not a composite, in catalogue order."""
    return [name for name, e in catalogue.CATALOGUE.items() if not e.parts]


def expand_experiments(names: list[str] | None) -> list[str]:
    """Catalogue composites (e.g. `report`) become their parts; the default is every study experiment."""
    out = []
    for name in names or study_experiments():
        for part in name.split(","):
            part = part.strip()
            if part in catalogue.CATALOGUE and catalogue.CATALOGUE[part].parts:
                out += catalogue.CATALOGUE[part].parts
            elif part:
                out.append(part)
    return list(dict.fromkeys(out))


def check_store(uri: str) -> None:
    """Raise UserError if the store cannot hold runs. Never creates a missing SQLite file or folder."""
    fix = "run a sweep first (`make sweep`) or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store that holds it"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UserError(f"tracking store {uri} does not exist; {fix}")
    elif uri.startswith("file:"):
        path = Path(urllib.parse.urlparse(uri).path)
        if not path.is_dir():
            raise UserError(f"tracking store {uri} does not exist; {fix}")
    elif uri.startswith(("http://", "https://")):
        tracking.check_reachable(uri)
    else:
        raise UserError(f"tracking URI {uri!r} is not supported; use sqlite:///PATH, a folder, or http(s)://HOST:PORT")


def load(uri: str, experiments: list[str] | None = None, sweep: str | None = None, pool: bool = False) -> Study:
    """Every run of `experiments` in the store at `uri`, the selected ones with their metric histories."""
    check_store(uri)
    names = expand_experiments(experiments)
    t0 = time.perf_counter()
    client = tracking.client(uri)
    # A shared trial's run lives in one experiment and serves others: read every study experiment.
    found = {}
    for name in dict.fromkeys([*names, *study_experiments()]):
        exp = client.get_experiment_by_name(name)
        if exp is not None and exp.lifecycle_stage == "active":
            found[name] = exp.experiment_id
    unknown = [n for n in names if n not in found and n not in catalogue.CATALOGUE]
    if unknown:
        raise UserError(f"experiment {unknown[0]!r} is neither in the catalogue nor in {uri}; "
                        f"choose from {', '.join(study_experiments())} or `report`")
    all_runs, unreadable = _search_runs(uri, found)
    if not all_runs.empty:
        all_runs = all_runs[all_runs["experiment"].isin(names)].reset_index(drop=True)
    if all_runs.empty:
        raise UserError(f"no runs of {', '.join(names)} in {uri}; run a sweep first (`make sweep`) "
                        f"or pass --tracking-uri to the store that holds them")
    runs, selection = select_runs(all_runs, sweep, pool)
    if runs.empty:
        sweeps = ", ".join(sorted(all_runs["sweep_id"].unique()))
        raise UserError(f"no runs of sweep {sweep!r} in {', '.join(names)}; pass one of: {sweeps} (or --all)")
    history = fetch_history(client, runs)
    return Study(uri, names, selection, runs, history, all_runs, time.perf_counter() - t0, unreadable)


def _search_runs(uri: str, experiment_ids: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    import mlflow

    if not experiment_ids:
        return pd.DataFrame(), []
    # set_tracking_uri also exports MLFLOW_TRACKING_URI to every later subprocess: undo both.
    previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        raw = mlflow.search_runs(experiment_ids=list(experiment_ids.values()), output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    if raw.empty:
        return pd.DataFrame(), []
    names = {v: k for k, v in experiment_ids.items()}
    return tracking.read_runs(raw, names)


def select_runs(all_runs: pd.DataFrame, sweep: str | None = None, pool: bool = False) -> tuple[pd.DataFrame, str]:
    """The latest sweep of each experiment, or sweep `sweep`, or every sweep (`pool`).

    A (configuration, seed) pair counts once, its latest run: pooled sweeps would
    otherwise pass one deterministic result off as several seeds.
    """
    if pool:
        runs, selection = all_runs, "every sweep, pooled (a configuration and seed run in several sweeps counts once)"
    elif sweep is not None:
        runs, selection = all_runs[all_runs["sweep_id"] == sweep], f"sweep {sweep}"
    else:
        started = all_runs.groupby(["experiment", "sweep_id"])["start_time"].max().reset_index()
        latest = started.sort_values("start_time").groupby("experiment").tail(1)
        runs = all_runs.merge(latest[["experiment", "sweep_id"]], on=["experiment", "sweep_id"])
        selection = "the latest sweep of each experiment"
    runs = runs.sort_values("start_time").drop_duplicates(["experiment", "config_key", "seed"], keep="last")
    return runs.sort_values(["experiment", "start_time", "run_id"]).reset_index(drop=True), selection


def fetch_history(client, runs: pd.DataFrame, keys=HISTORY_KEYS) -> pd.DataFrame:
    """Every metric of every run per epoch: run_id, epoch, one column per key."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    run_ids = list(dict.fromkeys(runs["run_id"]))
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    points = None
    try:
        if isinstance(store, SqlAlchemyStore):
            points = _sql_points(store, run_ids, keys)
        elif isinstance(store, RestStore):
            points = _rest_points(store, run_ids, dict(zip(runs["run_id"], runs["epochs"])), keys)
    except Exception:  # noqa: BLE001 - MLflow's internals moved: the public path still works
        points = None
    if points is None:
        points = _threaded_points(client, run_ids, keys)
    return history_frame(points, keys)


def history_frame(points: list[tuple], keys=HISTORY_KEYS) -> pd.DataFrame:
    """(run_id, key, step, timestamp, value) points -> one row per (run, epoch); a re-logged value keeps its latest."""
    long = pd.DataFrame(points, columns=["run_id", "key", "epoch", "timestamp", "value"])
    if long.empty:
        return pd.DataFrame(columns=["run_id", "epoch", *keys])
    long = long.sort_values("timestamp").drop_duplicates(["run_id", "key", "epoch"], keep="last")
    wide = long.pivot(index=["run_id", "epoch"], columns="key", values="value").reset_index()
    wide.columns.name = None
    for key in keys:
        if key not in wide:
            wide[key] = float("nan")
    wide["epoch"] = wide["epoch"].astype(int)
    return wide[["run_id", "epoch", *keys]].sort_values(["run_id", "epoch"]).reset_index(drop=True)


def _sql_points(store, run_ids, keys) -> list[tuple]:
    """One query per chunk of runs, selecting bare columns of MLflow's own metric table: building an
    entity per point costs more than the query."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import select

    points = []
    with store.ManagedSessionMaker() as session:
        for start in range(0, len(run_ids), SQL_CHUNK):
            query = select(SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.timestamp, SqlMetric.value,
                           SqlMetric.is_nan).where(SqlMetric.run_uuid.in_(run_ids[start:start + SQL_CHUNK]),
                                                   SqlMetric.key.in_(keys))
            points += [(r, k, s, t, math.nan if nan else v) for r, k, s, t, v, nan in session.execute(query)]
    return points


def _rest_points(store, run_ids, epochs_of: dict, keys) -> list[tuple] | None:
    """The server's bulk endpoint, in chunks that fit its limits; None if the server lacks it."""
    from mlflow.utils.rest_utils import http_request

    chunks, chunk, size = [], [], 0
    for run_id in run_ids:
        expected = max(1, int(epochs_of.get(run_id) or 1))
        if chunk and (len(chunk) == REST_MAX_RUNS or size + expected > REST_MAX_POINTS):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(run_id)
        size += expected
    chunks += [chunk] if chunk else []
    points = []
    try:
        for chunk in chunks:
            for key in keys:
                response = http_request(store.get_host_creds(), "/ajax-api/2.0/mlflow/metrics/get-history-bulk", "GET",
                                        params={"run_id": chunk, "metric_key": key, "max_results": REST_MAX_POINTS})
                if response.status_code != 200:
                    return None
                metrics = response.json().get("metrics", [])
                if len(metrics) >= REST_MAX_POINTS:
                    return None  # truncated: a run logged more steps than its epochs param says
                points += [(m["run_id"], key, int(m["step"]), int(m["timestamp"]), float(m["value"])) for m in metrics]
    except Exception:  # noqa: BLE001 - an old or proxied server: fall back to per-run calls
        return None
    return points


def _threaded_points(client, run_ids, keys) -> list[tuple]:
    def one(pair):
        run_id, key = pair
        return [(run_id, key, m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)]

    pairs = [(r, k) for r in run_ids for k in keys]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2) * 4)) as pool:
        return [p for chunk in pool.map(one, pairs) for p in chunk]
