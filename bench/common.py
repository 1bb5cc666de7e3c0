"""What every benchmark shares: the result record, the table, interleaving, FLOP counting.

Imports only the standard library, numpy and torch, so bench/gpu_packing.py can use it
on a machine without Ray or MLflow.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The machine may be shared: its load when a benchmark started and ended goes into the record.
LOAD_AT_START = os.getloadavg()
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = f"imagefolder:{(REPO.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz').resolve()}"
DEFAULT_DATA_DIR = str(REPO / "data")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    out = {}
    for pkg in ("torch", "numpy", "ray", "mlflow", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    from tune.provenance import git_commit as commit_of  # imports neither Ray nor MLflow

    return commit_of(str(REPO))


def record(name: str, variant: str, figures: dict, *, targets: dict, clocks: dict, run: dict, details: dict) -> dict:
    """The JSON a benchmark prints last and writes: headline figures at the top level, then the context."""
    met = {}
    for key, (op, bound) in targets.items():
        value = figures.get(key)
        if isinstance(value, bool) or value is None:
            met[key] = value if isinstance(value, bool) else None
        else:
            met[key] = bool(value >= bound) if op == ">=" else bool(value <= bound)
    return {"benchmark": name, "variant": variant, **figures,
            "targets": {k: f"{op} {bound}" for k, (op, bound) in targets.items()}, "met": met,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**machine(), "load_average_1_5_15min": {"start": LOAD_AT_START, "end": os.getloadavg()}},
            "versions": versions(), "git_commit": git_commit(),
            "clocks": clocks, "run": run, "details": details}


def sweep_command(experiment: str, sweep_id: str, data: str, data_dir: str, workdir: Path, sets: dict,
                  *options: str) -> tuple[list[str], dict]:
    """`python -m tune sweep` as `make sweep` runs it, with its results and its MLflow store
    (SWEEP_ID.db) in `workdir`; and the environment for it, in which Ray starts a local instance
    and picks each trial's threads (OMP_NUM_THREADS = its CPUs)."""
    cmd = [sys.executable, "-m", "tune", "sweep", experiment, *options, "--data", data,
           "--set", f"data_dir={os.path.abspath(data_dir)}", "--storage", str(Path(workdir) / "ray_results"),
           "--tracking-uri", f"sqlite:///{Path(workdir) / sweep_id}.db", "--sweep-id", sweep_id, "--verbose", "0"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RAY_ADDRESS")}
    return cmd, env


def result_path(out_dir: str | Path, name: str, variant: str) -> Path:
    return Path(out_dir) / (f"{name}.json" if variant == "full" else f"{name}.{variant}.json")


def write(result: dict, out_dir: str | Path) -> Path:
    path = result_path(out_dir, result["benchmark"], result["variant"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(portable(json.dumps(result, indent=1)) + "\n")
    return path


def portable(text: str) -> str:
    """Results get committed: this machine's paths become relative to the repository root."""
    return text.replace(str(REPO), ".").replace(str(REPO.parent), "..")


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table; floats to 3 significant decimals."""
    columns = columns or list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleave(sides: dict[str, Callable[[], float]], reps: int, sandwich: bool = False) -> dict[str, list[float]]:
    """Run every side `reps` times, alternating the order (A B, B A, ...) so slow drift hits both alike.

    `sandwich` runs the first side once more at the end (A B A for one rep): the cheapest
    order that still brackets B's run with A's.
    """
    out: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    order = [n for rep in range(reps) for n in (names if rep % 2 == 0 else names[::-1])]
    if sandwich:
        order.append(order[0] if order[-1] != order[0] else order[1])
    for i, name in enumerate(order):
        out[name].append(sides[name]())
        print(f"  run {i + 1}/{len(order)} {name}: {out[name][-1]:.3f}", file=sys.stderr, flush=True)
    return out


def matmul_flops_per_s(n: int = 4096, repeats: int = 3) -> float:
    """Dense fp32 torch.mm on n x n matrices, with the threads torch has now; the best of `repeats`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and BLAS buffers
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(model, batch: int, train: bool = True) -> int:
    """FLOPs of one step as torch executes it: forward, plus backward when `train`.

    torch's FlopCounterMode counts matmuls and convolutions (2 per multiply-add),
    backward included, and leaves out gradients nobody asked for (the input
    image's). Elementwise work (BN, ReLU, dropout, Adam) is not counted.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train(train)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())


def torch_layers_model(*args, **kwargs):
    """The network build_model makes, with torch's BatchNorm and Dropout in place of ours (to price ours)."""
    from torch import nn

    from models import layers
    from models.nets import build_model

    model = build_model(*args, **kwargs)
    swap = {layers.BatchNorm1d: lambda m: nn.BatchNorm1d(m.num_features, m.eps, m.momentum),
            layers.BatchNorm2d: lambda m: nn.BatchNorm2d(m.num_features, m.eps, m.momentum),
            layers.Dropout2d: lambda m: nn.Dropout2d(m.p), layers.Dropout: lambda m: nn.Dropout(m.p)}

    def replace(module):
        for name, child in module.named_children():
            if type(child) in swap:
                setattr(module, name, swap[type(child)](child))
            else:
                replace(child)

    replace(model)
    return model
