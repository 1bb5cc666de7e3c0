"""The Ray Tune function trainable: the one training loop, reporting to Ray and logging to MLflow.

It copies nothing of the loop. Per epoch it logs to the trial's own MLflow run,
reports to Ray, and every `checkpoint_every` epochs (and at the end) hands Ray
a checkpoint holding the loop's state and the MLflow run id.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Imported with this module, not when a trial opens its run: a worker imports this module as it
# receives the trainable, before Ray starts the trial's clock, and with reuse_actors once for all
# the trials it runs. MLflow with its SQL store takes ~1.4 s to import on the CPU.
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import ray
import ray.tune
import torch
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from tune import catalogue, tracking
from tune.config import TrialConfig
from tune.data import Dataset, split
from tune.tracking import TrialRun
from tune.train import network, train

STATE_FILE, META_FILE = "state.pt", "meta.json"
REPORTED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds",
            "best_epoch", "best_val_loss", "best_val_acc", "test_loss", "test_acc", "final")
METRIC = "best_val_loss"  # what every scheduler and searcher ranks by (mode min)


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares besides its config. Paths and URIs are absolute."""

    sweep_id: str
    tracking_uri: str
    schedulers: dict
    """experiment -> asha or fifo"""
    checkpoint_every: int
    git_commit: str
    versions: str
    smoke: bool = False
    """--smoke: the runs show the pipeline works and are no evidence"""
    data_digest: str = ""
    """tune.data.digest of the sweep's dataset"""
    save_weights: bool = True
    """log each finished trial's best weights (tracking.WEIGHTS)"""
    parents: dict = dataclasses.field(default_factory=dict)
    """experiment -> the sweep's run there (tracking.SweepRun), which a trial's run is nested under"""


def trial_values(config: dict) -> tuple[tuple[str, ...], dict]:
    """Ray's config -> (the experiments it belongs to, TrialConfig fields). Grid trials nest theirs under "trial"."""
    values = {**config.get("trial", {}), **{k: v for k, v in config.items() if k != "trial"}}
    return tuple(values.pop("parts")), values


def trial_groups(config: dict) -> list[str]:
    """The groups (experiment/model) a trial is ranked in."""
    parts, values = trial_values(config)
    return list(dict.fromkeys(catalogue.group_name(part, values.get("model", TrialConfig.model)) for part in parts))


def run_trial(config: dict, dataset: Dataset, sweep: SweepContext) -> None:
    parts, values = trial_values(config)
    experiment = parts[0]
    cfg = TrialConfig.from_dict(values)
    trial_id = ray.tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    state, run_id = None, None
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            run_id = json.loads((Path(folder) / META_FILE).read_text())["mlflow_run_id"]
    sizes = split(dataset, cfg.val_size, cfg.limit, cfg.eval_limit)
    # A shared trial has one scheduler per part, in the order of `parts`.
    tags = {"sweep_id": sweep.sweep_id, "trial_id": trial_id, "git_commit": sweep.git_commit,
            "versions": sweep.versions, "parts": ",".join(parts),
            "scheduler": ",".join(sweep.schedulers.get(p, "fifo") for p in parts), "node_id": node_id,
            "train_images": str(len(sizes.train_y)), "val_images": str(len(sizes.val_y)),
            "test_images": str(len(sizes.test_y)), "smoke": str(sweep.smoke).lower(), "data_digest": sweep.data_digest,
            # Results are bit-identical only at the same thread count (Ray sets it to the trial's CPUs).
            "threads": str(torch.get_num_threads()), "network": str(network(cfg)),
            "run_name": tracking.run_name(cfg)}
    if experiment in sweep.parents:
        tags[tracking.PARENT] = sweep.parents[experiment]
    run = TrialRun.open(sweep.tracking_uri, experiment, cfg, tags, run_id)
    # A retried trial trains the epochs after its checkpoint again; exact restore makes
    # them identical, so the ones its run already holds are not logged twice.
    already_logged = run.logged_epochs()
    closed = False

    def on_epoch(metrics: dict, snapshot: dict) -> None:
        nonlocal closed
        epoch = metrics["epoch"]
        if epoch not in already_logged:
            run.log_epoch(metrics)
        if metrics["final"]:
            if sweep.save_weights and metrics["stopped_by"] != "error" and snapshot["best_weights"] is not None:
                run.log_weights(snapshot["best_weights"], cfg, metrics["best_epoch"])
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

    result = train(cfg, dataset, state, on_epoch)
    if not closed:
        # Divergence ends the trial without raising, so Ray does not retry it; and a trial
        # restored from its final checkpoint trains no epoch but must still close its run.
        run.finish(result["stopped_by"], result["reason"])
    if result["stopped_by"] == "error":
        # Ray needs the metric in a trial's last result; a diverged trial ranks last.
        ray.tune.report({k: result[k] for k in REPORTED if k in result} | {
            "epoch": result["epochs_run"], "final": True, "mlflow_run_id": run.run_id, "node_id": node_id, "pid": os.getpid()})


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
            parts, _ = trial_values(trial.config)
            found = tracking.find_run(client, parts[0], self.sweep_id, trial.trial_id)
            run_id = found.info.run_id if found else None
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            tracking.finish_run(client, run_id, stopped_by, reason)


