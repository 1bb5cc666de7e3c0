"""The study's default sweep on real Ray and real MLflow, tiny data: every part under its own scheduler,
ASHA ranking each trial within its own group, one shared baseline, and ASHA's rungs through a kill and resume."""

import json
import os
import signal
import subprocess
import time

import pytest
from ray import cloudpickle

from conftest import run_sweep, sweep_cmd
from tune import catalogue

pytestmark = pytest.mark.slow  # real Ray and trials: `make test` runs them

# The whole `report` study, tiny: MLPs and CNNs learn synthetic data at very different losses, so one
# scheduler over all of them would cut every CNN. Four epochs: ASHA's grace rung is epoch 2.
TINY_REPORT = ["report", "--smoke", "--data", "synthetic", "--set", "epochs=4", "--set", "limit=600",
               "--set", "eval_limit=300", "--set", "mlp.hidden=32", "--set", "cnn.channels=4,8"]
FIFO_PARTS = {e.name for e in catalogue.get("report").members if e.scheduler == "fifo"}


def trial_runs(cwd, sweep_id=None) -> list:
    """Every run with a trial_id tag (one per trial), across the study's experiments."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, max_results=1000)
    return [r for r in runs if "trial_id" in r.data.tags and (sweep_id is None or r.data.tags["sweep_id"] == sweep_id)]


def group_of(run) -> list[str]:
    return [f"{p}/{run.data.params['model']}" for p in run.data.tags["parts"].split(",")]


def last_epoch(cwd, run) -> int:
    from mlflow import MlflowClient

    return max(m.step for m in MlflowClient(f"sqlite:///{cwd}/mlflow.db").get_metric_history(run.info.run_id, "val_loss"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny `report` sweep: (its folder, its 24 trial runs)."""
    cwd = tmp_path_factory.mktemp("groups")
    p = run_sweep(cwd, *TINY_REPORT, "--sweep-id", "groups")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "24 trials of report" in p.stderr
    runs = trial_runs(cwd)
    assert len(runs) == 24 and len({r.data.tags["trial_id"] for r in runs}) == 24
    return cwd, runs


def test_a_trial_of_a_fifo_part_is_never_stopped(study):
    cwd, runs = study
    fifo = [r for r in runs if FIFO_PARTS & set(r.data.tags["parts"].split(","))]
    assert len(fifo) == 8  # the ablations' and orders' arms, both shared baselines among them
    for r in fifo:
        assert r.data.tags["stopped_by"] == "completed" and last_epoch(cwd, r) == 4, r.data.tags["parts"]


def test_a_trial_is_ranked_only_within_its_group(study):
    cwd, runs = study
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    # every rung holds trials of its own group alone
    rungs = json.loads((cwd / "ray_results" / "groups" / "rungs.json").read_text())
    assert set(rungs) == {"dropout-mlp/mlp", "dropout-cnn/cnn"}
    for group, levels in rungs.items():
        ranked = {t for _, recorded in levels for t in recorded}
        assert ranked and all(group in group_of(by_trial[t]) for t in ranked), group
    # So each grid keeps its own winners: in each, ASHA cut some trials and let others finish.
    for grid in ("dropout-mlp", "dropout-cnn"):
        ends = [r.data.tags["stopped_by"] for r in runs if grid in r.data.tags["parts"].split(",")]
        assert "scheduler" in ends and ends.count("completed") >= 2, (grid, ends)
    # The shared baselines: ranked in their grid's ASHA group, never cut, and tagged with each part's scheduler.
    shared = [r for r in runs if "," in r.data.tags["parts"]]
    assert sorted(r.data.tags["parts"] for r in shared) == ["dropout-cnn,bn-ablation,dropout-ablation,order",
                                                             "dropout-mlp,bn-ablation,dropout-ablation"]
    for r in shared:
        assert r.data.tags["scheduler"].split(",")[0] == "asha" and set(r.data.tags["scheduler"].split(",")[1:]) == {"fifo"}
        assert any(r.data.tags["trial_id"] in recorded for levels in rungs.values() for _, recorded in levels)


def test_killed_composite_sweep_resumes_with_its_rungs_and_one_baseline(tmp_path):
    args = [*TINY_REPORT, "--max-concurrent", "1", "--checkpoint-every", "1", "--sweep-id", "kill"]
    folder = tmp_path / "ray_results" / "kill"

    def saved_rungs():
        """The scheduler state Ray saved with its experiment state: what a resume restores."""
        for f in folder.glob("callback-states-*.pkl"):
            try:
                states = cloudpickle.loads(f.read_bytes())
            except Exception:  # noqa: BLE001 - caught mid-write
                return None
            rungs = next((s["rungs"] for s in states.values() if s and "rungs" in s), None)
            if rungs and sum(len(rec) for levels in rungs.values() for _, rec in levels) >= 3:
                return rungs
        return None

    driver = subprocess.Popen(sweep_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while saved_rungs() is None and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before it could be killed: " + driver.stderr.read()[-2000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    before = saved_rungs()
    done_before = {r.data.tags["trial_id"] for r in trial_runs(tmp_path) if r.info.status == "FINISHED"}
    assert 0 < len(done_before) < 24

    p = run_sweep(tmp_path, "--resume", "--sweep-id", "kill")
    assert p.returncode == 0, p.stderr[-3000:]
    restored = json.loads((folder / "rungs.restored.json").read_text())
    assert restored == before  # the rungs ASHA had, not empty ones
    final = json.loads((folder / "rungs.json").read_text())
    for group, levels in restored.items():  # the scheduler Ray ran kept them, and added to them
        for (milestone, recorded), (m2, recorded_after) in zip(levels, final[group]):
            assert milestone == m2 and recorded.items() <= recorded_after.items()

    runs = trial_runs(tmp_path, "kill")
    assert len(runs) == 24 and len({r.data.tags["trial_id"] for r in runs}) == 24  # no duplicates
    assert all(r.info.status == "FINISHED" for r in runs)
    baselines = [r for r in runs if r.data.params["model"] == "mlp" and r.data.params["dropout"] == "0.8"
                 and r.data.params["order"] == "bn,relu,dropout"]
    assert len(baselines) == 1 and baselines[0].data.tags["parts"] == "dropout-mlp,bn-ablation,dropout-ablation"
