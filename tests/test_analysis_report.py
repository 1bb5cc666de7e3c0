"""The report from MLflow stores written with the real TrialRun schema but made-up curves (no training):
every section, ASHA-stopped trials, several seeds, a FIFO twin sweep, the CLI's errors, and bulk reading."""

import contextlib
import io
import math
import os
import re
import subprocess
import time
import zlib

import numpy as np
import pytest

from conftest import PYTHON, ROOT
from tune.config import TrialConfig
from tune.tracking import BEST_METRICS, EPOCH_METRICS, TrialRun, client
from tune.train import network

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_curves(cfg: TrialConfig, epochs_run: int) -> dict[str, list[float]]:
    """Plausible curves: more dropout trains slower and overfits later; the seed adds noise."""
    rng = np.random.default_rng(zlib.crc32(f"{cfg.key()}-{cfg.seed}".encode()))
    e = np.arange(1, epochs_run + 1)
    base = 0.9 if cfg.model == "cnn" else 1.3
    base -= 0.1 * ("bn" in cfg.order.split(",")) + 0.05 * (cfg.dropout_kind == "channel")
    train = 2.3 * np.exp(-e / (2 + 6 * cfg.dropout)) + 0.1 + rng.normal(0, 0.01, len(e))
    turn = 3 + 12 * cfg.dropout
    val = base + 0.9 * np.exp(-e / 2.5) + 0.04 * np.maximum(0, e - turn) + rng.normal(0, 0.02, len(e))
    return {"train_loss": train, "train_acc": np.clip(1 - train / 2.5, 0, 1), "val_loss": val,
            "val_acc": np.clip(1.05 - val / 2.4, 0, 1), "epoch_seconds": 1 + rng.random(len(e)),
            "test_shift": rng.normal(0, 0.01, len(e))}


def log_fake_run(uri: str, experiment: str, cfg: TrialConfig, sweep_id: str, trial_id: str, epochs_run: int | None = None,
                 scheduler: str = "asha", stopped_by: str | None = None, tags: dict | None = None) -> str:
    """One run as the trainable writes it (tags, params, per-epoch and on-improvement metrics), in one batch."""
    from mlflow.entities import Metric

    epochs_run = cfg.epochs if epochs_run is None else epochs_run
    run = TrialRun.open(uri, experiment, cfg, {"sweep_id": sweep_id, "trial_id": trial_id, "git_commit": "0123456789abcdef",
                                               "versions": "torch=2.14.1 mlflow=3.17.2", "scheduler": scheduler,
                                               "node_id": "node-a", "network": str(network(cfg)), **(tags or {})})
    c = fake_curves(cfg, epochs_run)
    metrics, best, t0 = [], {"best_val_loss": math.inf}, int(time.time() * 1000)
    for i in range(epochs_run):
        epoch, ts = i + 1, t0 + i
        if c["val_loss"][i] <= best["best_val_loss"]:
            best = {"best_epoch": epoch, "best_val_loss": c["val_loss"][i], "best_val_acc": c["val_acc"][i],
                    "test_loss": c["val_loss"][i] + c["test_shift"][i], "test_acc": c["val_acc"][i] - c["test_shift"][i]}
            metrics += [Metric(k, float(best[k]), ts, epoch) for k in BEST_METRICS if k != "best_val_loss"]
        values = {k: c[k][i] for k in EPOCH_METRICS if k != "best_val_loss"} | {"best_val_loss": best["best_val_loss"]}
        metrics += [Metric(k, float(v), ts, epoch) for k, v in values.items()]
    for start in range(0, len(metrics), 1000):
        run.client.log_batch(run.run_id, metrics=metrics[start:start + 1000])
    run.finish(stopped_by or ("completed" if epochs_run == cfg.epochs else "scheduler"))
    return run.run_id


