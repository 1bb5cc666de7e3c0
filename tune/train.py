"""The one training loop. The single-run CLI and the Ray trainable both call `train`.

Data stays on the device as uint8 and is sliced by a shuffled index; loss and
accuracy accumulate on the device and are read once per epoch.
"""

import math
import random
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models import build_model
from tune.config import TrialConfig, UserError, improves
from tune.data import Dataset, split

EVAL_BATCH = 1000  # images per evaluation step; evaluation keeps no activations for backward

# on_epoch(metrics, state) after every epoch. `state` references live tensors: save it
# (torch.save) before returning, do not keep it.
EpochCallback = Callable[[dict, dict], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def network(cfg: TrialConfig, build: Callable[..., torch.nn.Module] = build_model) -> torch.nn.Module:
    """The network `cfg` describes; runs log its printout, so a report shows what ran, not today's code."""
    return build(cfg.model, cfg.order, cfg.dropout, cfg.dropout_kind, cfg.hidden, cfg.conv_channels, cfg.conv_kernels)


def train(cfg: TrialConfig, data: Dataset, state: dict | None = None,
          on_epoch: EpochCallback | None = None, build: Callable[..., torch.nn.Module] = build_model) -> dict:
    """Train `cfg` on `data`, from `state` if given. Returns the best epoch's metrics and why it stopped.

    `build` makes the network from build_model's arguments; the benchmarks pass one with torch's
    BatchNorm and Dropout, to price ours."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    arrays = split(data, cfg.val_size, cfg.limit, cfg.eval_limit)
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; the loop only ever reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        train_x, train_y, val_x, val_y, test_x, test_y = (
            torch.from_numpy(a).to(device) for a in
            (arrays.train_x, arrays.train_y, arrays.val_x, arrays.val_y, arrays.test_x, arrays.test_y))
    n = len(train_y)
    if n < cfg.batch_size:
        raise UserError(f"batch_size: {cfg.batch_size} is more than the {n} training images; lower it or raise --limit")
    model, forward, prepare, autocast = _model(cfg, arrays, device, build)
    # fused: one kernel over all parameters instead of a dozen per tensor. On the CPU the
    # per-tensor Adam took ~40% of an MLP step (docs/performance.md).
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    # The data order has its own generator, so dropout draws never shift it.
    order_rng = torch.Generator().manual_seed(cfg.seed)
    best = {"best_epoch": 0, "best_val_loss": math.inf, "best_val_acc": -math.inf,
            "test_loss": math.nan, "test_acc": math.nan}
    best_weights = None  # the best epoch's, on the CPU: what a finished trial keeps
    start = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng(state["rng"], order_rng)
        best = dict(state["best"])
        best_weights = state.get("best_weights")
        start = state["epoch"] + 1

    def evaluate(x_all, y_all):
        return _evaluate(model, forward, prepare, x_all, y_all, autocast)

    stopped_by, reason, epoch = "completed", "", start - 1
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order_rng).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        steps = n // cfg.batch_size  # a final partial batch is dropped; the next epoch reshuffles
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, y = prepare(train_x[idx]), train_y[idx]
            with torch.autocast(**autocast):
                logits = forward(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
        # The epoch's only sync point in training: read the device-side sums.
        train_loss, train_acc = (loss_sum / steps).item(), (correct / (steps * cfg.batch_size)).item()
        if not math.isfinite(train_loss):
            stopped_by, reason = "error", f"non-finite training loss ({train_loss}) at epoch {epoch}"
            break
        val_loss, val_acc = evaluate(val_x, val_y)
        improved = (improves(val_loss, best["best_val_loss"], "min") if cfg.select_by == "val_loss"
                    else improves(val_acc, best["best_val_acc"], "max"))
        if improved:
            test_loss, test_acc = evaluate(test_x, test_y)
            best = {"best_epoch": epoch, "best_val_loss": val_loss, "best_val_acc": val_acc,
                    "test_loss": test_loss, "test_acc": test_acc}
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if cfg.patience and epoch - best["best_epoch"] >= cfg.patience:
            stopped_by = "early_stop"
        # `final` tells the callback this is the last epoch, so it can checkpoint and close out.
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "epoch_seconds": time.perf_counter() - t0,
                   "improved": improved, "final": epoch == cfg.epochs or stopped_by != "completed",
                   "stopped_by": stopped_by, **best}
        if on_epoch is not None:
            snapshot = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": _get_rng(order_rng), "best": dict(best), "best_weights": best_weights,
                        "config": cfg.to_dict()}
            on_epoch(metrics, snapshot)
        if stopped_by != "completed":
            break
    return {**best, "epochs_run": epoch, "stopped_by": stopped_by, "reason": reason}


def _model(cfg: TrialConfig, arrays, device: torch.device, build: Callable[..., torch.nn.Module] = build_model):
    """The network on `device` as train() runs it, and how its inputs are made: (model, forward (compiled or
    not), prepare (uint8 images -> normalized float input), autocast's arguments)."""
    mean, inv_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                     for v in arrays.normalization(cfg.normalize))
    memory_format = torch.channels_last if cfg.channels_last and cfg.model == "cnn" else torch.contiguous_format

    def prepare(x_uint8):
        x = x_uint8.float().sub_(mean).mul_(inv_std)
        return x.contiguous(memory_format=memory_format)

    model = network(cfg, build).to(device, memory_format=memory_format)
    forward = torch.compile(model) if cfg.compile else model
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    return model, forward, prepare, autocast


def _evaluate(model, forward, prepare, x_all, y_all, autocast: dict) -> tuple[float, float]:
    """Mean loss and accuracy over (x_all, y_all), in EVAL_BATCH slices."""
    model.eval()
    loss = torch.zeros((), device=y_all.device)
    correct = torch.zeros((), device=y_all.device, dtype=torch.long)
    with torch.no_grad(), torch.autocast(**autocast):
        for i in range(0, len(y_all), EVAL_BATCH):
            x, y = prepare(x_all[i:i + EVAL_BATCH]), y_all[i:i + EVAL_BATCH]
            logits = forward(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    model.train()
    return (loss / len(y_all)).item(), (correct / len(y_all)).item()


def test_metrics(cfg: TrialConfig, data: Dataset, weights: dict) -> tuple[float, float]:
    """Test loss and accuracy of `weights` (a state_dict of the network `cfg` describes), as train() measures them."""
    device = resolve_device(cfg.device)
    arrays = split(data, cfg.val_size, cfg.limit, cfg.eval_limit)
    model, forward, prepare, autocast = _model(cfg, arrays, device)
    model.load_state_dict(weights)
    test_x, test_y = torch.from_numpy(arrays.test_x).to(device), torch.from_numpy(arrays.test_y).to(device)
    return _evaluate(model, forward, prepare, test_x, test_y, autocast)


def _get_rng(order_rng: torch.Generator) -> dict:
    """Every RNG the loop touches, as tensors and plain types (torch.load(weights_only=True) reads it)."""
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "order": order_rng.get_state(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict, order_rng: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    order_rng.set_state(rng["order"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
