"""`python -m tune study`: a catalogue experiment as plain processes on one machine, no Ray, no MLflow.

The same distinct trials `make sweep` would run (tune.sweep.plan), each to its end (FIFO), each as
its own `python -m tune train --record` process writing one run record. Trials are packed onto the
GPUs it finds, `per_gpu` at a time on each; without GPUs, `workers` at a time on the CPU. A trial
whose record is finished is skipped, and one that was cut short continues from its last saved
state, so a second command picks up where the first one stopped. `python -m tune import` then
logs the records into MLflow.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tune import record, sweep
from tune.config import TrialConfig, UserError


@dataclass
class StudyArgs:
    experiment: str
    record: str
    smoke: bool = False
    seeds: int = 1
    set: list | None = None
    grid: list | None = None
    data: str | None = None
    per_gpu: int = 4
    workers: int | None = None
    threads: int = 1
    checkpoint_every: int = 10
    limit_trials: int | None = None


def train_argv(cfg: TrialConfig) -> list[str]:
    """The `tune train` options that rebuild `cfg` exactly."""
    argv = []
    for name, value in cfg.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(args: StudyArgs) -> int:
    p = sweep.plan(sweep.SweepArgs(args.experiment, smoke=args.smoke, seeds=args.seeds, set=args.set, grid=args.grid,
                                   data=args.data))
    if not p.trials:
        raise UserError(f"{args.experiment} is an Optuna search; the study runner runs grid experiments only")
    if args.per_gpu < 1 or args.threads < 1 or (args.workers is not None and args.workers < 1):
        raise UserError("--per-gpu, --threads and --workers must be at least 1")
    out = Path(args.record)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--record {out} is not a writable folder ({e.strerror or e}); pass another") from None
    gpus = gpu_count()
    slots = [str(g) for g in range(gpus) for _ in range(args.per_gpu)] if gpus else \
        [None] * (args.workers or max(1, (os.cpu_count() or 1) // args.threads))
    todo, done = [], 0
    for t in p.trials[:args.limit_trials]:
        path = out / (record.name_for(t.experiment, t.config) + record.SUFFIX)
        if path.exists() and _finished(path):
            done += 1
        else:
            todo.append((t, path))
    where = f"{gpus} GPU(s), {args.per_gpu} per GPU" if gpus else f"the CPU, {len(slots)} at a time"
    print(f"study {args.experiment}: {len(todo) + done} trials, {done} already recorded in {out}; running {len(todo)} on "
          f"{where}, {args.threads} thread(s) each", file=sys.stderr, flush=True)
    running: dict[int, tuple] = {}  # slot -> (process, trial, path, start)
    failed, t0 = [], time.time()
    while todo or running:
        for slot in [s for s in range(len(slots)) if s not in running][:len(todo)]:
            t, path = todo.pop(0)
            running[slot] = (_launch(t, path, slots[slot], args), t, path, time.time())
        time.sleep(0.5)
        for slot, (proc, t, path, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            done += 1
            status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see {path.stem}.log)"
            if proc.returncode != 0:
                failed.append(path)
            c = t.config
            print(f"[{done}/{done + len(todo) + len(running)}] {t.experiment} {c.model} dropout {c.dropout:g} order "
                  f"{c.order} seed {c.seed}: {status} in {time.time() - start:.0f} s ({time.time() - t0:.0f} s in all)",
                  file=sys.stderr, flush=True)
    print(f"records in {out}; log them into MLflow with `python -m tune import {out}`", file=sys.stderr)
    return 1 if failed else 0


def _finished(path: Path) -> bool:
    try:
        return record.read(path).finished
    except record.RecordError:
        return False


def _launch(t, path: Path, gpu: str | None, args: StudyArgs) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    argv = [sys.executable, "-m", "tune", "train", *train_argv(t.config), "--record", str(path.parent),
            "--parts", ",".join(t.parts), "--threads", str(args.threads), "--checkpoint-every", str(args.checkpoint_every),
            "--resume", *(["--smoke-record"] if args.smoke else [])]
    log = path.with_name(path.stem + ".log").open("a")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
