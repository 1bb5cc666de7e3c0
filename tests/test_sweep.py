"""Sweeps on a real local Ray instance, logging to a real MLflow SQLite store, on small data."""

import json
import subprocess

import pytest

from conftest import PYTHON, history
from conftest import mlflow_runs as runs_of
from conftest import run_sweep as sweep

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them


def test_smoke_grid_leaves_one_complete_run_per_trial(tmp_path, cifar_args):
    p = sweep(tmp_path, "dropout-mlp", "--smoke", "--grid", "dropout=0.1,0.5,0.9", "--set", "epochs=2",
              "--scheduler", "fifo", *cifar_args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "3 trials" in p.stderr and "6 trial-epochs" in p.stderr
    client, runs = runs_of(tmp_path, "dropout-mlp")
    assert len(runs) == 3
    assert sorted(float(r.data.params["dropout"]) for r in runs) == [0.1, 0.5, 0.9]
    sweep_ids = {r.data.tags["sweep_id"] for r in runs}
    assert len(sweep_ids) == 1 and sweep_ids.pop() in p.stderr
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["stopped_by"] == "completed"
        for tag in ("sweep_id", "experiment", "trial_id", "config_key", "mlflow.source.git.commit", "stopped_by"):
            assert r.data.tags[tag]
        assert r.data.params["epochs"] == "2" and r.data.params["limit"] == "2000"
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "best_val_loss"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], key
        for key in ("best_epoch", "best_val_acc", "test_loss", "test_acc"):
            assert key in r.data.metrics
        assert r.data.metrics["best_val_loss"] == min(m.value for m in client.get_metric_history(r.info.run_id, "val_loss"))
    # the three configs differ only in dropout: three config keys
    assert len({r.data.tags["config_key"] for r in runs}) == 3
    # the Dataset column: our digest of every array (MLflow keeps its first 36 characters)
    for r in runs:
        [used] = r.inputs.dataset_inputs
        assert len(used.dataset.digest) >= 32 and r.data.tags["data_digest"].startswith(used.dataset.digest)
    # the sweep is one run in the UI: its trials nested under it, its settings, progress and outcome on it
    exp_id = client.get_experiment_by_name("dropout-mlp").experiment_id
    [parent] = client.search_runs([exp_id], "tags.run_kind = 'sweep'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and "trial_id" not in parent.data.tags
    assert parent.data.params["trials"] == "3" and parent.data.params["max_trial_epochs"] == "6"
    assert parent.data.metrics["progress_trial_epochs"] == 6 and parent.data.metrics["trial_epochs_run"] == 6
    assert "## Outcome" in parent.data.tags["mlflow.note.content"] and "dropout-mlp/mlp" in parent.data.tags[
        "mlflow.note.content"]
    # the finished trials kept their best weights, and those weights give the logged test metrics
    for r in runs:
        assert [a.path for a in client.list_artifacts(r.info.run_id, "model")] == ["model/weights.pt"]
    e = subprocess.run([PYTHON, "-m", "tune", "evaluate", runs[0].info.run_id], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    result = json.loads(e.stdout.strip().splitlines()[-1])
    assert e.returncode == 0 and result["matched"] is True, e.stderr[-2000:]
    assert result["test_acc"] == runs[0].data.metrics["test_acc"]


def test_asha_stops_weak_trials_and_they_keep_test_metrics(tmp_path, cifar_args):
    # One good trial first, then three that barely learn: ASHA's first rung must cut them.
    p = sweep(tmp_path, "dropout-mlp", "--smoke", "--grid", "lr=1e-3,1e-7,2e-7,3e-7", "--grid", "dropout=0.5",
              "--set", "epochs=4", "--grace-period", "1", "--max-concurrent", "1", *cifar_args)
    assert p.returncode == 0, p.stderr[-3000:]
    client, runs = runs_of(tmp_path, "dropout-mlp")
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags["stopped_by"] == "scheduler"]
    assert stopped, [r.data.tags["stopped_by"] for r in runs]
    for r in stopped:
        epochs = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
        assert max(epochs) < 4 and r.info.status == "FINISHED"
        assert "test_acc" in r.data.metrics and r.data.metrics["best_epoch"] >= 1
    assert any(r.data.tags["stopped_by"] == "completed" for r in runs)


def test_optuna_search_samples_the_space(tmp_path):
    p = sweep(tmp_path, "search-mlp", "--samples", "3", "--smoke", "--set", "epochs=1", "--set", "hidden=64",
              "--data", "synthetic")
    assert p.returncode == 0, p.stderr[-3000:]
    _, runs = runs_of(tmp_path, "search-mlp")
    assert len(runs) == 3
    dropouts = {float(r.data.params["dropout"]) for r in runs}
    lrs = [float(r.data.params["lr"]) for r in runs]
    assert len(dropouts) == 3 and all(0 <= d <= 0.9 for d in dropouts)
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)


def test_fractional_gpus_pack_four_trials_on_one_gpu(tmp_path, cifar_args):
    # Logical GPUs: Ray schedules the packing, the trials themselves run on the CPU.
    p = sweep(tmp_path, "dropout-mlp", "--num-gpus", "1", "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5",
              "--grid", "dropout=0.2,0.4,0.6,0.8", "--set", "epochs=2", "--set", "limit=8000", "--set", "eval_limit=1000",
              "--scheduler", "fifo", *cifar_args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0.25 GPU per trial" in p.stderr
    _, runs = runs_of(tmp_path, "dropout-mlp")
    assert len(runs) == 4
    # all four ran at once: every run started before any ended
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)


@pytest.mark.parametrize("args, needle", [
    (["nonexistent-exp"], "unknown experiment 'nonexistent-exp'"),
    (["dropout-mlp", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["dropout-mlp", "--set", "dropout=1.5"], "dropout"),
    (["dropout-mlp", "--set", "warmup=3"], "unknown config key"),
    (["dropout-mlp", "--gpus-per-trial", "1"], "GPUs"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, args, needle):
    p = sweep(tmp_path, *args, "--data", "synthetic", timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_reused_worker_runs_each_trial_as_a_fresh_process_would(tmp_path, cifar_args):
    # One worker at a time: with reuse_actors (the default) it runs all three trials.
    grid = ("dropout-mlp", "--smoke", "--grid", "dropout=0.1,0.5,0.9", "--set", "epochs=2", "--scheduler", "fifo",
            "--max-concurrent", "1", *cifar_args)
    pids, curves = {}, {}
    for mode in ("--reuse-actors", "--no-reuse-actors"):
        (tmp_path / mode).mkdir()
        p = sweep(tmp_path / mode, *grid, mode)
        assert p.returncode == 0, p.stderr[-3000:]
        results = [json.loads(f.read_text().splitlines()[-1]) for f in (tmp_path / mode).glob("ray_results/*/*/result.json")]
        pids[mode] = {r["pid"] for r in results}
        client, runs = runs_of(tmp_path / mode, "dropout-mlp")
        assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
        curves[mode] = {r.data.params["dropout"]: history(client, r) for r in runs}
    assert len(pids["--reuse-actors"]) == 1 and len(pids["--no-reuse-actors"]) == 3
    assert curves["--reuse-actors"] == curves["--no-reuse-actors"]
