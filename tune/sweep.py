"""The sweep driver: validate everything, load the data once, run the trials on Ray Tune.

Every check that can fail on user input runs before Ray or MLflow is touched,
so bad input leaves nothing behind.
"""

import dataclasses
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tune import catalogue, provenance, tracking
from tune import data as datasets
from tune.config import TrialConfig, UserError


@dataclass
class SweepArgs:
    experiment: str
    smoke: bool = False
    seeds: int = 1
    samples: int | None = None
    set: list | None = None
    grid: list | None = None
    scheduler: str | None = None
    grace_period: int | None = None
    reduction_factor: int | None = None
    data: str | None = None
    address: str | None = None
    storage: str = "./ray_results"
    tracking_uri: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    checkpoint_every: int = 10
    max_failures: int = 2
    reuse_actors: bool = True
    resume: bool = False
    sweep_id: str | None = None
    verbose: int = 1
    num_gpus: int | None = None
    save_weights: bool = True


@dataclass(frozen=True)
class Group:
    """Trials that answer one question: one experiment's trials of one model. A scheduler ranks a
    trial only against its own group."""

    name: str
    """experiment/model, e.g. dropout-mlp/mlp"""
    scheduler: str
    """asha or fifo"""
    epochs: int
    """max_t: the most epochs a trial of the group runs"""
    grace_period: int = 0
    reduction_factor: int = 0

    def describe(self) -> str:
        if self.scheduler == "fifo":
            return f"{self.name} fifo"
        return f"{self.name} asha (grace {self.grace_period}, rf {self.reduction_factor})"


@dataclass
class Plan:
    """A validated sweep, ready to hand to Ray."""

    experiment: catalogue.Experiment
    trials: list[catalogue.Trial]  # grid experiments: every distinct trial once
    search_base: dict | None  # search experiments: the fixed fields
    samples: int
    epochs: int
    groups: dict[str, Group]
    data: str
    data_dir: str

    @property
    def experiments(self) -> list[str]:
        return sorted({p for t in self.trials for p in t.parts}) if self.trials else [self.experiment.name]

    @property
    def n_trials(self) -> int:
        return len(self.trials) if self.trials else self.samples

    @property
    def max_trial_epochs(self) -> int:
        return sum(t.config.epochs for t in self.trials) if self.trials else self.samples * self.epochs

    @property
    def schedulers(self) -> dict[str, str]:
        """experiment -> its scheduler"""
        return {g.name.split("/")[0]: g.scheduler for g in self.groups.values()}


def plan(args: SweepArgs) -> Plan:
    exp = catalogue.get(args.experiment)
    sets = catalogue.parse_assignments(args.set, "--set")
    grids = catalogue.parse_assignments(args.grid, "--grid")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds} must be at least 1")
    if args.scheduler not in (None, "asha", "fifo"):
        raise UserError(f"--scheduler {args.scheduler!r} is unknown; use asha or fifo")
    base = dict(catalogue.SMOKE) if args.smoke else {}
    if args.data:
        base["data"] = args.data
    # Trials run in their own working directories, maybe on other machines: every path absolute.
    for scope in (base, sets):
        for key in [k for k in scope if k.split(".")[-1] == "data"]:
            scope[key] = datasets.resolve(scope[key])
        for key in [k for k in scope if k.split(".")[-1] == "data_dir"]:
            scope[key] = os.path.abspath(scope[key])
    base.setdefault("data_dir", os.path.abspath(TrialConfig.data_dir))
    if exp.search:
        if args.seeds != 1 or grids:
            raise UserError(f"{exp.name} is an Optuna search: --seeds and --grid apply to grid experiments only")
        samples = args.samples or exp.samples
        if samples < 1:
            raise UserError(f"--samples {samples} must be at least 1")
        fixed = catalogue.apply_overrides({**base, **exp.variants[0]}, sets)
        # Validate the fixed part with one point of the space, so errors surface now.
        probe = {k: (v[1] if v[0] != "choice" else v[1][0]) for k, v in exp.search.items()}
        try:
            cfg = TrialConfig.from_dict({**fixed, **probe})
        except UserError as e:
            raise UserError(f"experiment {exp.name}: {e}") from None
        trials, search_base = [], {k: v for k, v in cfg.to_dict().items() if k not in exp.search}
        members = [((exp.name,), cfg)]
    else:
        trials, search_base, samples = catalogue.expand(exp.name, sets, grids, args.seeds, base), None, 0
        members = [(t.parts, t.config) for t in trials]
    sources = {(c.data, c.data_dir) for _, c in members}
    if len(sources) > 1:
        raise UserError("trials of one sweep must share one dataset; set --data once, not per model")
    data, data_dir = sources.pop()
    epochs: dict[str, int] = {}
    for parts, cfg in members:
        for part in parts:
            name = catalogue.group_name(part, cfg.model)
            epochs[name] = max(epochs.get(name, 0), cfg.epochs)
    groups = {name: _group(name, e, args) for name, e in epochs.items()}
    return Plan(exp, trials, search_base, samples, max(epochs.values()), groups, data, data_dir)


