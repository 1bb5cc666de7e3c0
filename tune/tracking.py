"""MLflow tracking: where runs go, the one run each trial owns, and reading runs back (read_runs):
this module owns the run schema on both sides.

The schema:
  experiment  one per catalogue experiment, named after it
  run         one per Ray trial, found again by its tags (sweep_id, trial_id), a child
              (mlflow.parentRunId) of its sweep's run in the same experiment
  params      every TrialConfig field
  tags        sweep_id, experiment, trial_id, config_key, mlflow.source.git.commit
              (runs before it: git_commit), stopped_by
              (completed | scheduler | early_stop | error | killed), stop_reason,
              versions, node_id; parts (every experiment that reads the run, its
              own first: a shared trial serves several) and scheduler (asha | fifo
              per part, comma-separated in the same order); train_images,
              val_images, test_images; data_digest (tune.data.digest); threads
              (torch's, which results depend on); network (the model's printout);
              smoke (true for --smoke sweeps)
  metrics     per epoch (step=epoch): train_loss, train_acc, val_loss, val_acc,
              epoch_seconds, best_val_loss; when the best epoch changes also
              best_epoch, best_val_acc, test_loss, test_acc
  artifacts   model/weights.pt: the best epoch's state_dict and the config (finished trials)

  sweep run   one per (sweep, experiment it touches): tags sweep_id, run_kind=sweep, no trial_id
              (so it never counts as a trial), mlflow.note.content (outcome, then settings);
              params: the settings; metrics: progress (step = trial-epochs done), then outcome;
              artifacts: the report, attached by `make report`
"""

import contextlib
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tune.config import ConfigError, TrialConfig, UserError

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "best_val_loss")
BEST_METRICS = ("best_epoch", "best_val_loss", "best_val_acc", "test_loss", "test_acc")
GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag, shown in the UI; runs before it have `git_commit`
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # the run page's description
SETTINGS = "\n\n## Settings\n\n"  # in a sweep run's description: the outcome above it, the settings below
WEIGHTS = "model/weights.pt"
NO_SWEEP = "(no sweep_id)"  # read_runs' sweep_id of a run logged without one
# The tags read_runs reads back as they are (the commit comes from git_commit_of).
RUN_TAGS = ("sweep_id", "experiment", "trial_id", "config_key", "stopped_by", "stop_reason",
            "versions", "node_id", "scheduler", "parts", "smoke", "train_images", "network")


def git_commit_of(tags: dict) -> str:
    return tags.get(GIT_COMMIT) or tags.get("git_commit", "")


def is_trial(tags: dict) -> bool:
    """A trial's run; a sweep's own run (the parent of its trials) has no trial_id."""
    return bool(tags.get("trial_id"))


def resolve_uri(uri: str | None = None, cwd: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db; local paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    base = Path(cwd or os.getcwd())
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + str((base / path).resolve()) if not os.path.isabs(path) else uri
    if uri.startswith("file:"):
        return Path(base / urllib.parse.urlparse(uri).path).resolve().as_uri()
    if "://" not in uri:  # a bare directory, as mlflow accepts it
        return (base / uri).resolve().as_uri()
    return uri


def can_write_in(folder: Path) -> bool:
    """Whether files can be written in `folder`, found by doing it: permission bits do not stop root, and
    /proc refuses anyway. Folders made for the probe are removed again, so a refused sweep leaves nothing."""
    made = []
    try:
        for p in reversed([folder, *folder.parents]):
            if not p.exists():
                p.mkdir()
                made.append(p)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def check_reachable(uri: str, wait: float = 0) -> None:
    """Raise UserError unless runs can be written to `uri`. Creates nothing. With `wait` (seconds), a server
    that does not answer yet is asked again until then: a stack that is starting up."""
    fix = "start the server or pass --tracking-uri (or MLFLOW_TRACKING_URI) for one that is up"
    if uri.startswith("sqlite:///") or uri.startswith("file:"):
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite") else Path(urllib.parse.urlparse(uri).path)
        folder = path.parent if uri.startswith("sqlite") else path
        if not can_write_in(folder) or (path.is_file() and not os.access(path, os.W_OK)):
            raise UserError(f"tracking store {uri} is not writable; pass --tracking-uri with a writable path")
        return
    if uri.startswith(("http://", "https://")):
        deadline = time.monotonic() + wait
        while True:
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
                break
            except (urllib.error.URLError, OSError, ValueError) as e:
                if time.monotonic() >= deadline:
                    reason = getattr(e, "reason", e)
                    raise UserError(f"tracking server {uri} is unreachable: it did not answer /health ({reason}); "
                                    f"{fix}") from None
                time.sleep(1)
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - auth and protocol errors all mean: cannot log here
            if "Invalid Host header" in str(e):
                raise UserError(f"tracking server {uri} refused the Host header {urllib.parse.urlsplit(uri).netloc!r} "
                                f"(its guard against DNS rebinding), not the login; allow that address on the server "
                                f"(in the Docker stack: CLUSTER_HEAD_IP or MLFLOW_ALLOWED_HOSTS in .env)") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tracking server {uri} refused a request ({first}); check MLFLOW_TRACKING_USERNAME "
                            f"and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)") from None
        return
    raise UserError(f"tracking URI {uri!r} is not supported; use sqlite:///PATH, a folder, or http(s)://HOST:PORT")


