"""compute-limit: the training FLOP/s the MLP and the CNN achieve, against torch.mm's, and what our layers cost.

Every repetition runs, in alternating order: torch.mm on 4096x4096 fp32 matrices (the
machine's dense matmul rate), then `tune.train.train` for the MLP and the CNN built from
our layers and, side by side, the same networks built from torch's BatchNorm and Dropout.
Ratios are taken within a repetition; the JSON reports their medians.
"""

import sys
import time

import torch

from bench import common
from models.nets import build_model
from tune.config import TrialConfig
from tune.data import load, split
from tune.train import EVAL_BATCH, train

NAME = "compute-limit"
TARGETS = {"mlp_fraction": (">=", 0.8), "cnn_fraction": (">=", 0.8),
           "mlp_vs_torch_layers": (">=", 0.9), "cnn_vs_torch_layers": (">=", 0.9)}
# The CNN runs on a subset: a full CNN epoch is minutes on a CPU.
SIZES = {
    "full": {"reps": 3, "matmul_n": 4096, "mlp": {"limit": 20000, "eval_limit": 5000, "epochs": 2},
             "cnn": {"limit": 2000, "eval_limit": 1000, "epochs": 1}},
    "quick": {"reps": 2, "matmul_n": 4096, "mlp": {"limit": 8000, "eval_limit": 2000, "epochs": 1},
              "cnn": {"limit": 600, "eval_limit": 300, "epochs": 1}},
    # For tests/test_bench.py: seconds, not minutes. The figures mean little at this size.
    "tiny": {"reps": 1, "matmul_n": 1024, "mlp": {"limit": 1000, "eval_limit": 200, "epochs": 1, "hidden": 256},
             "cnn": {"limit": 200, "eval_limit": 100, "epochs": 1, "channels": "16,32"}},
}


def timed_training(cfg: TrialConfig, dataset, flops_train_step: int, flops_eval_image: int, torch_layers: bool) -> dict:
    """Wall time of one train() call, from the call to its return, and the FLOPs it did."""
    improved = []

    def on_epoch(metrics, _state):
        improved.append(metrics["improved"])

    t0 = time.perf_counter()
    train(cfg, dataset, on_epoch=on_epoch, build=common.torch_layers_model if torch_layers else build_model)
    seconds = time.perf_counter() - t0
    arrays = split(dataset, cfg.val_size, cfg.limit, cfg.eval_limit)
    steps = len(arrays.train_y) // cfg.batch_size
    # Validation every epoch, the test set at every improvement (as train() does).
    eval_images = len(arrays.val_y) * len(improved) + len(arrays.test_y) * sum(improved)
    flops = len(improved) * steps * flops_train_step + eval_images * flops_eval_image
    return {"seconds": seconds, "flops": flops, "flop_per_s": flops / seconds}