def fake_study(uri: str, epochs: int = 6, seeds: int = 2, rates=(0.1, 0.5, 0.9), sweep: str = "s2",
               experiments=("dropout-mlp", "dropout-cnn", "bn-ablation", "dropout-ablation", "order", "dropout-kind")) -> None:
    """A small study through the catalogue's own grids: the highest rate stopped by 'ASHA' after epoch 2,
    plus an older FIFO sweep of dropout-mlp where every trial ran to the end."""
    from tune import catalogue

    grids = {"dropout": ",".join(map(str, rates))}
    base = {"epochs": epochs, "data": "synthetic", "limit": 2000, "eval_limit": 500}
    for name in experiments:
        g = grids if name in ("dropout-mlp", "dropout-cnn", "dropout-kind") else None
        if name == "dropout-mlp":
            for i, (_, cfg) in enumerate(catalogue.expand(name, grids=g, seeds=seeds, base=base)):
                log_fake_run(uri, name, cfg, "s1-fifo", f"f{i}", scheduler="fifo")
        for i, (_, cfg) in enumerate(catalogue.expand(name, grids=g, seeds=1 if name == "dropout-kind" else seeds, base=base)):
            stop = 2 if name.startswith("dropout-") and name != "dropout-ablation" and cfg.dropout == max(rates) else None
            log_fake_run(uri, name, cfg, sweep, f"t{i}", epochs_run=stop)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    fake_study(uri)
    return uri