def _group(name: str, epochs: int, args: SweepArgs) -> Group:
    part = catalogue.get(name.split("/")[0])
    scheduler = args.scheduler or part.scheduler
    if scheduler == "fifo":
        return Group(name, "fifo", epochs)
    grace = args.grace_period or max(1, round(epochs * part.grace_fraction))
    reduction = args.reduction_factor or part.reduction_factor
    if grace > epochs or reduction < 2:
        raise UserError(f"ASHA ({name}) needs 1 <= grace period <= epochs ({epochs}) and reduction factor >= 2; "
                        f"got {grace} and {reduction}")
    return Group(name, "asha", epochs, grace, reduction)


def _check_storage(storage: str) -> str:
    if "://" in storage:
        return storage  # a cloud URI: Ray checks it
    path = Path(storage).expanduser().absolute()
    if not tracking.can_write_in(path):
        raise UserError(f"storage path {path} is not writable; pass --storage with a writable folder "
                        f"(a shared filesystem or cloud URI on a multi-node cluster)")
    return str(path)


def _connect(address: str | None, gpus_per_trial: float | None, cpus_per_trial: float, num_gpus: int | None):
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        _check_port(address)
    if num_gpus is not None and address is not None:
        raise UserError("--num-gpus declares GPUs of a local Ray instance; a cluster's GPUs are its own (drop --num-gpus)")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=True,
                 **({"include_dashboard": False, "num_gpus": num_gpus} if address is None else {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot reach the Ray cluster at {address} ({first}); start it with `ray start --head` "
                        f"or fix --address / RAY_ADDRESS") from None
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus_per_trial is None:
        # Small models leave most of a GPU idle: pack four trials on each by default.
        gpus_per_trial = 0.25 if gpus else 0.0
    if gpus_per_trial > gpus:
        raise UserError(f"--gpus-per-trial {gpus_per_trial} is more than the cluster's {gpus:g} GPUs; lower it")
    if cpus_per_trial > cpus:
        raise UserError(f"--cpus-per-trial {cpus_per_trial} is more than the cluster's {cpus:g} CPUs; lower it")
    return gpus_per_trial


def _check_port(address: str) -> None:
    """ray.init retries an unreachable address for minutes: fail in seconds instead."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    fix = "start it with `ray start --head`, or fix --address / RAY_ADDRESS"
    if not host or not port.isdigit():
        raise UserError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT); {fix}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); {fix}") from None


def _scheduler(p: Plan, folder: Path):
    from tune.trainable import GroupScheduler

    # time_attr is our epoch counter, not training_iteration, which restarts on restore.
    return GroupScheduler({g.name: None if g.scheduler == "fifo" else
                           {"max_t": g.epochs, "grace_period": g.grace_period, "reduction_factor": g.reduction_factor}
                           for g in p.groups.values()}, str(folder / RUNGS_FILE))


def _param_space(p: Plan) -> dict:
    import ray.tune

    if p.trials:
        return {"trial": ray.tune.grid_search([{"parts": list(t.parts), **t.config.to_dict()} for t in p.trials])}
    space = {"parts": [p.experiment.name], **p.search_base}
    for name, (kind, *spec) in p.experiment.search.items():
        space[name] = {"uniform": lambda: ray.tune.uniform(*spec), "loguniform": lambda: ray.tune.loguniform(*spec),
                       "choice": lambda: ray.tune.choice(spec[0])}[kind]()
    return space


SWEEP_FILE = "sweep.json"  # beside Ray's experiment state: what --resume needs to rebuild the sweep
# ASHA's rungs per group as each trial ends, and as a resume put them back: for a person (and a test) to check.
RUNGS_FILE, RESTORED_RUNGS_FILE = "rungs.json", "rungs.restored.json"
# TPE learns only from trials that returned: without a cap it would draw most samples before the first
# one ends. Four keeps 2-core machines busy and lets TPE see results after its random start.
SEARCH_CONCURRENCY = 4


def _max_concurrent(args: SweepArgs, p: Plan) -> int | None:
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise UserError(f"--max-concurrent {args.max_concurrent} must be at least 1")
        return args.max_concurrent
    return SEARCH_CONCURRENCY if p.experiment.search else None


def _sweep_dirs(storage: str) -> list[Path]:
    """Sweeps in `storage`, newest first."""
    root = Path(storage)
    found = [p.parent for p in root.glob(f"*/{SWEEP_FILE}")] if root.is_dir() else []
    return sorted(found, key=lambda d: (d / SWEEP_FILE).stat().st_mtime, reverse=True)


def _resume_args(args: SweepArgs) -> SweepArgs:
    """The arguments of the sweep to resume, from its sweep.json."""
    storage = _check_storage(args.storage)
    if args.sweep_id:
        folder = Path(storage) / args.sweep_id
        if not (folder / SWEEP_FILE).is_file():
            raise UserError(f"there is no sweep {args.sweep_id!r} in {storage} to resume; check --sweep-id and --storage")
        saved = json.loads((folder / SWEEP_FILE).read_text())
        if saved["finished"]:
            raise UserError(f"sweep {args.sweep_id} already finished; nothing to resume (start a new sweep without --resume)")
    else:
        unfinished = [json.loads((d / SWEEP_FILE).read_text()) for d in _sweep_dirs(storage)]
        unfinished = [s for s in unfinished if not s["finished"]]
        if not unfinished:
            raise UserError(f"nothing to resume: no interrupted sweep in {storage}; start one without --resume")
        saved = unfinished[0]
    # Where it runs may change between attempts; what it runs may not.
    keep = {"address": args.address, "verbose": args.verbose, "resume": True}
    return SweepArgs(**{**saved["args"], **keep})


def _write_sweep_file(folder: Path, args: SweepArgs, finished: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps({"args": dataclasses.asdict(args), "finished": finished}, indent=1))
    tmp.replace(folder / SWEEP_FILE)


def run(args: SweepArgs) -> int:
    if args.resume:
        args = _resume_args(args)
    p = plan(args)
    storage = _check_storage(args.storage)
    uri = tracking.resolve_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        raise UserError("--cpus-per-trial must be positive and --gpus-per-trial at least 0")
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every {args.checkpoint_every} must be at least 1")
    max_concurrent = _max_concurrent(args, p)
    dataset = datasets.load(p.data, p.data_dir)
    gpus_per_trial = _connect(args.address, args.gpus_per_trial, args.cpus_per_trial, args.num_gpus)
    import ray.tune

    from tune.trainable import METRIC, Progress, RunStatusCallback, SchedulerState, SweepContext, run_trial

    # Pin every resolved value, so a resume rebuilds exactly this sweep.
    args = dataclasses.replace(args, storage=storage, tracking_uri=uri, gpus_per_trial=gpus_per_trial,
                               sweep_id=args.sweep_id or f"{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
    sweep_id, folder = args.sweep_id, Path(storage) / args.sweep_id
    verb = "resuming" if args.resume else "sweep"
    print(f"{verb} {sweep_id}: {p.n_trials} trials of {args.experiment}, at most {p.max_trial_epochs} trial-epochs; "
          f"each group ranked on its own: {'; '.join(g.describe() for g in p.groups.values())}; "
          f"{args.cpus_per_trial:g} CPU and {gpus_per_trial:g} GPU per trial", file=sys.stderr)
    client = tracking.client(uri)
    commit, digest = provenance.git_commit(), datasets.digest(dataset)
    sweep_run = tracking.SweepRun.open(uri, sweep_id, p.experiments, _settings(args, p, digest, commit),
                                       _description(args, p), commit)
    ctx = SweepContext(sweep_id, uri, p.schedulers, args.checkpoint_every, commit, provenance.versions(),
                       args.smoke, digest, args.save_weights, sweep_run.run_ids)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, dataset=dataset, sweep=ctx),
        {"cpu": args.cpus_per_trial, "gpu": gpus_per_trial})
    if args.resume:
        # Finished trials stay finished; unfinished and errored ones continue from their checkpoints.
        tuner = ray.tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        search_alg = None
        if p.experiment.search:
            from tune.trainable import PrunableOptunaSearch

            # Seeded from the trials' base seed (--set seed=), so a search can be repeated.
            search_alg = PrunableOptunaSearch(seed=p.search_base["seed"])
        _write_sweep_file(folder, args, finished=False)
        scheduler = _scheduler(p, folder)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=_param_space(p),
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="min", scheduler=scheduler, search_alg=search_alg,
                num_samples=p.samples if p.experiment.search else 1, max_concurrent_trials=max_concurrent,
                trial_dirname_creator=_trial_dirname, reuse_actors=args.reuse_actors),
            run_config=ray.tune.RunConfig(
                name=sweep_id, storage_path=storage, verbose=args.verbose,
                failure_config=ray.tune.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
                callbacks=[RunStatusCallback(uri, sweep_id), SchedulerState(scheduler, str(folder / RESTORED_RUNGS_FILE)),
                           Progress(p.n_trials, p.max_trial_epochs, sweep_run.run_ids, uri, sweep_id)]),
        )
    results = tuner.fit()
    unfinished = _unfinished_trials(folder)
    errored = {r.metrics.get("trial_id") for r in results if r.error is not None and r.metrics}
    # Close the runs no trial could close: those a Ctrl-C cut short (a resume reopens them),
    # and any left RUNNING by a scheduler stop that raced a crash.
    for run in tracking.sweep_runs(client, p.experiments, sweep_id):
        trial_id = run.data.tags.get("trial_id")
        if not tracking.is_trial(run.data.tags):
            continue
        if trial_id in unfinished:
            tracking.finish_run(client, run.info.run_id, "killed")
        elif run.info.status == "RUNNING":
            tracking.finish_run(client, run.info.run_id, "error" if trial_id in errored else "scheduler")
    if unfinished:
        resume = f"python -m tune sweep --resume --sweep-id {sweep_id} --storage {storage}"
        print(f"\nsweep {sweep_id} interrupted; unfinished runs are marked KILLED. Resume it with:\n  {resume}",
              file=sys.stderr)
        sweep_run.close({name: f"Interrupted with {len(unfinished)} trials unfinished; resume with `{resume}`."
                         for name in p.experiments}, "KILLED")
        return 130
    _write_sweep_file(folder, args, finished=True)
    sweep_run.close(_summary(results, sweep_id, uri, p, sweep_run), "FINISHED")
    return 0 if not results.errors else 1


def _settings(args: SweepArgs, p: Plan, digest: str, commit: str) -> dict:
    """The sweep run's params: what a user needs to know what this sweep was."""
    return {"experiment": args.experiment, "experiments": ",".join(p.experiments), "trials": p.n_trials,
            "max_trial_epochs": p.max_trial_epochs, "seeds": args.seeds, "smoke": args.smoke,
            "schedulers": "; ".join(g.describe() for g in p.groups.values()), "data": p.data, "data_digest": digest,
            "git_commit": commit, "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial}


def _description(args: SweepArgs, p: Plan) -> str:
    groups = "\n".join(f"- `{g.describe()}`" for g in p.groups.values())
    return (f"Sweep of `{args.experiment}`{' (smoke: no evidence)' if args.smoke else ''}: {p.n_trials} trials, at most "
            f"{p.max_trial_epochs} trial-epochs, data `{p.data}`. Each group is ranked on its own:\n\n{groups}\n\n"
            "Its trials are the nested runs below this one; progress is in this run's metrics.")


def _unfinished_trials(folder: Path) -> set[str]:
    """Trials that Ray's saved experiment state would continue on restore (an interrupted sweep has some)."""
    # Named by start time; mtimes are useless, Ray's final sync rewrites every state file.
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return set()
    trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    return {t["trial_id"] for t in trials if t.get("status") not in ("TERMINATED", "ERROR")}


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _summary(results, sweep_id: str, uri: str, p: Plan, sweep_run: "tracking.SweepRun") -> dict[str, str]:
    """Print the outcome, log it to the sweep's runs, and return each experiment's outcome in Markdown."""
    from tune.trainable import trial_groups, trial_values

    best: dict[str, dict] = {}
    epochs = 0
    per_experiment = {name: {"trials": 0, "epochs": 0, "errored": 0} for name in p.experiments}
    for r in results:
        m = r.metrics or {}
        parts, values = trial_values(r.config)
        for part in parts:
            per_experiment[part]["trials"] += 1
            per_experiment[part]["epochs"] += int(m.get("epoch", 0))
            per_experiment[part]["errored"] += r.error is not None
        if not m or not math.isfinite(m.get("best_val_loss", math.nan)):
            continue
        epochs += int(m.get("epoch", 0))
        for group in trial_groups(r.config):
            if group not in best or m["best_val_loss"] < best[group]["best_val_loss"]:
                best[group] = {**m, "values": values}
    print(f"\nsweep {sweep_id} done: {len(results)} trials, {epochs} trial-epochs "
          f"(a full grid is {p.max_trial_epochs}); {len(results.errors)} errored", file=sys.stderr)
    sweep_run.log({"trials": len(results), "trial_epochs_run": epochs, "trial_epochs_full_grid": p.max_trial_epochs,
                   "trials_errored": len(results.errors)}, epochs)
    outcome = {}
    for name, n in per_experiment.items():
        rows = [f"| {g} | {_best_text(m['values'])} | {m['best_val_loss']:.4f} | {m['best_epoch']} | "
                f"{100 * m['test_acc']:.2f} | `{m.get('mlflow_run_id', '')[:8]}` |"
                for g, m in sorted(best.items()) if g.split("/")[0] == name]
        outcome[name] = (f"{n['trials']} trials ran {n['epochs']} trial-epochs (the whole sweep: {epochs} of a full "
                         f"grid's {p.max_trial_epochs}); {n['errored']} errored.\n\n"
                         "| group | best by validation loss | val loss | epoch | test acc (%) | run |\n"
                         "|---|---|---|---|---|---|\n" + "\n".join(rows))
    for group, m in sorted(best.items()):
        v = m["values"]
        print(f"  best of {group}: dropout={float(v['dropout']):g} order={v['order']} "
              f"best_val_loss={m['best_val_loss']:.4f} (epoch {m['best_epoch']}) test_acc={m['test_acc']:.4f}",
              file=sys.stderr)
    server = uri if uri.startswith("http") else tracking.UI
    print(f"runs: MLflow experiments {', '.join(p.experiments)} at {uri}; their runs tables"
          + ("" if uri.startswith("http") else " (after `make mlflow-ui`)") + ":", file=sys.stderr)
    client = tracking.client(uri)
    for line in tracking.experiment_links(client, server, p.experiments):
        print(f"  {line}", file=sys.stderr)
    print("the sweep's own run (settings, progress, outcome; its trials nested under it):", file=sys.stderr)
    for name, run_id in sweep_run.run_ids.items():
        print(f"  {name}: {tracking.run_view(server, client.get_experiment_by_name(name).experiment_id, run_id)}",
              file=sys.stderr)
    print("write the report with `make report`", file=sys.stderr)
    return outcome


def _best_text(values: dict) -> str:
    return f"{values.get('model', '')} dropout {float(values.get('dropout', 0)):g}, order {values.get('order', '')}"
