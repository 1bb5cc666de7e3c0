"""gpu-packing: CNN trials sharing one GPU, and each CUDA option on and off. Needs CUDA.

Runs on a machine with torch and no Ray or MLflow: it imports only torch, numpy, our models
and tune.config / tune.train / tune.data (and bench.common, which is standard library + torch).

  python -m bench gpu-packing --prepare   here: writes bench/data/gpu_packing_{x,y}.npy (6,000 real
                                          CIFAR-10 images, uint8, ~18 MB; bench/data/ is git-ignored)
                                          and gpu_packing.json (the report sweep's trial counts)
  python -m bench gpu-packing [--quick]   on the GPU machine, with bench/data carried along

Every measurement is `tune.train.train` in plain processes (spawned, one per trial): each
warms up with a one-epoch train() call, waits at a barrier, then trains for real. images/s
counts training images of epochs 2..E over the wall time from the end of epoch 1 to the end
of epoch E (time.time() at the loop's epoch callback, which follows the epoch's one sync);
the wall holds each epoch's evaluation, as a trial's does. With N trials at once, aggregate
images/s = all trials' images over (last trial's end - first trial's epoch-1 end).

The data split is 4,000 train / 1,000 val / 1,000 test, the study's 40k/10k/10k in
miniature, so a full epoch takes ten of these epochs' time.
"""

import json
import multiprocessing as mp
import os
import queue
import sys
import time

import numpy as np
import torch

from bench import common
from models import build_model
from tune.config import TrialConfig
from tune.data import Dataset
from tune.train import train

NAME = "gpu-packing"
DATA_DIR = common.REPO / "bench" / "data"
X_FILE, Y_FILE, META_FILE = DATA_DIR / "gpu_packing_x.npy", DATA_DIR / "gpu_packing_y.npy", DATA_DIR / "gpu_packing.json"
N_TRAIN, N_TEST, N_VAL = 5000, 1000, 1000  # N_TRAIN holds the validation images (the last N_VAL)
FULL_EPOCH_SCALE = 10  # the study's epoch (40k/10k/10k) over this benchmark's (4k/1k/1k)
# name -> TrialConfig changes; cudnn_benchmark (train() always sets it on CUDA) and torch_layers are not config fields.
OPTIONS = {
    "defaults": {},
    "amp=bf16": {"amp": "bf16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "cudnn.benchmark off": {"cudnn_benchmark": False},
    "torch BN+Dropout": {"torch_layers": True},  # prices our layers on the GPU, as compute-limit does on the CPU
    "bf16+channels_last+compile": {"amp": "bf16", "channels_last": True, "compile": True},
}
SIZES = {
    "full": {"epochs": 40, "packing": (1, 2, 4, 8), "mlp_packing": (1, 4, 8), "options": list(OPTIONS)},
    "quick": {"epochs": 20, "packing": (1, 2, 4, 8), "mlp_packing": (1, 4, 8), "options": list(OPTIONS)},
    # To share one 15-minute GPU lease with the study (bench/gpu-lease.sh): on an H200 its 12 groups took over 170 s.
    "short": {"epochs": 8, "packing": (1, 4, 8, 16), "mlp_packing": (1, 4, 8),
              "options": ["defaults", "amp=bf16", "channels_last", "torch BN+Dropout"]},
    # A dry run of the mechanics on the CPU (tests, or a machine without a GPU).
    "tiny": {"epochs": 3, "packing": (1, 2), "mlp_packing": (1,), "options": ["defaults", "amp=bf16", "torch BN+Dropout"],
             "channels": "8,16", "limit": 600},
}


def prepare(data: str, data_dir: str) -> dict:
    """Here, where the full dataset and the catalogue are: write the small real dataset and the sweep's shape."""
    from tune import catalogue
    from tune.data import load

    ds = load(data, data_dir)
    x = np.concatenate([ds.train_x[:N_TRAIN], ds.test_x[:N_TEST]])
    y = np.concatenate([ds.train_y[:N_TRAIN], ds.test_y[:N_TEST]]).astype(np.uint8)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    np.save(X_FILE, x)
    np.save(Y_FILE, y)
    trials = catalogue.expand("report")
    meta = {"source": ds.source, "n_train": N_TRAIN, "n_test": N_TEST, "n_val": N_VAL,
            "report_trials": {m: sum(1 for _, c in trials if c.model == m) for m in ("mlp", "cnn")},
            "report_epochs": max(c.epochs for _, c in trials),
            "report_gpus_per_trial": 0.25}
    META_FILE.write_text(json.dumps(meta, indent=1))
    print(f"wrote {X_FILE} ({X_FILE.stat().st_size / 1e6:.1f} MB), {Y_FILE} and {META_FILE}", file=sys.stderr)
    return {"benchmark": NAME, "prepared": True, **meta}


def load_small() -> Dataset:
    if not X_FILE.is_file():
        raise SystemExit(f"{X_FILE} is missing: run `python -m bench gpu-packing --prepare` where the dataset is")
    x, y = np.load(X_FILE), np.load(Y_FILE).astype(np.int64)
    return Dataset(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], [str(i) for i in range(10)], "gpu-packing")


