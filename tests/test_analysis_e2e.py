"""End to end: the real sweep CLI (Ray Tune, the real trainable) logs a tiny sweep to a temporary SQLite
store; the report CLI renders it; its tables hold what MLflow holds and its figures are PNGs."""

import re
import subprocess

import pandas as pd
import pytest
from test_analysis_report import PNG_SIGNATURE, report

from conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them


def table_row(*cells) -> re.Pattern:
    """A Markdown table row that starts with these cells, however wide its columns are."""
    return re.compile(r"^\|" + "".join(rf"\s*{re.escape(str(c))}\s*\|" for c in cells), re.M)

RATES = (0.1, 0.5)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{folder}/mlflow.db"
    p = subprocess.run([PYTHON, "-m", "tune", "sweep", "dropout-mlp", "--smoke", "--grid", f"dropout={','.join(map(str, RATES))}",
                        "--set", "hidden=64", "--data", "synthetic", "--tracking-uri", uri, "--storage", str(folder / "ray"),
                        "--verbose", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = folder / "report"
    p = report("--tracking-uri", uri, "--out", str(out))  # the CLI's main, in this process
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out / "REPORT.md")
    return uri, out


@pytest.fixture(scope="module")
def logged(swept):
    """What MLflow holds, read with the plain client: per dropout rate, the minimum validation loss, its
    epoch (the later one on a tie), and the latest test metrics (those of the best-validation epoch)."""
    from mlflow import MlflowClient

    uri, _ = swept
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("dropout-mlp").experiment_id])
            if r.data.tags.get("trial_id")]
    assert len(runs) == len(RATES)
    values = {}
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val_loss")
        best = min(history, key=lambda m: (m.value, -m.step))
        values[float(run.data.params["dropout"])] = {
            "min_val_loss": best.value, "min_val_epoch": best.step, "test_loss": run.data.metrics["test_loss"],
            "test_acc": run.data.metrics["test_acc"], "epochs": len(history), "stopped_by": run.data.tags["stopped_by"]}
    return values


def test_tables_hold_what_mlflow_holds(swept, logged):
    _, out = swept
    sweep = pd.read_csv(out / "tables" / "dropout-mlp.csv").set_index("dropout")
    assert sorted(sweep.index) == list(RATES)
    for rate, v in logged.items():
        assert sweep.loc[rate, "min_val_loss_mean"] == pytest.approx(v["min_val_loss"], rel=1e-12)
        assert sweep.loc[rate, "min_val_epoch_mean"] == v["min_val_epoch"]
        assert sweep.loc[rate, "test_acc_mean"] == pytest.approx(v["test_acc"], rel=1e-12)
        assert sweep.loc[rate, "seeds"] == 1
    best = min(logged, key=lambda r: logged[r]["min_val_loss"])
    test = pd.read_csv(out / "tables" / "test_all.csv")
    assert list(test.loc[test["selected on validation"] == "yes", "dropout"]) == [best]
    md = (out / "REPORT.md").read_text()
    assert f"Best configuration by minimum validation loss: **{best}**" in md
    for rate, v in logged.items():
        # The Markdown rows, formatted from the same numbers.
        assert table_row(rate, f"{v['min_val_loss']:.4f}", v["min_val_epoch"]).search(md), rate
        assert table_row("MLP", rate, v["min_val_epoch"], f"{v['test_loss']:.4f}", f"{v['test_acc'] * 100:.2f}").search(md)
        label = (f"completed ({v['epochs']} epochs)" if v["stopped_by"] == "completed"
                 else f"{v['stopped_by']} at epoch {v['epochs']}")
        assert test.set_index("dropout").loc[rate, "stopped"] == label, rate
    assert "no significance can be claimed" in md
    inventory = pd.read_csv(out / "tables" / "inventory.csv")
    assert inventory["runs"].tolist() == [len(RATES)] and inventory["data"].tolist() == ["synthetic"]
    sched = pd.read_csv(out / "tables" / "scheduler.csv").iloc[0]
    assert sched["scheduler"] == "asha" and sched["trial_epochs"] == sum(v["epochs"] for v in logged.values())
    assert "torch=" in (out / "tables" / "versions.csv").read_text()


def test_figures_are_valid_pngs(swept):
    import matplotlib.image

    _, out = swept
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"dropout-mlp_val_loss", "dropout-mlp_best_curves", "dropout-mlp_train_per_rate",
                                      "test_acc_per_rate"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, png
        assert f"figures/{png.name}" in (out / "REPORT.md").read_text()


def test_an_experiment_not_in_the_store(swept, tmp_path):
    uri, _ = swept
    p = report("--tracking-uri", uri, "--experiment", "dropout-cnn", "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stderr == f"error: no runs of dropout-cnn in {uri}; run a sweep first (`make sweep`) " \
                                             f"or pass --tracking-uri to the store that holds them\n"
    p = report("--tracking-uri", uri, "--experiment", "dropout-mlp", "dropout-cnn", "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    assert "`dropout-cnn` (no runs in this store" in (tmp_path / "r" / "REPORT.md").read_text()
