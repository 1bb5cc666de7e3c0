"""Nothing lost, nothing counted twice, bad input refused up front: real Ray, real MLflow, small data."""

import json
import os
import signal
import subprocess
import time

import pytest
from test_bad_input import BAD_CASES, assert_refused, bad_archives

from conftest import PYTHON, ROOT, history, mlflow_runs, run_sweep, sweep_cmd

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them

# One MLP trial of a few seconds per epoch: long enough to kill mid-run.
SLOW_TRIAL = ["dropout-mlp", "--grid", "dropout=0.5", "--scheduler", "fifo", "--set", "epochs=5",
              "--set", "limit=24000", "--set", "eval_limit=1000", "--checkpoint-every", "2"]


def results(cwd, sweep_id) -> dict[str, list[dict]]:
    """Ray's own per-trial result log: trial id -> reported results, in order."""
    out = {}
    for f in (cwd / "ray_results" / sweep_id).glob("*/result.json"):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_trial_restores_exactly_into_its_own_run(tmp_path, cifar_args):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    p = run_sweep(straight, *SLOW_TRIAL, *cifar_args)
    assert p.returncode == 0, p.stderr[-3000:]

    driver = subprocess.Popen(sweep_cmd(*SLOW_TRIAL, *cifar_args, "--sweep-id", "kill"), cwd=killed,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Kill the worker once it is past its epoch-2 checkpoint, mid-way to the next one.
        reported = wait_for(lambda: [r for rs in results(killed, "kill").values() for r in rs if r["epoch"] >= 3],
                            300, "epoch 3")
        os.kill(reported[0]["pid"], signal.SIGKILL)
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, err[-3000:]

    trial_results = next(iter(results(killed, "kill").values()))
    assert len({r["pid"] for r in trial_results}) == 2  # it really died and came back
    client_a, runs_a = mlflow_runs(straight, "dropout-mlp")
    client_b, runs_b = mlflow_runs(killed, "dropout-mlp")
    assert len(runs_b) == 1  # the retry continued its own run
    run_a, run_b = runs_a[0], runs_b[0]
    for key in ("val_loss", "train_loss", "best_val_loss", "train_acc"):
        h = history(client_b, run_b, key)
        assert [step for step, _ in h] == [1, 2, 3, 4, 5], key  # every epoch exactly once
        assert h == history(client_a, run_a, key), key  # and the same as without the kill
    for key in ("best_val_loss", "best_val_acc", "test_loss", "test_acc", "best_epoch"):
        assert run_b.data.metrics[key] == run_a.data.metrics[key], key
    assert run_b.info.status == "FINISHED" and run_b.data.tags["stopped_by"] == "completed"
    # the restored trial ended on the uninterrupted trial's numbers, in Ray's log too
    assert trial_results[-1]["best_val_loss"] == run_a.data.metrics["best_val_loss"]


def test_killed_driver_resumes_without_duplicates_or_retraining(tmp_path, cifar_args):
    args = ["dropout-mlp", "--grid", "dropout=0.2,0.4,0.6,0.8", "--scheduler", "fifo", "--set", "epochs=3",
            "--set", "limit=6000", "--set", "eval_limit=1000", "--checkpoint-every", "1", "--max-concurrent", "2",
            *cifar_args, "--sweep-id", "drv"]
    driver = subprocess.Popen(sweep_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        # Wait until one trial finished and another has reported, then kill the driver and its Ray.
        def progress():
            rs = results(tmp_path, "drv")
            done = [t for t, r in rs.items() if r and r[-1]["epoch"] == 3]
            started = [t for t, r in rs.items() if r and r[-1]["epoch"] < 3]
            return (done, started) if done and started else None

        done, _ = wait_for(progress, 300, "one finished and one running trial")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = results(tmp_path, "drv")

    p = run_sweep(tmp_path, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming drv" in p.stderr
    after = results(tmp_path, "drv")
    assert len(after) == 4 and all(r[-1]["epoch"] == 3 for r in after.values())
    for trial in done:  # finished before the kill: not one epoch trained again
        assert after[trial] == before[trial]
    client, runs = mlflow_runs(tmp_path, "dropout-mlp")
    assert len(runs) == 4
    for run in runs:
        assert [s for s, _ in history(client, run)] == [1, 2, 3]
        assert run.info.status == "FINISHED" and run.data.tags["stopped_by"] == "completed"


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, cifar_args):
    args = [*SLOW_TRIAL, *cifar_args, "--sweep-id", "int"]
    driver = subprocess.Popen(sweep_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        wait_for(lambda: any(results(tmp_path, "int").values()), 300, "a first epoch")
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert "--resume --sweep-id int" in err and "Traceback" not in err
    client, runs = mlflow_runs(tmp_path, "dropout-mlp")
    assert [(r.info.status, r.data.tags["stopped_by"]) for r in runs] == [("KILLED", "killed")]
    p = run_sweep(tmp_path, "--resume", "--sweep-id", "int")
    assert p.returncode == 0, p.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path, "dropout-mlp")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [s for s, _ in history(client, runs[0])] == [1, 2, 3, 4, 5]
    # and now there is nothing left to resume
    p = run_sweep(tmp_path, "--resume")
    assert p.returncode == 2 and "nothing to resume" in p.stderr


def test_diverging_trial_fails_its_run_without_retry(tmp_path):
    p = run_sweep(tmp_path, "dropout-mlp", "--grid", "dropout=0.3,0.6", "--data", "synthetic:nan", "--set", "epochs=3",
                  "--set", "hidden=32", "--sweep-id", "nan")
    assert p.returncode == 0, p.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path, "dropout-mlp")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FAILED" and run.data.tags["stopped_by"] == "error"
        assert "non-finite" in run.data.tags["stop_reason"] and "epoch 1" in run.data.tags["stop_reason"]
    # not retried: Ray saw no error, so no trial started twice
    trials = [t for t in (tmp_path / "ray_results" / "nan").iterdir() if t.is_dir()]
    assert len(trials) == 2 and not any((t / "error.txt").exists() for t in trials)


# The battery runs in process (tests/test_bad_input.py); these few run the real entry point end to end.
END_TO_END = ["train-dropout", "train-missing dataset", "sweep-experiment", "sweep-gpus", "sweep-storage in /proc"]


@pytest.mark.parametrize("command, case, args, words", [c for c in BAD_CASES if f"{c[0]}-{c[1]}" in END_TO_END],
                         ids=END_TO_END)
def test_bad_input_is_refused_before_anything_starts(tmp_path, command, case, args, words):
    paths = bad_archives(tmp_path)
    args = [a.format(**paths) for a in args]
    work = tmp_path / "work"
    work.mkdir()
    if command == "train":
        cmd = [PYTHON, "-m", "tune", "train", "--data", "synthetic", "--epochs", "1", *args]
    else:
        experiment = [] if not args[0].startswith("--") else ["dropout-mlp"]
        cmd = sweep_cmd(*experiment, "--data", "synthetic", "--set", "epochs=1", *args)
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert_refused(p.stderr, words, work)


def test_two_node_cluster_runs_a_submitted_sweep(tmp_path, shared_archive, data_dir, cifar):
    """A head and a second node on loopback; `ray job submit --working-dir .`; trials on both nodes."""
    ray = str(ROOT / ".venv" / "bin" / "ray") if (ROOT / ".venv" / "bin" / "ray").exists() else "ray"
    gcs, dashboard, node_manager, object_manager, *agent_ports = _free_ports(12)

    def agents(i):  # every agent port explicit: Ray's fixed defaults collide with any other Ray on this machine
        a, b, c, d = agent_ports[4 * i:4 * i + 4]
        return [f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={b}",
                f"--runtime-env-agent-port={c}", f"--metrics-export-port={d}"]

    temp = f"/tmp/rt{os.getpid()}"
    # Token auth, as a deployment runs it: one token for both nodes and the job client.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=true", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats", *agents(0)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        _wait_port(gcs, 60)
        worker = subprocess.Popen([ray, "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--num-gpus=0",
                                   "--node-ip-address=127.0.0.1", f"--node-manager-port={node_manager}",
                                   f"--object-manager-port={object_manager}", "--resources", '{"second_node": 1}',
                                   f"--temp-dir={temp}w", "--disable-usage-stats", *agents(1)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(dashboard, 60)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        submit_cmd = (
            [ray, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             PYTHON, "-m", "tune", "sweep", "dropout-mlp", "--grid", "dropout=0.2,0.4,0.6,0.8", "--scheduler", "fifo",
             "--set", "epochs=2", "--set", "limit=3000", "--set", "eval_limit=500",
             "--data", f"imagefolder:{shared_archive}", "--set", f"data_dir={data_dir}",
             "--tracking-uri", uri, "--storage", str(tmp_path / "results")])
        for _ in range(30):  # the head's job agent starts a little after its dashboard
            submit = subprocess.run(submit_cmd, env=env, capture_output=True, text=True, timeout=420)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        client, runs = mlflow_runs(tmp_path, "dropout-mlp")
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
        assert len({r.data.tags["node_id"] for r in runs}) == 2  # trials ran on both nodes
    finally:
        for proc in (worker, head):
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp, f"{temp}w"])


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port, timeout):
    import socket

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, f"port {port}")
