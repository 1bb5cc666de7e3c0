"""Run records: a run written to a file as it trains, for machines without Ray, MLflow or a network.

A record is one JSON-lines file: a header (the config, the experiment it belongs to, the data's
digest and split sizes, the torch thread count, the versions and the git commit), then one line per
epoch, flushed as each epoch ends, then an end line. A killed run keeps every epoch it finished; a
line cut short by the kill is ignored. `python -m tune import` logs records into MLflow with the
schema of sweep trials (tune/tracking.py). This module imports neither Ray nor MLflow.
"""

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tune.config import TrialConfig, UserError

FORMAT = 1
SUFFIX = ".jsonl"


class RecordError(UserError):
    """A record that cannot be read: the message names the file and what is wrong."""


@dataclass
class Record:
    path: Path
    header: dict
    epochs: list[dict] = field(default_factory=list)
    end: dict | None = None
    """None when the run was killed: it holds the epochs it finished"""

    @property
    def config(self) -> TrialConfig:
        return TrialConfig.from_dict(self.header["config"])

    @property
    def finished(self) -> bool:
        return self.end is not None


def now_ms() -> int:
    """Times in records are milliseconds since the epoch, as MLflow keeps them."""
    return int(time.time() * 1000)


def name_for(experiment: str | None, cfg: TrialConfig) -> str:
    """One file per (experiment, configuration, seed): a rerun of the runner finds its records again."""
    return f"{experiment or 'train'}-{cfg.model}-{cfg.key()}-s{cfg.seed}"


class RecordWriter:
    """Appends a run to its record, one flushed line at a time."""

    def __init__(self, path: Path, header: dict, keep_epochs: list[dict] | None = None):
        """A new record at `path`, or, with `keep_epochs`, the record of a run resumed after them."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            for line in [{"kind": "header", "format": FORMAT, **header}, *(keep_epochs or [])]:
                f.write(json.dumps(line) + "\n")
        tmp.replace(path)
        self.file = path.open("a")

    def _write(self, line: dict) -> None:
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())  # a killed process keeps every epoch it reported

    def epoch(self, metrics: dict) -> None:
        self._write({"kind": "epoch", **{k: v for k, v in metrics.items() if k != "final"}, "time": now_ms()})

    def finish(self, result: dict, finished: int | None = None) -> None:
        self._write({"kind": "end", "finished": finished or now_ms(), **result})
        self.file.close()


def header(cfg: TrialConfig, *, experiment: str | None, parts: list[str] | None, data: dict, threads: int,
           git_commit: str, versions: str, smoke: bool = False, network: str = "") -> dict:
    return {"id": uuid.uuid4().hex, "experiment": experiment, "parts": parts or ([experiment] if experiment else []),
            "config": cfg.to_dict(), "config_key": cfg.key(), "data": data, "threads": threads, "git_commit": git_commit,
            "versions": versions, "smoke": smoke, "network": network, "host": os.uname().nodename,
            "started": now_ms()}


def header_for(cfg: TrialConfig, dataset, experiment: str | None, parts: list[str] | None, smoke: bool) -> dict:
    """The header of a record this process trains: the data's digest and split, the threads torch runs, the
    code's commit and versions, the network's printout."""
    import torch

    from tune import data, provenance
    from tune.train import network

    sizes = data.split(dataset, cfg.val_size, cfg.limit, cfg.eval_limit)
    info = {"source": dataset.source, "digest": data.digest(dataset), "train_images": len(sizes.train_y),
            "val_images": len(sizes.val_y), "test_images": len(sizes.test_y)}
    return header(cfg, experiment=experiment, parts=parts, data=info, threads=torch.get_num_threads(),
                  git_commit=provenance.git_commit(), versions=provenance.versions(), smoke=smoke, network=str(network(cfg)))


def read(path: Path) -> Record:
    """A record, up to its last complete epoch. RecordError if it has no readable header."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"record {path} cannot be read ({e}); pass a record file or a folder of *{SUFFIX} records") from None
    try:
        head = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("kind") != "header" or "config" not in head:
        raise RecordError(f"record {path} has no header line; it is not a run record (or its first line is damaged)")
    if head.get("format") != FORMAT:
        raise RecordError(f"record {path} has format {head.get('format')!r}; this version reads format {FORMAT}")
    try:
        TrialConfig.from_dict(head["config"])
    except UserError as e:
        raise RecordError(f"record {path} holds a config this version refuses ({e})") from None
    record = Record(path, head)
    for n, text in enumerate(lines[1:], start=2):
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # the last line, cut short by a kill
            raise RecordError(f"record {path}: line {n} is damaged; only a run's last line may be cut short") from None
        if line.get("kind") == "epoch":
            if line.get("epoch") != len(record.epochs) + 1:
                raise RecordError(f"record {path}: line {n} is epoch {line.get('epoch')}, expected {len(record.epochs) + 1}")
            record.epochs.append(line)
        elif line.get("kind") == "end":
            record.end = line
    return record


def find(paths: list[str]) -> list[Path]:
    """Record files named, or inside the folders named."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob(f"*{SUFFIX}"))
        elif p.is_file():
            out.append(p)
        else:
            raise RecordError(f"{p} does not exist; pass record files or folders that hold them")
    if not out:
        raise RecordError(f"no *{SUFFIX} records in {', '.join(paths)}")
    return out


def state_path(path: Path) -> Path:
    return path.with_name(path.stem + ".state.pt")


def run(cfg: TrialConfig, dataset, path: Path, head: dict, resume: bool = False, checkpoint_every: int = 10,
        on_epoch=None) -> dict:
    """Train `cfg`, writing its record at `path` as it goes; with `resume`, continue the record's run from
    its last saved state (`<name>.state.pt`, every `checkpoint_every` epochs). Returns train()'s result."""
    import torch

    from tune.train import train

    state, keep = None, None
    if resume and path.exists():
        old = read(path)
        if old.finished:
            raise RecordError(f"record {path} is finished; nothing to resume (remove it to train again)")
        if state_path(path).exists():
            state = torch.load(state_path(path), weights_only=True)
            keep, head = old.epochs[:state["epoch"]], old.header
    writer = RecordWriter(path, head, keep)

    def each_epoch(metrics: dict, snapshot: dict) -> None:
        writer.epoch(metrics)
        if not metrics["final"] and metrics["epoch"] % checkpoint_every == 0:
            tmp = state_path(path).with_suffix(".tmp")
            torch.save(snapshot, tmp)
            tmp.replace(state_path(path))
        if on_epoch is not None:
            on_epoch(metrics, snapshot)

    result = train(cfg, dataset, state, each_epoch)
    writer.finish(result)
    state_path(path).unlink(missing_ok=True)  # a finished record needs no state: records stay small
    return result