def client(uri: str):
    # Fail fast instead of mlflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    uri = mlflow_client.tracking_uri
    # A SQLite store keeps artifacts beside its database, wherever the process that made it ran.
    artifacts = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri() if uri.startswith("sqlite:///") else None
    try:
        # MLflow versions that read the kind open the experiment on its training runs, not the GenAI page.
        return mlflow_client.create_experiment(name, artifact_location=artifacts,
                                               tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # noqa: BLE001 - another process created it first
        return mlflow_client.get_experiment_by_name(name).experiment_id


def runs_view(server: str, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3's UI opens an experiment on its GenAI page unless asked for this."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_view(server: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in model-training mode like runs_view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_name(cfg: TrialConfig) -> str:
    """What ran, short enough for the runs table: e.g. `mlp d=0.8 bn,relu,dropout s0`."""
    words = [cfg.model, f"d={cfg.dropout:.3g}", *([cfg.dropout_kind] if cfg.dropout_kind != "element" else []), cfg.order]
    if cfg.lr != TrialConfig.lr:
        words.append(f"lr={cfg.lr:.2g}")
    return " ".join([*words, f"s{cfg.seed}"])


def experiment_links(mlflow_client, server: str, experiments: list[str]) -> list[str]:
    """`name: link` to each experiment's runs table, for those in the store."""
    found = [(n, mlflow_client.get_experiment_by_name(n)) for n in experiments]
    return [f"{n}: {runs_view(server, e.experiment_id)}" for n, e in found if e is not None]


UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves a local store


def find_run(mlflow_client, experiment: str, sweep_id: str, trial_id: str):
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow_client.search_runs(
        [exp.experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.trial_id = '{trial_id}'", max_results=2)
    return runs[0] if runs else None


def sweep_runs(mlflow_client, experiments: list[str], sweep_id: str) -> list:
    """Every run of one sweep, across its experiments."""
    ids = [e.experiment_id for e in (mlflow_client.get_experiment_by_name(n) for n in experiments) if e is not None]
    if not ids:
        return []
    return list(mlflow_client.search_runs(ids, f"tags.sweep_id = '{sweep_id}'", max_results=10000))


def log_dataset(mlflow_client, run_id: str, cfg: TrialConfig, tags: dict) -> None:
    """The data the run trained on, as MLflow's Dataset column shows it: the source, our digest of every
    array (MLflow's own hashes only the first 10,000 values, about three images) and the split sizes."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = cfg.data.split(":", 1)[0] if not cfg.data.startswith("imagefolder:") else Path(cfg.data.split(":", 1)[1]).name
    profile = {k: int(tags[k]) for k in ("train_images", "val_images", "test_images") if str(tags.get(k, "")).isdigit()}
    dataset = Dataset(name=name, digest=tags["data_digest"][:36], source_type="local",
                      source=json.dumps({"data": relative(cfg.data), "sha256": tags["data_digest"]}),
                      profile=json.dumps(profile))
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    # Concurrent trials race to create the experiment's dataset row: MLflow's SQL store looks it up, then
    # inserts, and the loser hits the unique constraint. Its next try finds the row and only links it.
    for attempt in range(5):
        try:
            mlflow_client.log_inputs(run_id, inputs)
            return
        except Exception:  # noqa: BLE001 - MlflowException wrapping the store's IntegrityError
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


class TrialRun:
    """The MLflow run of one trial: opened (or found again) inside the trial process."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)

    @classmethod
    def open(cls, uri: str, experiment: str, cfg: TrialConfig, tags: dict, run_id: str | None = None,
             start_time: int | None = None) -> "TrialRun":
        """Continue `run_id`, else the run tagged with this (sweep_id, trial_id), else create one (started at
        `start_time`, ms, default now)."""
        from mlflow.entities import Param

        c = client(uri)
        if run_id is None:
            found = find_run(c, experiment, tags["sweep_id"], tags["trial_id"])
            run_id = found.info.run_id if found else None
        if run_id is not None:
            c.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        tags = dict(tags)  # the caller's dict stays as it was
        if "git_commit" in tags:
            tags[GIT_COMMIT] = tags.pop("git_commit")
        run = c.create_run(experiment_id(c, experiment), start_time=start_time, run_name=tags.pop("run_name", None),
                           tags={"config_key": cfg.key(), **tags, "experiment": experiment})
        c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in cfg.to_dict().items()])
        if tags.get("data_digest"):
            log_dataset(c, run.info.run_id, cfg, tags)
        return cls(uri, run.info.run_id)

    def logged_epochs(self) -> set[int]:
        """Epochs this run already holds: a retried trial trains them again but must not log them twice."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}

    def log_epoch(self, metrics: dict) -> None:
        """One batched call per epoch (the client's log_batch: the fluent API would set a global URI)."""
        from mlflow.entities import Metric

        values = {k: float(metrics[k]) for k in EPOCH_METRICS}
        if metrics.get("improved"):
            values.update({k: float(metrics[k]) for k in BEST_METRICS})
        now, step = int(time.time() * 1000), int(metrics["epoch"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, stopped_by: str, reason: str = "", end_time: int | None = None) -> None:
        finish_run(self.client, self.run_id, stopped_by, reason, end_time)

    def log_weights(self, weights: dict, cfg: TrialConfig, epoch: int) -> None:
        """The best epoch's state_dict with the config that builds its network (no optimizer: weights only)."""
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(WEIGHTS).name
            torch.save({"state_dict": weights, "config": cfg.to_dict(), "epoch": epoch}, path)
            self.client.log_artifact(self.run_id, str(path), str(Path(WEIGHTS).parent))


def finish_run(mlflow_client, run_id: str, stopped_by: str, reason: str = "", end_time: int | None = None) -> None:
    mlflow_client.set_tag(run_id, "stopped_by", stopped_by)
    if reason:
        mlflow_client.set_tag(run_id, "stop_reason", reason[:4000])
    status = {"error": "FAILED", "killed": "KILLED"}.get(stopped_by, "FINISHED")
    mlflow_client.set_terminated(run_id, status=status, end_time=end_time)


class SweepRun:
    """A sweep as the MLflow UI shows it: one run in each experiment the sweep touches, the parent of that
    experiment's trials (nested runs live in one experiment), holding the settings, the progress while it
    runs and the outcome when it ends."""

    def __init__(self, uri: str, sweep_id: str, run_ids: dict[str, str]):
        self.uri, self.sweep_id, self.run_ids = uri, sweep_id, run_ids
        self.client = client(uri)

    @classmethod
    def open(cls, uri: str, sweep_id: str, experiments: list[str], settings: dict, note: str,
             git_commit: str) -> "SweepRun":
        """Create the sweep's runs, or find them again (a resumed sweep)."""
        from mlflow.entities import Param

        c, run_ids = client(uri), {}
        for name in experiments:
            exp = experiment_id(c, name)
            found = sweep_parents(c, [exp], sweep_id)
            if found:
                run_ids[name] = found[0].info.run_id
                c.update_run(run_ids[name], status="RUNNING")
                continue
            run = c.create_run(exp, run_name=f"sweep {sweep_id}", tags={
                "sweep_id": sweep_id, "run_kind": "sweep", "experiment": name, GIT_COMMIT: git_commit, NOTE: note})
            c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in settings.items()])
            run_ids[name] = run.info.run_id
        return cls(uri, sweep_id, run_ids)

    def log(self, figures: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for run_id in self.run_ids.values():
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in figures.items()])

    def close(self, outcome: dict[str, str], status: str) -> None:
        """`outcome`: experiment -> Markdown put before the settings in its run's description (the UI shows
        a description's first lines)."""
        for name, run_id in self.run_ids.items():
            note = self.client.get_run(run_id).data.tags.get(NOTE, "")
            settings = note.split(SETTINGS, 1)[1] if SETTINGS in note else note
            self.client.set_tag(run_id, NOTE, f"## Outcome\n\n{outcome.get(name, 'no trial ended')}{SETTINGS}{settings}")
            self.client.set_terminated(run_id, status=status)


def sweep_parents(mlflow_client, experiment_ids: list[str], sweep_id: str | None = None) -> list:
    """The sweep runs (parents) in these experiments: of one sweep, or of every sweep."""
    query = "tags.run_kind = 'sweep'" + (f" and tags.sweep_id = '{sweep_id}'" if sweep_id else "")
    return list(mlflow_client.search_runs(experiment_ids, query, max_results=10000)) if experiment_ids else []


def import_record(mlflow_client, uri: str, rec, sweep_id: str, experiment: str | None = None) -> str | None:
    """Log one run record (tune.record) as a sweep trial's run; None if this record is already in the store."""
    from tune import catalogue

    head = rec.header
    experiment = head.get("experiment") or experiment
    if not experiment:
        raise UserError(f"record {rec.path} names no catalogue experiment; pass --experiment NAME for it")
    catalogue.get(experiment)
    parts = head.get("parts") or [experiment]
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is not None and mlflow_client.search_runs([exp.experiment_id], f"tags.record_id = '{head['id']}'", max_results=1):
        return None
    data = head.get("data", {})
    # The runner runs every trial to its end (FIFO); a record exported from a sweep keeps its schedulers.
    schedulers = head.get("scheduler") or ["fifo"] * len(parts)
    tags = {"sweep_id": head.get("sweep_id") or sweep_id, "trial_id": head["id"][:12], "record_id": head["id"],
            "git_commit": head["git_commit"], "versions": head["versions"], "parts": ",".join(parts),
            "scheduler": ",".join(schedulers), "node_id": head.get("host", "unknown"),
            "train_images": str(data.get("train_images", "")), "val_images": str(data.get("val_images", "")),
            "test_images": str(data.get("test_images", "")), "smoke": str(bool(head.get("smoke"))).lower(),
            "data_digest": data.get("digest", ""), "threads": str(head.get("threads", "")),
            "network": head.get("network", ""), "config_key": head.get("config_key") or rec.config.key(),
            "run_name": run_name(rec.config)}
    started = head.get("started") if isinstance(head.get("started"), int) else None
    run = TrialRun.open(uri, experiment, rec.config, tags, start_time=started)
    for metrics in rec.epochs:
        run.log_epoch(metrics)
    if rec.end is None:
        # When its last epoch ended, not when it was imported (older records hold no epoch times: their sum).
        last = rec.epochs[-1].get("time") if rec.epochs else None
        ended = last if isinstance(last, int) else started and started + int(
            1000 * sum(e.get("epoch_seconds", 0) for e in rec.epochs))
        run.finish("killed", f"the record ends after epoch {len(rec.epochs)}: its run was killed", ended or None)
    else:
        finished = rec.end.get("finished")
        run.finish(rec.end["stopped_by"], rec.end.get("reason", ""), finished if isinstance(finished, int) else None)
    return run.run_id


def relative(spec: str) -> str:
    """A data spec, folder or SQLite URI with an absolute path, made relative to the working directory: records
    and reports travel, and this machine's paths mean nothing elsewhere."""
    for prefix in ("imagefolder:", "sqlite:///", ""):
        if spec.startswith(prefix) and os.path.isabs(spec[len(prefix):]):
            return prefix + os.path.relpath(spec[len(prefix):])
    return spec


def export_records(mlflow_client, experiments: list[str], sweep_id: str, out: Path) -> list[Path]:
    """The runs of one sweep as run records (tune.record), so the study can be rebuilt without the store."""
    from tune import record

    written = []
    for run in sweep_runs(mlflow_client, experiments, sweep_id):
        tags = run.data.tags
        if not is_trial(tags):
            continue
        params = {k: v for k, v in run.data.params.items() if k in TrialConfig.__dataclass_fields__}
        # A record travels: this machine's absolute paths become relative to where export runs.
        params["data"], params["data_dir"] = relative(params["data"]), relative(params["data_dir"])
        cfg = TrialConfig.from_dict(params)
        history: dict[int, dict] = {}
        for key in dict.fromkeys(EPOCH_METRICS + BEST_METRICS):
            for m in mlflow_client.get_metric_history(run.info.run_id, key):
                history.setdefault(m.step, {})[key] = m.value
        epochs = [{"epoch": step, **values, "improved": "test_acc" in values} for step, values in sorted(history.items())]
        data = {"source": cfg.data, "digest": tags.get("data_digest", ""), **{
            k: int(tags[k]) for k in ("train_images", "val_images", "test_images") if tags.get(k)}}
        head = {**record.header(cfg, experiment=tags["experiment"], parts=tags["parts"].split(",") if tags.get("parts") else None,
                                data=data, threads=int(tags.get("threads") or 0), git_commit=git_commit_of(tags),
                                versions=tags.get("versions", ""), smoke=tags.get("smoke") == "true",
                                network=tags.get("network", "")),
                "id": run.info.run_id, "sweep_id": sweep_id, "host": tags.get("node_id", "unknown"),
                "started": run.info.start_time, "config_key": tags.get("config_key", cfg.key()),
                "scheduler": tags.get("scheduler", "fifo").split(",")}
        path = out / (record.name_for(tags["experiment"], cfg) + record.SUFFIX)
        writer = record.RecordWriter(path, head, [{"kind": "epoch", **e} for e in epochs])
        end = {"stopped_by": tags.get("stopped_by", "killed"), "reason": tags.get("stop_reason", ""),
               "epochs_run": max(history, default=0)}
        if end["stopped_by"] == "killed":
            writer.file.close()
        else:
            writer.finish({**end, **{k: run.data.metrics[k] for k in BEST_METRICS if k in run.data.metrics}},
                          finished=run.info.end_time)
        written.append(path)
    return written


# --- reading runs back ---------------------------------------------------------------------


def read_runs(raw, experiment_names: dict[str, str]) -> tuple:
    """mlflow.search_runs' pandas frame -> one typed row per (run, experiment it serves), params through TrialConfig.

    A trial that several experiments share (tags `parts` and `scheduler`, comma-separated and in the
    same order) gives one row per experiment, each with that experiment's scheduler; `home` is the
    MLflow experiment that holds the run, and `shared` says whether other experiments read it too.
    A run whose params do not validate is left out, and named in the list returned with the frame:
    a table must never show a default in place of what ran.
    """
    import pandas as pd

    rows, unreadable = [], []
    for _, r in raw.iterrows():
        tags = {k[len("tags."):]: v for k, v in r.items() if k.startswith("tags.") and isinstance(v, str) and v}
        if not is_trial(tags):
            continue  # a sweep's own run: its trials are the rows
        row = {"run_id": r["run_id"], "status": r["status"], "start_time": r["start_time"], "end_time": r.get("end_time")}
        for tag in RUN_TAGS:
            row[tag] = tags.get(tag)
        row["git_commit"] = git_commit_of(tags) or None
        # A run's home is its MLflow experiment; the tag only says the same.
        home = experiment_names.get(r["experiment_id"], row["experiment"] or r["experiment_id"])
        row["sweep_id"] = row["sweep_id"] or NO_SWEEP
        row["stopped_by"] = row["stopped_by"] or ("running" if r["status"] == "RUNNING" else "unknown")
        try:
            row.update(_typed_params({k[len("params."):]: v for k, v in r.items()
                                      if k.startswith("params.") and isinstance(v, str)}))
        except ConfigError as e:
            unreadable.append(f"run {r['run_id']} in {home}: {e}")
            continue
        for key in BEST_METRICS:
            row[key] = r.get(f"metrics.{key}", float("nan"))
        # Runs from before the tag: the limit, when one was set, is the training set's size.
        row["train_images"] = float(row["train_images"]) if row["train_images"] else (
            float(row["limit"]) if row["limit"] else math.nan)
        row["smoke"] = row["smoke"] == "true"
        parts = row.pop("parts").split(",") if row["parts"] else [home]
        schedulers = (row["scheduler"] or "unknown").split(",")
        for i, part in enumerate(parts):
            rows.append({**row, "experiment": part, "home": home, "shared": len(parts) > 1,
                         "scheduler": schedulers[i] if len(schedulers) == len(parts) else schedulers[0]})
    if not rows:
        return pd.DataFrame(), unreadable
    runs = pd.DataFrame(rows)
    runs["config_key"] = runs["config_key"].fillna(runs["run_id"])
    return runs.sort_values(["experiment", "start_time", "run_id"]).reset_index(drop=True), unreadable


def _typed_params(params: dict) -> dict:
    """Run params as TrialConfig types them. A field the run does not have (an older run) takes its default;
    a value that does not validate raises ConfigError."""
    return TrialConfig.from_dict({k: v for k, v in params.items() if k in TrialConfig.__dataclass_fields__}).to_dict()
