"""`tune rerun`: a recorded run, imported into MLflow, trains again to the same curves; an altered store does not."""

import json
import sqlite3

import pytest
import torch

from tune import record, tracking
from tune.cli import main

FLAGS = ["--data", "synthetic", "--epochs", "3", "--limit", "600", "--eval-limit", "300", "--hidden", "32",
         "--dropout", "0.3"]


@pytest.fixture
def logged(tmp_path, monkeypatch):
    """A run trained at one thread by `tune train --record`, imported: (store URI, run id)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert main(["train", *FLAGS, "--record", "recs", "--experiment", "dropout-mlp", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [path] = record.find(["recs"])
    return uri, tracking.import_record(tracking.client(uri), uri, record.read(path), "s")


def rerun(capsys, *args) -> tuple[int, dict]:
    threads = torch.get_num_threads()
    try:
        code = main(["rerun", *args])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if out.strip() else {"stderr": err})


def test_a_run_trains_again_to_the_same_curves(logged, capsys):
    uri, run_id = logged
    code, result = rerun(capsys, run_id, "--tracking-uri", uri)
    assert code == 0 and result["matched"] is True and result["epochs_compared"] == 3
    run = tracking.client(uri).get_run(run_id)
    assert result["test_acc"] == run.data.metrics["test_acc"] and result["config"]["dropout"] == 0.3


def test_an_altered_metric_is_caught(logged, capsys, tmp_path):
    uri, run_id = logged
    with sqlite3.connect(f"{tmp_path}/mlflow.db") as db:
        db.execute("UPDATE metrics SET value = value + 1e-6 WHERE run_uuid = ? AND key = 'val_loss' AND step = 2",
                   (run_id,))
    code, result = rerun(capsys, run_id, "--tracking-uri", uri)
    assert code == 1 and result["matched"] is False


def test_data_with_another_digest_or_an_unknown_run_is_one_line(logged, capsys, tmp_path):
    uri, run_id = logged
    code, out = rerun(capsys, run_id, "--tracking-uri", uri, "--data", "synthetic:nan")
    assert code == 2 and "has digest" in out["stderr"] and len(out["stderr"].strip().splitlines()) == 1
    code, out = rerun(capsys, "0" * 32, "--tracking-uri", uri)
    assert code == 2 and "cannot be read" in out["stderr"] and len(out["stderr"].strip().splitlines()) == 1