class Progress(ray.tune.Callback):
    """One status line on stderr every `every` seconds: trial-epochs done of the most the sweep can run,
    trials running, done, cut and errored, and an ETA from the epoch times seen and the concurrency.
    (An upper bound while ASHA may still cut trials.) The same figures go to the sweep's runs in MLflow."""

    def __init__(self, trials: int, max_trial_epochs: int, parents: dict | None = None, uri: str = "",
                 sweep_id: str = "", every: float = 30.0):
        self.trials, self.max_epochs, self.every = trials, max_trial_epochs, every
        self.parents, self.uri, self.sweep_id = parents or {}, uri, sweep_id
        self.epochs, self.seconds, self.done, self.cut, self.errored = 0, 0.0, 0, 0, 0
        self.running: set[str] = set()
        self.last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running.add(trial.trial_id)
        if "epoch_seconds" in result:
            self.epochs += 1
            self.seconds += result["epoch_seconds"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        final = (trial.last_result or {}).get("final", True)
        self.done += final
        self.cut += not final

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored += 1

    def eta(self) -> float:
        """Seconds left at most, from the mean epoch time and the trials running; NaN before the first epochs."""
        if not (self.epochs and self.running):
            return math.nan
        return max(0, self.max_epochs - self.epochs) * (self.seconds / self.epochs) / len(self.running)

    def figures(self) -> dict:
        return {"progress_trial_epochs": self.epochs, "progress_max_trial_epochs": self.max_epochs,
                "progress_trials_running": len(self.running), "progress_trials_done": self.done,
                "progress_trials_cut": self.cut, "progress_trials_errored": self.errored,
                "progress_trials": self.trials, "progress_eta_seconds": self.eta()}

    def line(self) -> str:
        eta = self.eta()
        if math.isfinite(eta):
            eta_text = f"ETA at most {int(eta // 3600)}:{int(eta // 60 % 60):02d}:{int(eta % 60):02d}"
        else:
            eta_text = "ETA after the first epochs"
        return (f"progress: {self.epochs} of at most {self.max_epochs} trial-epochs; trials {len(self.running)} running, "
                f"{self.done} done, {self.cut} cut, {self.errored} errored of {self.trials}; {eta_text}")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)
            self.log()

    def on_experiment_end(self, trials, **info):
        self.log()

    def log(self) -> None:
        if self.parents:
            tracking.SweepRun(self.uri, self.sweep_id, self.parents).log(
                {k: v for k, v in self.figures().items() if math.isfinite(v)}, self.epochs)


