import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("CIFAR10_JPG", ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
PYTHON = sys.executable


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch):
    """Tests choose their own store and cluster: a developer's (or a library's) exported ones must not leak in."""
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        why = f"the shared CIFAR-10 archive is missing at {SHARED_ARCHIVE}; set CIFAR10_JPG to its path"
        if os.environ.get("CI") == "true":
            pytest.fail(why)  # CI has ../shared beside the clone: a missing archive there is a broken setup
        pytest.skip(why)
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One decode cache for the whole session: the archive is decoded once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def cifar(shared_archive, data_dir):
    from tune import data

    return data.load(f"imagefolder:{shared_archive}", str(data_dir))


@pytest.fixture(scope="session")
def cifar_args(shared_archive, data_dir, cifar):  # `cifar` warms the decode cache once
    """Sweep flags for the shared CIFAR-10, decoded once per session."""
    return ["--data", f"imagefolder:{shared_archive}", "--set", f"data_dir={data_dir}"]


def sweep_cmd(*args) -> list[str]:
    return [PYTHON, "-m", "tune", "sweep", *args]


def run_sweep(cwd, *args, timeout=600):
    """Run `python -m tune sweep` from cwd, so ./mlflow.db and ./ray_results land there."""
    return subprocess.run(sweep_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def mlflow_runs(cwd, experiment):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    # The trials; the sweep's own run (their parent, tracking.SweepRun) has no trial_id.
    return client, [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("trial_id")]


def history(client, run, key="val_loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