def run(args) -> dict:
    variant = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = SIZES[variant]
    # One thread by default: a sweep runs one trial per core (cpus_per_trial 1), and a
    # single thread is far less disturbed by other processes on a shared machine.
    threads = args.threads or 1
    torch.set_num_threads(threads)
    dataset = load(args.data, args.data_dir)
    configs, flops = {}, {}
    for model in ("mlp", "cnn"):
        cfg = TrialConfig(model=model, dropout=0.5, device="cpu", data=args.data, data_dir=args.data_dir, **size[model])
        net = build_model(cfg.model, cfg.order, cfg.dropout, cfg.dropout_kind, cfg.hidden, cfg.conv_channels, cfg.conv_kernels)
        configs[model] = cfg
        flops[model] = (common.step_flops(net, cfg.batch_size), common.step_flops(net, EVAL_BATCH, train=False) // EVAL_BATCH)
    runs: dict[str, list[dict]] = {}

    def side(name, fn):
        def go():
            out = fn()
            runs.setdefault(name, []).append(out)
            return out["seconds"]
        return go

    sides = {"matmul": side("matmul", lambda: {"flop_per_s": common.matmul_flops_per_s(size["matmul_n"]), "seconds": 0.0})}
    for model in ("mlp", "cnn"):
        for torch_layers in (False, True):
            name = f"{model}-{'torch' if torch_layers else 'ours'}"
            sides[name] = side(name, lambda m=model, t=torch_layers: timed_training(configs[m], dataset, *flops[m], t))
    # channels_last on the CPU too: the config's option, priced here where it costs nothing extra.
    cl_cfg = configs["cnn"].replace(channels_last=True)
    sides["cnn-ours-channels_last"] = side("cnn-ours-channels_last",
                                           lambda: timed_training(cl_cfg, dataset, *flops["cnn"], False))
    # Warm-up, untimed: the first call in a process builds oneDNN primitives and grows the allocator.
    for model in ("mlp", "cnn"):
        warm = configs[model].replace(limit=2 * configs[model].batch_size, eval_limit=100, epochs=1)
        for torch_layers in (False, True):
            timed_training(warm, dataset, *flops[model], torch_layers)
    print(f"{NAME} ({variant}): {size['reps']} interleaved repetitions, {threads} threads", file=sys.stderr)
    common.interleave(sides, size["reps"])

    def per_rep(fn):
        return common.median([fn(i) for i in range(size["reps"])])

    mm = [r["flop_per_s"] for r in runs["matmul"]]
    figures = {
        "mlp_fraction": per_rep(lambda i: runs["mlp-ours"][i]["flop_per_s"] / mm[i]),
        "cnn_fraction": per_rep(lambda i: runs["cnn-ours"][i]["flop_per_s"] / mm[i]),
        # Our speed over the torch-layers network's: its time over ours.
        "mlp_vs_torch_layers": per_rep(lambda i: runs["mlp-torch"][i]["seconds"] / runs["mlp-ours"][i]["seconds"]),
        "cnn_vs_torch_layers": per_rep(lambda i: runs["cnn-torch"][i]["seconds"] / runs["cnn-ours"][i]["seconds"]),
        "cnn_channels_last_speedup": per_rep(
            lambda i: runs["cnn-ours"][i]["seconds"] / runs["cnn-ours-channels_last"][i]["seconds"]),
        "matmul_gflop_per_s": common.median(mm) / 1e9,
        "mlp_gflop_per_s": common.median([r["flop_per_s"] for r in runs["mlp-ours"]]) / 1e9,
        "cnn_gflop_per_s": common.median([r["flop_per_s"] for r in runs["cnn-ours"]]) / 1e9,
        "threads": threads,
    }
    rows = [{"run": "torch.mm 4096x4096 fp32" if size["matmul_n"] == 4096 else f"torch.mm {size['matmul_n']}^2 fp32",
             "median s": "", "GFLOP/s": figures["matmul_gflop_per_s"], "of matmul": 1.0, "vs torch layers": ""}]
    for name in ("mlp-ours", "mlp-torch", "cnn-ours", "cnn-torch", "cnn-ours-channels_last"):
        model = name.split("-")[0]
        rate = [r["flop_per_s"] / mm[i] for i, r in enumerate(runs[name])]
        rows.append({"run": name, "median s": common.median([r["seconds"] for r in runs[name]]),
                     "GFLOP/s": common.median([r["flop_per_s"] for r in runs[name]]) / 1e9,
                     "of matmul": common.median(rate),
                     "vs torch layers": figures[f"{model}_vs_torch_layers"] if name.endswith("-ours") else ""})
    print(common.table(rows))
    return common.record(
        NAME, variant, figures, targets=TARGETS,
        clocks={
            "matmul": "time.perf_counter() around one torch.mm(a, b) of two 4096x4096 fp32 matrices after a warm-up "
                      "call; best of 3 per repetition",
            "training": "time.perf_counter() in this process from the call of tune.train.train(cfg, data) to its return "
                        "(data already in memory; includes the split, the model build and every epoch's evaluation)",
            "flops": "torch.utils.flop_counter.FlopCounterMode on one training step (forward + backward) and one eval "
                     "batch, times the steps and evaluated images of the run; matmuls and convolutions only",
        },
        run={"threads": threads, "data": args.data, "reps": size["reps"], "matmul_n": size["matmul_n"],
             "configs": {m: {k: v for k, v in c.to_dict().items() if k in ("model", "dropout", "order", "hidden", "channels",
                                                                          "limit", "eval_limit", "epochs", "batch_size")}
                         for m, c in configs.items()},
             "flops_per_train_step": {m: f[0] for m, f in flops.items()},
             "flops_per_eval_image": {m: f[1] for m, f in flops.items()}},
        details={"runs": runs},
    )