def report(*args) -> subprocess.CompletedProcess:
    """`python -m analysis report ARGS` in this process (the imports are paid once), as a finished process."""
    from analysis.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["report", *args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def written(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "study"
    p = report("--tracking-uri", store, "--out", str(out))
    assert p.returncode == 0, p.stderr
    return out, (out / "REPORT.md").read_text()


def test_every_section_is_written(written):
    out, md = written
    # The sections follow the catalogue's declarations, in its order, numbered from them.
    titles = ["## 0. Setup", "## 1. The study's claims", "## 2. MLP over the dropout grid (`dropout-mlp`)",
              "## 3. CNN over the dropout grid (`dropout-cnn`)", "## 4. MLP and CNN with and without BatchNorm (`bn-ablation`)",
              "## 5. MLP and CNN with and without Dropout (`dropout-ablation`)", "## 6. CNN block orders of the study (`order`)",
              "## 7. CNN with element vs channel dropout over the dropout grid (`dropout-kind`)", "## 8. Train vs validation",
              "## 9. Test results", "## 10. Dropout-rate effects", "## 11. Seeds", "## 12. Scheduler efficiency",
              "## 13. Run inventory"]
    assert [line for line in md.splitlines() if line.startswith("## ")] == titles
    # not in the store: a note, not a failure
    assert "Not in this report:" in md and "`order-all` (no runs in this store" in md
    assert "tables/dropout-kind.csv" in md
    for name in ("dropout-mlp_val_loss", "dropout-cnn_best_curves", "bn-ablation_cnn_curves", "dropout-ablation_mlp_curves",
                 "order_curves", "best_epoch_per_rate", "dropout-kind_test_acc", "stop_epochs"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE), name
        assert f"figures/{name}.png" in md
    assert (out / "REPORT.html").read_text().count("data:image/png;base64,") == md.count("](figures/")


def test_seeds_give_intervals_and_tests(written):
    _, md = written
    assert re.search(r"\d\.\d{4} ± \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", md)  # a mean ± std [CI] loss cell
    assert "BN vs no-BN on the CNN" in md and "dropout vs no-dropout on the MLP" in md
    assert "Welch t-test, 2 vs 2 seeds" in md and "Holm-adjusted" in md
    assert "order relu,bn,dropout,pool vs bn,relu,dropout,pool (order)" in md
    assert "no significance can be claimed" not in md.split("## 11. Seeds")[1].split("##")[0]


def test_scheduler_stops_are_marked_and_counted(written):
    out, md = written
    import pandas as pd

    sched = pd.read_csv(out / "tables" / "scheduler.csv").set_index("experiment")
    mlp = sched.loc["dropout-mlp"]
    assert (mlp["trials"], mlp["full_grid_epochs"], mlp["trial_epochs"]) == (6, 36, 4 * 6 + 2 * 2)
    assert "2x scheduler at epoch 2" in md
    winners = pd.read_csv(out / "tables" / "winners.csv")
    assert list(winners["experiment"]) == ["dropout-mlp"] and winners["fifo_sweep"].iloc[0] == "s1-fifo"
    # The stopped trials' test metrics are their best so far, as the test results table shows.
    test_all = pd.read_csv(out / "tables" / "test_all.csv")
    stopped = test_all[test_all["dropout"] == 0.9]
    assert len(stopped) == 2 and (stopped["stopped"] == "2x scheduler at epoch 2").all()  # the MLP's and the CNN's


def test_order_section_prints_the_modules(written):
    _, md = written
    section = md.split("## 6. CNN block orders")[1].split("## 7.")[0]
    assert section.count("Conv2d(3, 64, kernel_size=(3, 3)") == 3
    assert "MaxPool2d(kernel_size=2, stride=2, padding=1" in section


def test_rerun_overwrites_and_sweep_and_all_select(store, written, tmp_path):
    out, _ = written
    (out / "figures" / "stale.png").write_bytes(b"old")
    p = report("--tracking-uri", store, "--out", str(out), "--experiment", "dropout-mlp", "--sweep", "s1-fifo")
    assert p.returncode == 0, p.stderr
    assert not (out / "figures" / "stale.png").exists()
    md = (out / "REPORT.md").read_text()
    assert "sweep s1-fifo" in md and "`dropout-cnn` (not among the experiments asked for" in md
    p = report("--tracking-uri", store, "--out", str(tmp_path / "pooled"), "--experiment", "dropout-mlp", "--all")
    assert p.returncode == 0, p.stderr
    import pandas as pd

    # Both sweeps ran the same configurations and seeds: pooled, each counts once (the latest run).
    sweep = pd.read_csv(tmp_path / "pooled" / "tables" / "dropout-mlp.csv")
    assert list(sweep["seeds"]) == [2, 2, 2]


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "nope"], "no runs of sweep 'nope'"),
    (["--experiment", "bogus"], "experiment 'bogus' is neither in the catalogue"),
    (["--sweep", "s2", "--all"], "not allowed with argument"),
])
def test_user_errors_are_one_line_and_exit_2(store, tmp_path, args, needle):
    p = report("--tracking-uri", store, "--out", str(tmp_path / "r"), *args)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_missing_store_is_not_created(tmp_path):
    """The real entry point: a missing store (the default ./mlflow.db, or a --tracking-uri) is one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    p = subprocess.run([PYTHON, "-m", "analysis", "report", "--out", str(tmp_path / "r")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: tracking store sqlite:///") and "does not exist" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists(), p.stderr
    missing = tmp_path / "nothing" / "mlflow.db"
    p = report("--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stderr.startswith("error: tracking store") and "does not exist" in p.stderr, p.stderr
    assert not missing.exists() and not missing.parent.exists()


def test_empty_store_and_empty_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = client(uri)
    c.create_experiment("dropout-mlp")  # an experiment with no runs
    p = report("--tracking-uri", uri, "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stderr.startswith("error: no runs of") and "make sweep" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_out_folder_with_other_files_is_refused(store, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    p = report("--tracking-uri", store, "--out", str(tmp_path))
    assert p.returncode == 2 and "not empty" in p.stderr and (tmp_path / "keep.txt").exists()


def test_a_new_catalogue_experiment_gets_its_section(tmp_path, monkeypatch):
    """Declared once: a new experiment in the catalogue is reported by its kind, with no edit to the report."""
    from tune import catalogue

    wide = catalogue.Experiment("dropout-wide", "wide MLP over the dropout grid", ({"model": "mlp", "hidden": 2048},),
                                {"dropout": catalogue.DROPOUT_GRID}, analysis="rates")
    ablation = catalogue.Experiment("bn-wide", "wide MLP with and without BatchNorm", (
        {"model": "mlp", "hidden": 2048, "order": "bn,relu,dropout"}, {"model": "mlp", "hidden": 2048, "order": "relu,dropout"}),
        scheduler="fifo", analysis="ablation", layer="bn")
    monkeypatch.setitem(catalogue.CATALOGUE, wide.name, wide)
    monkeypatch.setitem(catalogue.CATALOGUE, ablation.name, ablation)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fake_study(uri, experiments=("dropout-mlp", "dropout-wide", "bn-wide"), seeds=2)
    p = report("--tracking-uri", uri, "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "r" / "REPORT.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[2:5] == ["## 2. MLP over the dropout grid (`dropout-mlp`)",
                           "## 3. Wide MLP over the dropout grid (`dropout-wide`)",
                           "## 4. Wide MLP with and without BatchNorm (`bn-wide`)"]
    assert (tmp_path / "r" / "tables" / "dropout-wide.csv").is_file() and "figures/dropout-wide_val_loss.png" in md
    assert "**BN vs no-BN on the MLP**" in md and "Holm-adjusted over the 1 tested" in md  # its own comparison


def test_a_shared_run_is_read_by_every_experiment_it_serves(tmp_path):
    """One run in dropout-mlp with parts tagged: each part's rows read it, each with its part's scheduler."""
    from analysis import fetch
    from tune import catalogue

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [baseline] = [t for t in catalogue.expand("report", base={"epochs": 6, "data": "synthetic"})
                  if t.parts == ("dropout-mlp", "bn-ablation", "dropout-ablation")]
    run_id = log_fake_run(uri, "dropout-mlp", baseline.config, "s1", "t0", scheduler="asha,fifo,fifo",
                          tags={"parts": ",".join(baseline.parts)})
    study = fetch.load(uri, ["bn-ablation"])  # its MLflow experiment is dropout-mlp's, not asked for
    assert list(study.runs["run_id"]) == [run_id] and list(study.runs["scheduler"]) == ["fifo"]
    study = fetch.load(uri)
    rows = study.runs[study.runs["run_id"] == run_id]
    assert dict(zip(rows["experiment"], rows["scheduler"])) == {"dropout-mlp": "asha", "bn-ablation": "fifo",
                                                               "dropout-ablation": "fifo"}
    assert set(rows["home"]) == {"dropout-mlp"} and rows["shared"].all()


def test_a_run_whose_params_do_not_validate_is_named_and_left_out(tmp_path):
    import sqlite3

    import pandas as pd

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fake_study(uri, experiments=("dropout-mlp",), seeds=1)
    bad = client(uri).search_runs([client(uri).get_experiment_by_name("dropout-mlp").experiment_id],
                                  "tags.sweep_id = 's2'")[0].info.run_id
    with sqlite3.connect(f"{tmp_path}/mlflow.db") as db:  # MLflow's params are immutable: alter the store itself
        db.execute("UPDATE params SET value = '1.7' WHERE run_uuid = ? AND key = 'dropout'", (bad,))
    p = report("--tracking-uri", uri, "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    assert f"left out: run {bad} in dropout-mlp: dropout: 1.7 is outside [0, 1)" in p.stderr
    md = (tmp_path / "r" / "REPORT.md").read_text()
    assert "**1 runs left out**" in md and bad in md
    shown = pd.read_csv(tmp_path / "r" / "tables" / "dropout-mlp.csv")
    assert len(shown) == 2 and bad not in ";".join(shown["run_ids"])  # three rates ran; the third is not shown


def test_a_sweep_run_is_no_trial_old_tags_still_read_and_the_report_lands_on_it(tmp_path):
    """The sweep's own run (the trials' parent) never counts as a trial; a run from before MLflow's reserved
    commit tag is read through its own; `attach` logs the report to the sweep runs of the sweeps it read."""
    from analysis import fetch
    from analysis import report as reports
    from tune import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    fake_study(uri, experiments=("dropout-mlp",), seeds=1)
    c = client(uri)
    parent = tracking.SweepRun.open(uri, "s2", ["dropout-mlp"], {"trials": 3}, "the settings", "c0ffee")
    again = tracking.SweepRun.open(uri, "s2", ["dropout-mlp"], {"trials": 3}, "the settings", "c0ffee")
    assert again.run_ids == parent.run_ids  # a resumed sweep finds its run again
    parent.log({"progress_trial_epochs": 5}, 5)
    parent.close({"dropout-mlp": "best: 0.5"}, "FINISHED")
    run = c.get_run(parent.run_ids["dropout-mlp"])
    assert run.info.status == "FINISHED" and "trial_id" not in run.data.tags
    assert run.data.tags[tracking.NOTE] == "## Outcome\n\nbest: 0.5\n\n## Settings\n\nthe settings"
    parent.close({"dropout-mlp": "best: 0.6"}, "FINISHED")  # a resumed sweep's second close replaces the outcome
    assert c.get_run(parent.run_ids["dropout-mlp"]).data.tags[tracking.NOTE] == (
        "## Outcome\n\nbest: 0.6\n\n## Settings\n\nthe settings")
    assert run.data.params == {"trials": "3"} and run.data.tags[tracking.GIT_COMMIT] == "c0ffee"

    old = c.search_runs([c.get_experiment_by_name("dropout-mlp").experiment_id], "tags.sweep_id = 's2'")[-1].info.run_id
    c.delete_tag(old, tracking.GIT_COMMIT)
    c.set_tag(old, "git_commit", "from-before")
    study = fetch.load(uri)
    ours = study.runs[study.runs["sweep_id"] == "s2"]
    assert parent.run_ids["dropout-mlp"] not in set(study.runs["run_id"]) and ours["run_id"].nunique() == 3
    assert dict(zip(ours["run_id"], ours["git_commit"]))[old] == "from-before"
    assert set(ours["git_commit"]) == {"from-before", "0123456789abcdef"}

    reports.write(study, tmp_path / "r")
    assert reports.attach(study, tmp_path / "r") == (1, [])
    files = {a.path for a in c.list_artifacts(parent.run_ids["dropout-mlp"], "report")}
    assert {"report/REPORT.md", "report/REPORT.html", "report/figures"} <= files

    # A sweep run whose artifact store cannot be written (here a folder even root cannot create) is named,
    # and the others still get the report.
    broken = c.create_experiment("dropout-cnn", artifact_location="file:///proc/no-such-store")
    run = c.create_run(broken, tags={"sweep_id": "s2", "run_kind": "sweep"})
    study.runs.loc[0, "home"] = "dropout-cnn"  # the report read a trial of that experiment too
    attached, failed = reports.attach(study, tmp_path / "r")
    assert attached == 1 and len(failed) == 1 and run.info.run_id in failed[0]


def test_history_paths_agree_and_a_failing_private_path_falls_back(store, monkeypatch):
    """The SQL bulk read (private) and MLflow's client (public) give the same history; if MLflow's internals
    move under the private path, the report still reads through the public one."""
    from analysis import fetch

    c = client(store)
    study = fetch.load(store)
    bulk = fetch.fetch_history(c, study.runs)
    public = fetch.history_frame(fetch._threaded_points(c, list(dict.fromkeys(study.runs["run_id"])), fetch.HISTORY_KEYS))
    assert len(bulk) > 0 and bulk.equals(public)

    def moved(*args):
        raise AttributeError("SqlMetric has no attribute 'run_uuid'")  # as a renamed column would fail

    monkeypatch.setattr(fetch, "_sql_points", moved)
    assert fetch.fetch_history(c, study.runs).equals(public)
