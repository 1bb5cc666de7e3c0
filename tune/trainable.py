"""The Ray Tune function trainable: the one training loop, reporting to Ray and logging to MLflow.

It copies nothing of the loop. Per epoch it logs to the trial's own MLflow run,
reports to Ray, and every `checkpoint_every` epochs (and at the end) hands Ray
a checkpoint holding the loop's state and the MLflow run id.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Imported with this module, not when a trial opens its run: a worker imports this module as it
# receives the trainable, before Ray starts the trial's clock, and with reuse_actors once for all
# the trials it runs. MLflow with its SQL store takes ~1.4 s to import on the CPU.
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import ray
import ray.tune
import torch
from ray.tune.schedulers import ASHAScheduler

from tune import tracking
from tune.config import TrialConfig
from tune.data import Dataset
from tune.tracking import TrialRun
from tune.train import train

STATE_FILE, META_FILE = "state.pt", "meta.json"
REPORTED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds",
            "best_epoch", "best_val_loss", "best_val_acc", "test_loss", "test_acc")


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares besides its config. Paths and URIs are absolute."""

    sweep_id: str
    tracking_uri: str
    scheduler: str
    checkpoint_every: int
    git_commit: str
    versions: str


def trial_values(config: dict) -> tuple[str, dict]:
    """Ray's config -> (experiment, TrialConfig fields). Grid trials nest theirs under "trial"."""
    values = {**config.get("trial", {}), **{k: v for k, v in config.items() if k != "trial"}}
    return values.pop("experiment"), values


def run_trial(config: dict, dataset: Dataset, sweep: SweepContext) -> None:
    experiment, values = trial_values(config)
    cfg = TrialConfig.from_dict(values)
    trial_id = ray.tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    state, run_id = None, None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            run_id = json.loads((Path(folder) / META_FILE).read_text())["mlflow_run_id"]
    tags = {"sweep_id": sweep.sweep_id, "trial_id": trial_id, "git_commit": sweep.git_commit,
            "versions": sweep.versions, "scheduler": sweep.scheduler, "node_id": node_id,
            "run_name": f"{experiment}-{trial_id}"}
    run = TrialRun.open(sweep.tracking_uri, experiment, cfg, tags, run_id)
    # A retried trial trains the epochs after its checkpoint again; exact restore makes
    # them identical, so the ones its run already holds are not logged twice.
    already_logged = run.logged_epochs()
    closed = False

    def on_epoch(metrics: dict, snapshot: dict) -> bool:
        nonlocal closed
        epoch = metrics["epoch"]
        if epoch not in already_logged:
            run.log_epoch(metrics)
        if metrics["final"]:
            # Close the run before the last report: a scheduler may stop the trial on it.
            run.finish(metrics["stopped_by"])
            closed = True
        report = {k: metrics[k] for k in REPORTED} | {"mlflow_run_id": run.run_id, "node_id": node_id, "pid": os.getpid()}
        if metrics["final"] or epoch % sweep.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(snapshot, Path(folder) / STATE_FILE)
                (Path(folder) / META_FILE).write_text(json.dumps({"mlflow_run_id": run.run_id, "epoch": epoch}))
                ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(folder))
        else:
            ray.tune.report(report)
        return False

    result = train(cfg, dataset, state, on_epoch)
    if not closed:
        # Divergence ends the trial without raising, so Ray does not retry it; and a trial
        # restored from its final checkpoint trains no epoch but must still close its run.
        run.finish(result["stopped_by"], result["reason"])
    if result["stopped_by"] == "error":
        # Ray needs the metric in a trial's last result; a diverged trial ranks last.
        ray.tune.report({k: result[k] for k in REPORTED if k in result} | {
            "epoch": result["epochs_run"], "mlflow_run_id": run.run_id, "node_id": node_id, "pid": os.getpid()})


class RunStatusCallback(ray.tune.Callback):
    """On the driver: ends the MLflow run of a trial that could not end it itself.

    A trial cannot see that the scheduler stopped it, so its run would stay RUNNING.
    """

    def __init__(self, uri: str, sweep_id: str):
        self.uri, self.sweep_id = uri, sweep_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "scheduler")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "error", str(getattr(trial, "error_msg", "") or "the trial raised"))

    def _close(self, trial, stopped_by: str, reason: str = "") -> None:
        client = tracking.client(self.uri)
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id is None:
            experiment, _ = trial_values(trial.config)
            found = tracking.find_run(client, experiment, self.sweep_id, trial.trial_id)
            run_id = found.info.run_id if found else None
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            tracking.finish_run(client, run_id, stopped_by, reason)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive `Tuner.restore`.

    Ray does not checkpoint the scheduler: a restored sweep gets the ASHA pickled
    at its start, with empty rungs (ray-project/ray#30838), so it would cut less.
    Every result ASHA ever saw is also in the trials' MLflow runs (best_val_loss
    per epoch, our time_attr). When a restored trial that already has results is
    added, its history is replayed into its bracket; the rungs end up as they were.
    """

    def __init__(self, tracking_uri: str, sweep_id: str, **kwargs):
        super().__init__(**kwargs)
        self.tracking_uri, self.sweep_id = tracking_uri, sweep_id

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if not trial.last_result:
            return  # a new trial: nothing to replay
        client = tracking.client(self.tracking_uri)
        experiment, _ = trial_values(trial.config)
        run = tracking.find_run(client, experiment, self.sweep_id, trial.trial_id)
        if run is None:
            return
        bracket = self._trial_info[trial.trial_id]
        for m in sorted(client.get_metric_history(run.info.run_id, self._metric), key=lambda m: m.step):
            bracket.on_result(trial, m.step, self._metric_op * m.value)
