"""`python -m tune rerun RUN_ID`: train a logged run again, without Ray, and check it gives the same curves.
`python -m tune evaluate RUN_ID`: test the weights a finished run kept, and check they give its test metrics.

The config comes from the run's params, the data from its `data` param (or --data for a copy elsewhere,
which must have the run's digest), the thread count from its `threads` tag: on the CPU, the same
config, seed, data and threads give bit-identical metrics, so every logged value must match.
"""

import math
import sys

from tune import tracking
from tune.config import TrialConfig, UserError

COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_loss")


def logged_run(uri: str, run_id: str):
    tracking.check_reachable(uri)
    client = tracking.client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own error types for a missing run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"run {run_id} cannot be read from {uri} ({first}); check the id and --tracking-uri") from None
    return client, run


def config_of(run) -> TrialConfig:
    params = run.data.params
    missing = sorted(set(TrialConfig.__dataclass_fields__) - set(params))
    if missing:
        raise UserError(f"run {run.info.run_id} comes from an older schema (no param {missing[0]}); "
                        f"it cannot be re-trained exactly")
    return TrialConfig.from_dict({k: params[k] for k in TrialConfig.__dataclass_fields__})


def config_and_data(run, data: str | None):
    """The run's config, and its data (from its `data` param, or `data` for a copy elsewhere) checked by digest."""
    from tune import data as datasets

    cfg, tags, run_id = config_of(run), run.data.tags, run.info.run_id
    if not tags.get("data_digest") or not tags.get("threads"):
        raise UserError(f"run {run_id} logged no data digest or thread count (an older schema); "
                        f"it cannot be checked exactly")
    if data:
        cfg = cfg.replace(data=datasets.resolve(data))
    dataset = datasets.load(cfg.data, cfg.data_dir)
    digest = datasets.digest(dataset)
    if digest != tags["data_digest"]:
        raise UserError(f"the data at {cfg.data} has digest {digest[:12]}, the run trained on {tags['data_digest'][:12]}; "
                        f"pass --data with the data it trained on")
    return cfg, dataset


def evaluate(uri: str, run_id: str, data: str | None = None) -> tuple[dict, bool]:
    """(test loss and accuracy of the run's kept weights, whether they equal the run's logged test metrics)."""
    import tempfile

    import torch

    from tune.train import test_metrics

    client, run = logged_run(uri, run_id)
    cfg, dataset = config_and_data(run, data)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, tracking.WEIGHTS, folder)
        except Exception:  # noqa: BLE001 - MLflow raises its own types for a missing artifact
            raise UserError(f"run {run_id} kept no weights ({tracking.WEIGHTS}): only finished trials of sweeps "
                            f"run without --no-save-weights keep them") from None
        saved = torch.load(path, weights_only=True)
    torch.set_num_threads(int(run.data.tags["threads"]))
    test_loss, test_acc = test_metrics(cfg, dataset, saved["state_dict"])
    logged = {k: run.data.metrics.get(k) for k in ("test_loss", "test_acc")}
    result = {"run_id": run_id, "best_epoch": saved["epoch"], "test_loss": test_loss, "test_acc": test_acc,
              "logged_test_loss": logged["test_loss"], "logged_test_acc": logged["test_acc"]}
    return result, logged == {"test_loss": test_loss, "test_acc": test_acc}


def rerun(uri: str, run_id: str, data: str | None = None) -> tuple[dict, bool]:
    """(the result train() gives, whether every logged per-epoch value matched)."""
    import torch

    from tune.train import train

    client, run = logged_run(uri, run_id)
    cfg, dataset = config_and_data(run, data)
    torch.set_num_threads(int(run.data.tags["threads"]))
    logged = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in COMPARED}
    seen: dict[str, dict[int, float]] = {key: {} for key in COMPARED}

    def on_epoch(metrics, _state):
        for key in COMPARED:
            seen[key][metrics["epoch"]] = metrics[key]
        print(f"epoch {metrics['epoch']:>3}/{cfg.epochs} val_loss {metrics['val_loss']:.6f} (logged "
              f"{logged['val_loss'].get(metrics['epoch'], math.nan):.6f})", file=sys.stderr, flush=True)

    # Train as far as the run got: a trial the scheduler cut logged fewer epochs than its config.
    epochs = max(logged["val_loss"], default=0)
    if epochs == 0:
        raise UserError(f"run {run_id} logged no epoch; there is nothing to compare")
    result = train(cfg.replace(epochs=epochs), dataset, on_epoch=on_epoch)
    # MLflow keeps metrics as float64 of the float32-derived values logged: compare exactly.
    matched = all(seen[key] == logged[key] for key in COMPARED)
    return {**result, "config": cfg.to_dict(), "epochs_compared": epochs}, matched
