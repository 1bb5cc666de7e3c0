"""docker/entrypoint.sh and the host-side scripts, run for real but without the services behind them.

ENTRYPOINT_DRY_RUN=1 makes the entry script print its final command instead of running it; what
comes before (checks, waits, GPU claims) runs as it would in a container.
"""

import fcntl
import os
import shlex
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them

ENTRY = ROOT / "docker" / "entrypoint.sh"
TOKEN = "t" * 64
PASSWORD = "p" * 16


def entry(*args, timeout=60, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PG", "GPU"))}
    return subprocess.run([str(ENTRY), *args], env={**base, "WAIT_TIMEOUT": "2", **{k: str(v) for k, v in env.items()}},
                          capture_output=True, text=True, timeout=timeout)


def dry_run_command(p: subprocess.CompletedProcess) -> tuple[str, list[str]]:
    assert p.returncode == 0, p.stderr
    visible, command = p.stdout.strip().splitlines()
    return visible.split("=", 1)[1], shlex.split(command)


MLFLOW_ENV = {"MLFLOW_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 40, "PGHOST": "127.0.0.1",
              "PGUSER": "mlflow", "PGPASSWORD": "pg-password", "PGDATABASE": "mlflow"}
WORKER_ENV = {"RAY_AUTH_TOKEN": TOKEN, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}


@pytest.mark.parametrize("missing", sorted(MLFLOW_ENV))
def test_mlflow_refuses_to_start_without_each_setting(missing):
    p = entry("mlflow", **{k: v for k, v in MLFLOW_ENV.items() if k != missing})
    assert p.returncode != 0
    assert f"{missing} is not set" in p.stderr and ".env" in p.stderr


@pytest.mark.parametrize("var, value, needle", [
    ("MLFLOW_ADMIN_PASSWORD", "short", "MLFLOW_ADMIN_PASSWORD is too short"),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 8, "MLFLOW_FLASK_SERVER_SECRET_KEY is too short"),
    ("PGUSER", "ml flow", "PGUSER and PGDATABASE"),
])
def test_mlflow_refuses_weak_or_malformed_settings(var, value, needle):
    p = entry("mlflow", **{**MLFLOW_ENV, var: value})
    assert p.returncode != 0 and needle in p.stderr, p.stderr


def test_mlflow_says_when_postgres_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        p = entry("mlflow", **MLFLOW_ENV, PGPORT=port, PYTHON=Path(sys.executable))
    assert p.returncode != 0
    assert "cannot connect to PostgreSQL as mlflow@127.0.0.1" in p.stderr and "PostgreSQL is not usable" in p.stderr