def _pin_cudnn_benchmark_off() -> None:
    """train() sets cudnn.benchmark on; for the 'off' measurement make that assignment a no-op, in this process only."""
    torch.backends.cudnn.benchmark = False
    cls = type(torch.backends.cudnn)
    if cls.__name__ == "CudnnModule":
        cls.benchmark = property(lambda self: False, lambda self, value: None)


def worker(spec: dict, barrier, results) -> None:
    """One trial: warm up, wait for the others, train, report the epoch timestamps."""
    torch.set_num_threads(spec["threads"])
    changes = dict(spec["changes"])
    if not changes.pop("cudnn_benchmark", True):
        _pin_cudnn_benchmark_off()
    build = common.torch_layers_model if changes.pop("torch_layers", False) else build_model
    dataset = load_small()
    cfg = TrialConfig(model=spec["model"], dropout=0.5, epochs=spec["epochs"], val_size=N_VAL, device=spec["device"],
                      data="gpu-packing", limit=spec.get("limit", 0), **({"channels": spec["channels"]} if "channels" in spec
                                                                            else {}), **changes)
    train(cfg.replace(epochs=1), dataset, build=build)  # CUDA context, cuDNN autotuning, compilation, allocator
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    barrier.wait()
    stamps = []

    def on_epoch(metrics, state):
        stamps.append(time.time())

    train(cfg, dataset, on_epoch=on_epoch, build=build)
    n_train = min(cfg.limit or N_TRAIN - N_VAL, N_TRAIN - N_VAL)
    results.put({"stamps": stamps, "images_per_epoch": n_train // cfg.batch_size * cfg.batch_size,
                 "max_memory_bytes": torch.cuda.max_memory_allocated() if spec["device"] == "cuda" else 0})


