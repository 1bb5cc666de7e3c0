"""Train anywhere, track later: run records written by `tune train --record` and the study runner, read back
whole or cut short, and imported into MLflow with the schema of sweep trials."""

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, history, mlflow_runs, run_sweep
from tune import record, tracking
from tune.config import TrialConfig

TINY = {"model": "mlp", "dropout": 0.5, "hidden": 32, "epochs": 3, "limit": 600, "eval_limit": 300, "data": "synthetic"}


def write_record(folder, epochs: int, end: bool = True, cut: str | None = None, **header) -> "record.Path":
    cfg = TrialConfig.from_dict(TINY)
    head = record.header(cfg, experiment="dropout-mlp", parts=None, threads=1, git_commit="abc", versions="torch=2",
                         data={"source": "synthetic", "digest": "d", "train_images": 600, "val_images": 300,
                               "test_images": 300}) | header
    w = record.RecordWriter(folder / f"r{epochs}{end}.jsonl", head)
    for e in range(1, epochs + 1):
        w.epoch({"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": 1.1 / e, "val_acc": 0.4,
                 "epoch_seconds": 0.1, "best_val_loss": 1.1 / e, "improved": True, "best_epoch": e, "best_val_acc": 0.4,
                 "test_loss": 1.2 / e, "test_acc": 0.45, "final": e == epochs})
    if end:
        w.finish({"stopped_by": "completed", "reason": "", "epochs_run": epochs})
    else:
        w.file.close()
    if cut is not None:
        with w.path.open("a") as f:
            f.write(cut)
    return w.path


def test_a_record_reads_back_up_to_its_last_complete_epoch(tmp_path):
    whole = record.read(write_record(tmp_path, 3))
    assert whole.finished and [e["epoch"] for e in whole.epochs] == [1, 2, 3] and whole.config.hidden == 32
    killed = record.read(write_record(tmp_path, 2, end=False, cut='{"kind": "epoch", "epoch": 3, "train_lo'))
    assert not killed.finished and [e["epoch"] for e in killed.epochs] == [1, 2]


@pytest.mark.parametrize("text, words", [
    ("", "no header line"),
    ('{"kind": "epoch", "epoch": 1}\n', "no header line"),
    ('{"kind": "header", "format": 99, "config": {}}\n', "format 99"),
    ('{"kind": "header", "format": 1, "config": {"dropout": 1.5}}\n', "refuses"),
])
def test_a_damaged_record_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(record.RecordError, match=words):
        record.read(path)