@pytest.mark.parametrize("mode", ["head", "worker"])
def test_ray_nodes_refuse_to_start_without_the_token(mode):
    p = entry(mode, **{**WORKER_ENV, "RAY_AUTH_TOKEN": "", "RAY_HEAD_ADDRESS": "127.0.0.1:6379",
                       "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert p.returncode != 0 and "RAY_AUTH_TOKEN is not set" in p.stderr
    p = entry(mode, **{**WORKER_ENV, "RAY_AUTH_TOKEN": "abc", "RAY_HEAD_ADDRESS": "127.0.0.1:6379",
                       "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert p.returncode != 0 and "RAY_AUTH_TOKEN is too short" in p.stderr


def test_head_says_when_mlflow_is_unreachable():
    p = entry("head", **WORKER_ENV, MLFLOW_TRACKING_URI="http://127.0.0.1:9", PYTHON=Path(sys.executable))
    assert p.returncode != 0 and "did not answer /health" in p.stderr and "MLflow is not usable" in p.stderr


def test_worker_says_when_the_head_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        p = entry("worker", **WORKER_ENV, RAY_HEAD_ADDRESS=f"127.0.0.1:{s.getsockname()[1]}")
    assert p.returncode != 0
    assert "did not accept connections within 2s" in p.stderr


@pytest.fixture
def head():
    """A listening socket standing in for the head's GCS port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def fake_gpus(tmp_path):
    """A PATH whose nvidia-smi lists two GPUs, and the folder the workers claim them in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-1)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_CLAIM_DIR": tmp_path / "claims"}


def test_worker_without_gpus_offers_cpus(head, tmp_path):
    # An nvidia-smi that fails, as it does where no driver is loaded (and so on GPU machines too).
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    p = entry("worker", **WORKER_ENV, RAY_HEAD_ADDRESS=head, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
              ENTRYPOINT_DRY_RUN=1, GPU_CLAIM_DIR=tmp_path)
    visible, cmd = dry_run_command(p)
    assert visible == "<unset>" and "--num-gpus" not in cmd
    assert cmd[:4] == ["ray", "start", "--address", head] and "--block" in cmd
    assert TOKEN not in " ".join(cmd), "the token must not be on the command line"


def test_worker_claims_all_gpus_by_default(head, fake_gpus):
    visible, cmd = dry_run_command(entry("worker", **WORKER_ENV, **fake_gpus, RAY_HEAD_ADDRESS=head, ENTRYPOINT_DRY_RUN=1))
    assert visible == "0,1" and cmd[cmd.index("--num-gpus") + 1] == "2"


def test_scaled_workers_split_the_gpus(head, fake_gpus):
    claims = Path(fake_gpus["GPU_CLAIM_DIR"])
    claims.mkdir()
    env = {**WORKER_ENV, **fake_gpus, "RAY_HEAD_ADDRESS": head, "ENTRYPOINT_DRY_RUN": 1, "GPUS_PER_WORKER": 1}
    with open(claims / "gpu-0.lock", "w") as held:  # another replica holds GPU 0
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        visible, cmd = dry_run_command(entry("worker", **env))
        assert visible == "1" and cmd[cmd.index("--num-gpus") + 1] == "1"
        with open(claims / "gpu-1.lock", "w") as also_held:
            fcntl.flock(also_held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            p = entry("worker", **env)
            assert p.returncode != 0 and "run at most 2 ray-worker replicas on this host" in p.stderr, p.stderr
        p = entry("worker", **{**env, "GPUS_PER_WORKER": "all"})
        assert p.returncode != 0 and "only 1 of this host's 2 GPUs are free" in p.stderr, p.stderr


def test_head_command_line(tmp_path):
    # A stand-in MLflow that answers everything with 200.
    import http.server

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def do_POST(self):  # the client's experiments/search
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.do_GET()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = entry("head", **WORKER_ENV, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{server.server_port}", RAY_NUM_CPUS=0,
                  RAY_STORAGE_PATH=tmp_path / "storage", ENTRYPOINT_DRY_RUN=1, PYTHON=Path(sys.executable))
    finally:
        server.shutdown()
    _, cmd = dry_run_command(p)
    assert cmd[:3] == ["ray", "start", "--head"]
    for flag, value in (("--port", "6379"), ("--dashboard-port", "8265"), ("--dashboard-host", "0.0.0.0"),
                        ("--ray-client-server-port", "10001"), ("--num-cpus", "0")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert (tmp_path / "storage").is_dir()
    assert TOKEN not in " ".join(cmd) and PASSWORD not in " ".join(cmd)


def test_init_env_fills_every_secret_and_never_overwrites(tmp_path):
    target = tmp_path / ".env"
    p = subprocess.run([str(ROOT / "docker" / "init-env.sh"), str(target)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in target.read_text().splitlines() if line and not line.startswith("#"))
    for key in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAY_AUTH_TOKEN"):
        assert len(values[key]) == 64
    assert len({values[k] for k in values if k != "MLFLOW_ADMIN_USERNAME"}) == 4
    assert values["MLFLOW_ADMIN_USERNAME"] == "admin"
    before = target.read_text()
    p = subprocess.run([str(ROOT / "docker" / "init-env.sh"), str(target)], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "exists" in p.stderr and target.read_text() == before


def test_sweep_cluster_needs_the_token_and_reads_it_from_the_env_file(tmp_path):
    script = ROOT / "docker" / "sweep-cluster.sh"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    p = subprocess.run([str(script), "report"], env={**base, "ENV_FILE": str(tmp_path / "none")}, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0 and "no RAY_AUTH_TOKEN" in p.stderr
    # A fake `ray` shows what would be submitted, and with which token.
    fake = tmp_path / "ray"
    fake.write_text('#!/bin/sh\necho "token=$RAY_AUTH_TOKEN mode=$RAY_AUTH_MODE"\necho "$@"\n')
    fake.chmod(0o755)
    env_file = tmp_path / "env"
    env_file.write_text(f'# comment\nRAY_AUTH_TOKEN="{TOKEN}"\nRAY_DASHBOARD_PUBLISHED_PORT=18265 # inline\n')
    p = subprocess.run([str(script), "report", "--smoke"], env={**base, "ENV_FILE": str(env_file), "RAY": str(fake)},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    auth, args = p.stdout.splitlines()
    assert auth == f"token={TOKEN} mode=token"
    assert args.startswith("job submit --address http://127.0.0.1:18265 --working-dir . --runtime-env-json ")
    assert '"TUNE_GIT_COMMIT": "' in args and " -- python -m tune sweep " in args
    assert args.endswith(" report --smoke") and "--storage /mnt/ray-storage --set data_dir=/data" in args


@pytest.mark.parametrize("status, found", [(401, True), (200, False), (None, False)])
def test_mlflow_url_recognises_the_stack_by_its_auth(status, found, tmp_path):
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    port = server.server_port
    if status is None:
        server.server_close()  # nothing listens there
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = subprocess.run([str(ROOT / "docker" / "mlflow-url.sh")], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "ENV_FILE": str(tmp_path / "none"), "MLFLOW_PUBLISHED_PORT": str(port),
                                "PYTHON": sys.executable})
    finally:
        if status is not None:
            server.shutdown()
    assert (p.returncode == 0) == found, p.stderr
    assert p.stdout.strip() == (f"http://127.0.0.1:{port}" if found else "")