def run_group(spec: dict, n: int) -> dict:
    """n trials of `spec` at once on the one device; their aggregate and per-trial images/s."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(spec, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = []
    while len(out) < n:
        try:
            out.append(results.get(timeout=2))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:  # the rest would wait at the barrier for ever
                    p.terminate()
                raise RuntimeError(f"a worker failed: {spec['model']} {spec['changes']} x{n}") from None
    for p in procs:
        p.join()
    images = sum(r["images_per_epoch"] * (len(r["stamps"]) - 1) for r in out)
    window = max(r["stamps"][-1] for r in out) - min(r["stamps"][0] for r in out)
    per_trial = [r["images_per_epoch"] * (len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in out]
    return {"n": n, "aggregate_images_per_s": images / window, "per_trial_images_per_s": common.median(per_trial),
            "window_seconds": window, "max_memory_bytes": max(r["max_memory_bytes"] for r in out)}


def run(args) -> dict:
    if args.prepare:
        return prepare(args.data, args.data_dir)
    variant = "tiny" if args.tiny else "short" if args.short else "quick" if args.quick else "full"
    size = SIZES[variant]
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{NAME}: no CUDA device here; run it where one is (see bench/gpu_packing.py), "
              f"or `--device cpu --tiny` for a dry run", file=sys.stderr)
        return {"benchmark": NAME, "variant": variant, "skipped": "no CUDA device"}
    meta = json.loads(META_FILE.read_text()) if META_FILE.is_file() else None
    cores = os.cpu_count() or 1
    base = {"device": args.device, "epochs": size["epochs"], **{k: size[k] for k in ("channels", "limit") if k in size}}

    def spec(model, n, changes=None):
        return {**base, "model": model, "changes": changes or {}, "threads": max(1, cores // n)}

    # Options first, each in its own process (N = 1); the defaults again at the end bracket any drift.
    options: dict[str, list[dict]] = {o: [] for o in size["options"]}
    for name in size["options"] + ["defaults"]:
        print(f"  option {name}", file=sys.stderr, flush=True)
        try:
            options[name].append(run_group(spec("cnn", 1, OPTIONS[name]), 1))
        except RuntimeError as e:  # e.g. torch.compile failing on that machine: the other figures still count
            print(f"  {e}", file=sys.stderr)
    failed = [o for o, rs in options.items() if not rs]
    options = {o: rs for o, rs in options.items() if rs}
    packing = {}
    for n in size["packing"]:
        print(f"  cnn x{n}", file=sys.stderr, flush=True)
        packing[n] = run_group(spec("cnn", n), n)
    mlp_packing = {}
    for n in size["mlp_packing"]:
        print(f"  mlp x{n}", file=sys.stderr, flush=True)
        mlp_packing[n] = run_group(spec("mlp", n), n)

    base_rate = common.median([r["per_trial_images_per_s"] for r in options["defaults"]])
    option_speedup = {o: common.median([r["per_trial_images_per_s"] for r in rs]) / base_rate for o, rs in options.items()}
    best_n = max(packing, key=lambda n: packing[n]["aggregate_images_per_s"])
    mlp_best_n = max(mlp_packing, key=lambda n: mlp_packing[n]["aggregate_images_per_s"])
    figures = {
        "cnn_images_per_s_n1": packing[min(packing)]["aggregate_images_per_s"],
        "cnn_aggregate_images_per_s": {n: r["aggregate_images_per_s"] for n, r in packing.items()},
        "cnn_packing_gain": packing[best_n]["aggregate_images_per_s"] / packing[min(packing)]["aggregate_images_per_s"],
        "cnn_best_n": best_n,
        "mlp_aggregate_images_per_s": {n: r["aggregate_images_per_s"] for n, r in mlp_packing.items()},
        "option_speedup": option_speedup,
        "options_failed": failed,
    }
    if meta is not None and variant != "tiny":
        # The report sweep (FIFO, every epoch run) on one GPU: trial-epochs x full-epoch images / aggregate rate.
        def hours(n_cnn, n_mlp):
            seconds = sum(meta["report_trials"][m] * meta["report_epochs"] * (N_TRAIN - N_VAL) * FULL_EPOCH_SCALE / rate
                          for m, rate in (("cnn", packing[n_cnn]["aggregate_images_per_s"]),
                                          ("mlp", mlp_packing[n_mlp]["aggregate_images_per_s"])))
            return seconds / 3600

        default_n = round(1 / meta["report_gpus_per_trial"])
        if default_n in packing and default_n in mlp_packing:
            figures["report_sweep_hours_default_packing"] = hours(default_n, default_n)
        figures["report_sweep_hours_best_packing"] = hours(best_n, mlp_best_n)
        figures["report_sweep_hours_one_at_a_time"] = hours(min(packing), min(mlp_packing))
    rows = [{"run": f"cnn, {o}", "trials": 1, "images/s per trial": common.median([r["per_trial_images_per_s"] for r in rs]),
             "vs defaults": option_speedup[o], "aggregate images/s": "", "peak MB": rs[0]["max_memory_bytes"] / 1e6}
            for o, rs in options.items()]
    rows += [{"run": f"{m}, defaults", "trials": n, "images/s per trial": r["per_trial_images_per_s"], "vs defaults": "",
              "aggregate images/s": r["aggregate_images_per_s"], "peak MB": r["max_memory_bytes"] / 1e6}
             for m, group in (("cnn", packing), ("mlp", mlp_packing)) for n, r in group.items()]
    print(common.table(rows))
    return common.record(
        NAME, variant, figures, targets={},
        clocks={"images_per_s": "time.time() at the training loop's epoch callback (after the epoch's one device sync); "
                                "training images of epochs 2..E over the time from the end of epoch 1 to the end of E, "
                                "evaluation included in that wall; the warm-up train() call is outside it",
                "aggregate": "all trials' images over (last trial's end - earliest end of an epoch 1), trials started "
                             "together at a barrier after their warm-ups"},
        run={"device": args.device, "epochs": size["epochs"], "split": "4000 train / 1000 val / 1000 test",
             "options": size["options"], "packing": list(size["packing"]), "mlp_packing": list(size["mlp_packing"]),
             "report": meta},
        details={"options": options, "cnn_packing": packing, "mlp_packing": mlp_packing},
    )