def test_a_damaged_middle_line_is_refused(tmp_path):
    path = write_record(tmp_path, 3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
    with pytest.raises(record.RecordError, match="line 2 is damaged"):
        record.read(path)


def test_import_logs_the_sweep_schema_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    rec = record.read(write_record(tmp_path, 3))
    run_id = tracking.import_record(c, uri, rec, "imp")
    assert tracking.import_record(c, uri, rec, "imp") is None  # twice: nothing new
    run = c.get_run(run_id)
    tags = run.data.tags
    assert tags["experiment"] == "dropout-mlp" and tags["config_key"] == rec.config.key() and tags["sweep_id"] == "imp"
    assert tags["stopped_by"] == "completed" and tags["mlflow.source.git.commit"] == "abc" and tags["parts"] == "dropout-mlp"
    assert run.data.params == {k: str(v) for k, v in rec.config.to_dict().items()}
    assert [m.step for m in c.get_metric_history(run_id, "val_loss")] == [1, 2, 3]
    # the Dataset column: our digest of every array, the split sizes
    [used] = run.inputs.dataset_inputs
    assert used.dataset.digest == "d" and used.dataset.name == "synthetic"
    assert json.loads(used.dataset.profile) == {"train_images": 600, "val_images": 300, "test_images": 300}
    # readable in the UI: a name that says what ran, an experiment that opens on its training runs
    assert run.info.run_name == "mlp d=0.5 bn,relu,dropout s0"
    exp = c.get_experiment_by_name("dropout-mlp")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.runs_view("http://h:5000/", exp.experiment_id).endswith(
        f"5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
    killed = record.read(write_record(tmp_path, 2, end=False))
    run = c.get_run(tracking.import_record(c, uri, killed, "imp"))
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "killed"
    # it ended with its last epoch, not when it was imported (the report's wall time reads end times)
    assert run.info.end_time == killed.epochs[-1]["time"]
    old = dataclasses.replace(killed, header={**killed.header, "id": "old" + killed.header["id"][3:], "started": 1000},
                          epochs=[{k: v for k, v in e.items() if k != "time"} for e in killed.epochs])
    assert c.get_run(tracking.import_record(c, uri, old, "imp")).info.end_time == 1000 + 200  # 2 epochs of 0.1 s


@pytest.mark.slow
def test_recorded_runs_match_a_sweep_and_a_killed_one_keeps_its_epochs(tmp_path):
    """Same config, same seed, one thread each: the imported run equals the sweep's, epoch by epoch."""
    sweep_args = ["dropout-mlp", "--grid", "dropout=0.5", "--scheduler", "fifo", "--data", "synthetic", "--sweep-id", "s",
                  *[a for k, v in TINY.items() if k not in ("model", "dropout", "data") for a in ("--set", f"{k}={v}")]]
    p = run_sweep(tmp_path, *sweep_args)
    assert p.returncode == 0, p.stderr[-3000:]
    flags = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    train = [PYTHON, "-m", "tune", "train", *flags, "--record", "recs", "--experiment", "dropout-mlp", "--threads", "1"]
    p = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # A long second run, killed once it has recorded two epochs.
    long = [*train[:train.index("--epochs")], "--epochs", "200", "--limit", "2000", *train[train.index("--limit") + 2:]]
    proc = subprocess.Popen(long + ["--seed", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            files = [f for f in (tmp_path / "recs").glob("*-s1.jsonl")]
            if files and files[0].read_text().count('"kind": "epoch"') >= 2:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    imported = tmp_path / "imported"
    imported.mkdir()
    cmd = [PYTHON, "-m", "tune", "import", str(tmp_path / "recs"), "--sweep-id", "imp"]
    for _ in range(2):  # the second import adds nothing
        p = subprocess.run(cmd, cwd=imported, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    assert "already in the store" in p.stderr
    client_s, [swept] = mlflow_runs(tmp_path, "dropout-mlp")
    client_i, runs = mlflow_runs(imported, "dropout-mlp")
    assert len(runs) == 2
    [done] = [r for r in runs if r.data.tags["stopped_by"] == "completed"]
    [killed] = [r for r in runs if r.data.tags["stopped_by"] == "killed"]
    assert done.data.params == swept.data.params
    for tag in ("experiment", "config_key", "mlflow.source.git.commit", "stopped_by", "parts", "scheduler", "data_digest",
                "threads", "train_images"):
        assert done.data.tags[tag] == swept.data.tags[tag], tag
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_loss", "test_acc", "test_loss"):
        assert history(client_i, done, key) == history(client_s, swept, key), key
    epochs = [s for s, _ in history(client_i, killed)]
    recorded = record.read(next((tmp_path / "recs").glob("*-s1.jsonl")))
    assert len(epochs) >= 2 and epochs == [e["epoch"] for e in recorded.epochs] and killed.info.status == "KILLED"
    # and the sweep's own run trains again, without Ray, to the same curves
    p = subprocess.run([PYTHON, "-m", "tune", "rerun", swept.info.run_id], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["matched"] is True, p.stderr[-2000:]
    # and the report reads them like any sweep
    from analysis.__main__ import main

    assert main(["report", "--tracking-uri", f"sqlite:///{imported}/mlflow.db", "--out", str(tmp_path / "report")]) == 0
    assert "dropout-mlp" in (tmp_path / "report" / "REPORT.md").read_text()


@pytest.mark.slow
def test_the_study_runner_records_each_trial_once(tmp_path):
    args = [PYTHON, "-m", "tune", "study", "report", "--record", "recs", "--smoke", "--data", "synthetic",
            "--set", "epochs=2", "--set", "limit=300", "--set", "eval_limit=200", "--set", "mlp.hidden=32",
            "--set", "cnn.channels=4,8", "--grid", "dropout=0.5,0.8", "--workers", "2", "--checkpoint-every", "1"]
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [record.read(f) for f in sorted((tmp_path / "recs").glob("*.jsonl"))]
    # the grids shrunk to two rates: the same distinct trials a sweep would run, shared baselines once
    from tune import catalogue

    expected = catalogue.expand("report", grids={"dropout": "0.5,0.8"}, sets={}, base={**catalogue.SMOKE})
    assert len(recs) == len(expected) and all(r.finished and len(r.epochs) == 2 for r in recs)
    assert sorted(r.header["parts"] for r in recs) == sorted(list(t.parts) for t in expected)
    assert all(r.header["threads"] == 1 and r.header["smoke"] for r in recs)
    assert not list((tmp_path / "recs").glob("*.state.pt"))  # finished records keep no state
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"{len(recs)} already recorded" in p.stderr and "running 0" in p.stderr
    assert json.loads((tmp_path / "recs" / recs[0].path.name).read_text().splitlines()[0])["id"] == recs[0].header["id"]


def test_an_exported_sweep_imports_as_it_was(tmp_path, monkeypatch):
    """tune export, then tune import: the same params (paths made relative), tags, curves and times."""
    from test_analysis_report import log_fake_run

    from tune import catalogue

    monkeypatch.chdir(tmp_path)
    source, copy = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    base = {"epochs": 4, "data": f"imagefolder:{tmp_path}/cifar.tar.gz", "data_dir": str(tmp_path / "data")}
    [baseline] = [t for t in catalogue.expand("report", base=base) if len(t.parts) == 3]
    cut = catalogue.expand("dropout-mlp", grids={"dropout": "0.9"}, base=base)[0]
    a = log_fake_run(source, "dropout-mlp", baseline.config, "s", "t0", scheduler="asha,fifo,fifo",
                     tags={"parts": ",".join(baseline.parts), "data_digest": "abc", "threads": "1", "train_images": "600"})
    b = log_fake_run(source, "dropout-mlp", cut.config, "s", "t1", epochs_run=2)
    paths = tracking.export_records(tracking.client(source), ["dropout-mlp"], "s", tmp_path / "recs")
    assert len(paths) == 2 and str(tmp_path) not in "".join(p.read_text() for p in paths)  # no machine paths
    c = tracking.client(copy)
    ids = {tracking.import_record(c, copy, record.read(p), "ignored") for p in paths}
    src = tracking.client(source)
    for original in (a, b):
        was = src.get_run(original)
        [now] = [c.get_run(i) for i in ids if c.get_run(i).data.tags["record_id"] == original]
        assert now.data.params == {**was.data.params, "data": "imagefolder:cifar.tar.gz", "data_dir": "data"}
        for tag in ("sweep_id", "experiment", "config_key", "stopped_by", "scheduler"):
            assert now.data.tags[tag] == was.data.tags[tag], tag
        # the commit survives the round trip
        assert tracking.git_commit_of(now.data.tags) == tracking.git_commit_of(was.data.tags) != ""
        assert now.data.tags["parts"] == was.data.tags.get("parts", "dropout-mlp")  # a run from before the tag
        assert (now.info.start_time, now.info.end_time, now.info.status) == (
            was.info.start_time, was.info.end_time, was.info.status)
        for key in ("val_loss", "train_loss", "best_val_loss", "test_acc", "best_epoch"):
            assert [(m.step, m.value) for m in sorted(c.get_metric_history(now.info.run_id, key), key=lambda m: m.step)] \
                == [(m.step, m.value) for m in sorted(src.get_metric_history(original, key), key=lambda m: m.step)], key


def test_concurrent_trials_log_the_same_new_dataset_without_a_clash(tmp_path):
    """MLflow's SQL store races to create a dataset row; trials starting together must all link it."""
    import threading

    from tune.config import TrialConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = tracking.client(uri)
    runs = [c.create_run(tracking.experiment_id(c, "dropout-mlp")).info.run_id for _ in range(8)]
    errors = []

    def log(run_id):
        try:
            tracking.log_dataset(tracking.client(uri), run_id, TrialConfig(data="synthetic"),
                                 {"data_digest": "ab" * 32, "train_images": "10"})
        except Exception as e:  # noqa: BLE001 - the test reports what failed
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(len(c.get_run(r).inputs.dataset_inputs) == 1 for r in runs)