class GroupScheduler(FIFOScheduler):
    """One scheduler per group (experiment/model) inside one Ray Tune run.

    An ASHA group ranks its own trials only: the MLPs of a dropout grid never
    meet its CNNs or another experiment's trials. FIFO groups never stop a trial.
    A trial shared by several groups (the baseline of an ablation is a point of
    a dropout grid) feeds every ASHA group it is in, so it is ranked there like
    any other, but it stops only when every group it is in says stop: a trial
    of a FIFO part always runs to the end.

    Ray does not checkpoint schedulers (ray-project/ray#30838); `SchedulerState`,
    a callback, carries the rungs through Ray's saved experiment state.
    """

    def __init__(self, groups: dict[str, dict | None], rungs_file: str | None = None):
        """groups: name -> ASHA arguments (max_t, grace_period, reduction_factor), or None for FIFO.
        rungs_file: where the rungs are written each time a trial ends, for a person to inspect."""
        super().__init__()
        self.rungs_file = rungs_file
        self.fifo = {name for name, asha in groups.items() if asha is None}
        self.asha = {name: ASHAScheduler(metric=METRIC, mode="min", time_attr="epoch", **asha)
                     for name, asha in groups.items() if asha is not None}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return metric in (None, METRIC) and mode in (None, "min")

    def _ashas(self, trial):
        return [self.asha[g] for g in trial_groups(trial.config) if g in self.asha]

    def on_trial_add(self, tune_controller, trial):
        for asha in self._ashas(trial):
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        groups = trial_groups(trial.config)
        # Every ASHA group records the result, whatever the others decide.
        decisions = [self.asha[g].on_trial_result(tune_controller, trial, result) for g in groups if g in self.asha]
        if not decisions or any(g in self.fifo for g in groups):
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP if all(d == TrialScheduler.STOP for d in decisions) else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result):
        for asha in self._ashas(trial):
            asha.on_trial_complete(tune_controller, trial, result)
        if self.rungs_file and self.asha:
            write_rungs(self.rungs_file, self.rungs())

    def on_trial_remove(self, tune_controller, trial):
        for asha in self._ashas(trial):
            asha.on_trial_remove(tune_controller, trial)

    def rungs(self) -> dict[str, list]:
        """group -> [[milestone, {trial_id: value}], ...], highest milestone first (ASHA's order)."""
        return {name: [[m, dict(rec)] for m, rec in asha._brackets[0]._rungs] for name, asha in self.asha.items()}

    def set_rungs(self, rungs: dict[str, list]) -> None:
        for name, saved in rungs.items():
            if name in self.asha:
                bracket = self.asha[name]._brackets[0]
                bracket._rungs = [(m, dict(rec)) for m, rec in saved]

    def debug_string(self) -> str:
        lines = [f"{name}: " + " | ".join(f"epoch {m}: {len(rec)} ranked" for m, rec in reversed(rungs))
                 for name, rungs in self.rungs().items()]
        return "\n".join(["Group scheduler (ASHA per group, FIFO elsewhere)", *lines])


class PrunableOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch tells Optuna that a trial ASHA stopped COMPLETEd, with its truncated value
    ranked like a full run's. Here it is PRUNED: TPE then weighs it by its intermediate values only."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and not result.get("final", True):
            result = None  # no value and no error: Ray's OptunaSearch tells PRUNED
        super().on_trial_complete(trial_id, result, error)


class SchedulerState(ray.tune.Callback):
    """Saves the group scheduler's rungs with Ray's experiment state, and puts them back on restore.

    Tuner.restore unpickles this callback and the scheduler from one file, so it
    still holds the scheduler Ray runs; Ray restores callback state before it
    re-adds the trials. On restore the rungs are also written to `rungs_file`.
    """

    def __init__(self, scheduler: GroupScheduler, rungs_file: str):
        """rungs_file: where the restored rungs are written."""
        self.scheduler, self.rungs_file = scheduler, rungs_file

    def get_state(self) -> dict | None:
        return {"rungs": self.scheduler.rungs()}

    def set_state(self, state: dict) -> None:
        self.scheduler.set_rungs(state["rungs"])
        write_rungs(self.rungs_file, self.scheduler.rungs())


def write_rungs(path: str, rungs: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(rungs, indent=1, sort_keys=True))
    tmp.replace(path)
