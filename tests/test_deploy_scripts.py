"""docker/entrypoint.sh and the host-side scripts, run for real but without the services behind them.

ENTRYPOINT_DRY_RUN=1 makes the entry script print its final command instead of running it; what
comes before (checks, waits, GPU claims) runs as it would in a container.
"""

import configparser
import fcntl
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
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
    # Ray nodes write ~/.mlflow/credentials: a HOME of their own, never the caller's.
    with tempfile.TemporaryDirectory() as home:
        return subprocess.run([str(ENTRY), *args], capture_output=True, text=True, timeout=timeout,
                              env={**base, "WAIT_TIMEOUT": "2", "HOME": home, **{k: str(v) for k, v in env.items()}})


def dry_run_command(p: subprocess.CompletedProcess) -> tuple[str, list[str]]:
    assert p.returncode == 0, p.stderr
    visible, command = p.stdout.strip().splitlines()
    return visible.split("=", 1)[1], shlex.split(command)


MLFLOW_ENV = {"MLFLOW_ADMIN_PASSWORD": PASSWORD, "MLFLOW_CLUSTER_PASSWORD": "c" * 16,
              "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 40, "PGHOST": "127.0.0.1", "PGUSER": "mlflow",
              "PGPASSWORD": "pg-password", "PGDATABASE": "mlflow"}
WORKER_ENV = {"RAY_AUTH_TOKEN": TOKEN, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}


@pytest.mark.parametrize("missing", sorted(MLFLOW_ENV))
def test_mlflow_refuses_to_start_without_each_setting(missing):
    p = entry("mlflow", **{k: v for k, v in MLFLOW_ENV.items() if k != missing})
    assert p.returncode != 0
    assert f"{missing} is not set (nor {missing}_FILE)" in p.stderr and "secrets/" in p.stderr


def test_mlflow_reads_each_secret_from_its_file(tmp_path):
    """Every secret as VAR_FILE, as compose passes them: the checks then run on the files' values."""
    files = {}
    for key, value in MLFLOW_ENV.items():
        if key not in ("PGHOST", "PGUSER", "PGDATABASE"):
            (tmp_path / key).write_text(value + "\n")  # an editor's trailing newline is not part of it
            files[f"{key}_FILE"] = tmp_path / key
    plain = {k: v for k, v in MLFLOW_ENV.items() if k in ("PGHOST", "PGUSER", "PGDATABASE")}
    # all present: past every check, on to PostgreSQL (nothing listens on port 9)
    p = entry("mlflow", **plain, **files, PGPORT=9, PYTHON=Path(sys.executable))
    assert p.returncode != 0 and "cannot connect to PostgreSQL as mlflow@127.0.0.1" in p.stderr, p.stderr
    (tmp_path / "MLFLOW_CLUSTER_PASSWORD").write_text("short")
    p = entry("mlflow", **plain, **files)
    assert p.returncode != 0 and "MLFLOW_CLUSTER_PASSWORD is too short" in p.stderr, p.stderr


@pytest.mark.parametrize("case", ["missing", "a folder", "unreadable", "both", "two lines"])
def test_a_bad_secret_file_is_refused_with_one_line(case, tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + ("\nmore\n" if case == "two lines" else ""))
    env = {**WORKER_ENV, "RAY_HEAD_ADDRESS": "127.0.0.1:9", "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_FILE": secret}
    if case == "missing":
        env["RAY_AUTH_TOKEN_FILE"] = tmp_path / "none"
    elif case == "a folder":
        env["RAY_AUTH_TOKEN_FILE"] = tmp_path
    elif case == "unreadable":
        secret.chmod(0o000)
        if os.access(secret, os.R_OK):
            pytest.skip("root reads any file")
    elif case == "both":
        env["RAY_AUTH_TOKEN"] = TOKEN
    p = entry("worker", **env)
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode != 0 and len(errors) == 1, p.stderr
    want = {"missing": "is not a file readable by uid", "a folder": "is not a file readable by uid",
            "unreadable": "is not a file readable by uid",
            "both": "both RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_FILE are set", "two lines": "must hold one line"}[case]
    assert want in errors[0], p.stderr


def test_mlflow_refuses_the_admin_as_the_cluster_user():
    p = entry("mlflow", **MLFLOW_ENV, MLFLOW_ADMIN_USERNAME="ops", MLFLOW_CLUSTER_USERNAME="ops")
    assert p.returncode != 0 and "MLFLOW_CLUSTER_USERNAME must differ from MLFLOW_ADMIN_USERNAME" in p.stderr


def test_ray_nodes_hand_secrets_to_ray_as_files_not_environment(head, tmp_path):
    """A stand-in `ray` shows the environment `ray start` gets: the token as Ray's own token path,
    the MLflow password in ~/.mlflow/credentials (mode 600), neither in the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    fake.write_text('#!/bin/sh\nenv | grep -E "^(RAY_AUTH|MLFLOW_TRACKING)" | sort\n')
    fake.chmod(0o755)
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text(TOKEN + "\n")
    password.write_text("p%ss-" + PASSWORD)  # configparser interpolates %: the file must say %%
    home = tmp_path / "home"
    p = entry("worker", RAY_AUTH_TOKEN_PATH=token, MLFLOW_TRACKING_USERNAME="cluster", MLFLOW_TRACKING_PASSWORD_FILE=password,
              RAY_HEAD_ADDRESS=head, HOME=home, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RAY_NUM_GPUS=0)
    assert p.returncode == 0, p.stderr
    env = dict(line.split("=", 1) for line in p.stdout.splitlines())
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "MLFLOW_TRACKING_USERNAME": "cluster",
                   "MLFLOW_TRACKING_PASSWORD_FILE": str(password)}
    creds = home / ".mlflow" / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    # read back the way MLflow's client reads it
    config = configparser.ConfigParser()
    config.read(creds)
    assert config["mlflow"]["mlflow_tracking_password"] == "p%ss-" + PASSWORD
    assert config["mlflow"]["mlflow_tracking_username"] == "cluster"


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


SECRET_NAMES = {"postgres_password", "mlflow_db_password", "mlflow_admin_password", "mlflow_cluster_password",
                "mlflow_flask_secret_key", "ray_auth_token"}


def fake_docker(tmp_path, volume_exists: bool | None) -> Path:
    """A `docker` whose daemon answers (volume_exists True or False) or does not (None)."""
    fake = tmp_path / "docker"
    daemon = "exit 1" if volume_exists is None else "exit 0"
    volume = "exit 0" if volume_exists else "exit 1"
    fake.write_text(f'#!/bin/sh\ncase "$1" in info) {daemon} ;; volume) {volume} ;; esac\nexit 2\n')
    fake.chmod(0o755)
    return fake


def init_env(tmp_path, docker: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "docker" / "init-env.sh"), str(target)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SECRETS_DIR": str(tmp_path / "secrets"), "DOCKER": str(docker)})


def test_init_env_writes_each_secret_as_a_file_and_never_overwrites(tmp_path):
    target = tmp_path / ".env"
    p = init_env(tmp_path, fake_docker(tmp_path, volume_exists=False), target)
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == (ROOT / ".env.example").read_text()  # settings only: the secrets are files
    secrets_dir = tmp_path / "secrets"
    assert {f.name for f in secrets_dir.iterdir()} == SECRET_NAMES
    values = {f.read_text() for f in secrets_dir.iterdir()}
    assert len(values) == 6 and all(len(v) == 64 and int(v, 16) >= 0 for v in values)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in secrets_dir.iterdir())
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    before = target.read_text()
    p = init_env(tmp_path, fake_docker(tmp_path, volume_exists=False), target)
    assert p.returncode != 0 and "exists" in p.stderr and target.read_text() == before
    # a secret file that exists is kept; only the missing ones are written
    target.unlink()
    kept = (secrets_dir / "ray_auth_token").read_text()
    (secrets_dir / "mlflow_admin_password").unlink()
    p = init_env(tmp_path, fake_docker(tmp_path, volume_exists=False), target)
    assert p.returncode == 0 and "1 new secret files" in p.stderr, p.stderr
    assert (secrets_dir / "ray_auth_token").read_text() == kept


def test_init_env_refuses_new_postgres_secrets_beside_an_existing_volume(tmp_path):
    target = tmp_path / ".env"
    p = init_env(tmp_path, fake_docker(tmp_path, volume_exists=True), target)
    assert p.returncode != 0 and "the PostgreSQL volume tune-study_postgres-data exists" in p.stderr, p.stderr
    assert not target.exists() and not (tmp_path / "secrets").exists()
    # no daemon to ask: it goes on, and says loudly what it could not check
    p = init_env(tmp_path, fake_docker(tmp_path, volume_exists=None), target)
    assert p.returncode == 0 and "WARNING: no Docker daemon answered" in p.stderr, p.stderr


def test_worker_env_takes_only_what_a_worker_needs(tmp_path):
    head_env = tmp_path / "head.env"
    head_env.write_text("MLFLOW_ADMIN_USERNAME=ops\nMLFLOW_CLUSTER_USERNAME=trials\nCLUSTER_HEAD_IP=10.0.0.1\n"
                        "CLUSTER_NODE_IP=10.0.0.1\nCLUSTER_STORAGE_DIR=/nfs/ray\nRAY_SHM_SIZE=16gb\nPOSTGRES_MEM_LIMIT=8g\n")
    target = tmp_path / ".env.worker"
    script = ROOT / "docker" / "worker-env.sh"
    p = subprocess.run([str(script), str(target)], env={**os.environ, "ENV_FILE": str(head_env)}, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    values = dict(line.split("=", 1) for line in target.read_text().splitlines() if line and not line.startswith("#"))
    assert values == {"MLFLOW_CLUSTER_USERNAME": "trials", "CLUSTER_HEAD_IP": "10.0.0.1", "CLUSTER_NODE_IP": "",
                      "CLUSTER_STORAGE_DIR": "/nfs/ray", "RAY_SHM_SIZE": "16gb"}
    assert "ops" not in target.read_text() and "POSTGRES" not in target.read_text()
    p = subprocess.run([str(script), str(target)], env={**os.environ, "ENV_FILE": str(head_env)}, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0 and "exists" in p.stderr


@pytest.fixture
def pin_checkout(tmp_path):
    """A copy of the files `make pin-images` rewrites, with the script beside them."""
    docker = tmp_path / "checkout" / "docker"
    docker.mkdir(parents=True)
    for path in [*(ROOT / "docker").glob("Dockerfile*"), ROOT / "docker" / "compose.yaml", ROOT / "docker" / "pin-images.sh"]:
        shutil.copy2(path, docker / path.name)
    return docker


def pin(docker_dir: Path, docker: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(docker_dir / "pin-images.sh")], env={**os.environ, "DOCKER": docker}, capture_output=True,
                          text=True, timeout=60)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("answer", ["no docker", "lookup fails", "no digest"])
def test_pin_images_never_writes_a_digest_it_did_not_resolve(answer, pin_checkout, tmp_path):
    before = snapshot(pin_checkout)
    docker = str(tmp_path / "nonexistent")
    if answer != "no docker":
        fake = tmp_path / "docker"
        # resolves the first images it is asked for, then fails (or answers without a digest) for python's
        fail = 'echo "ERROR: not found" >&2; exit 1' if answer == "lookup fails" else 'echo "Name: $4"; exit 0'
        fake.write_text(f'#!/bin/sh\ncase "$4" in python:*) {fail} ;; esac\necho "Digest: sha256:{"ab" * 32}"\n')
        fake.chmod(0o755)
        docker = str(fake)
    p = pin(pin_checkout, docker)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "pin-images: error:" in p.stderr, p.stderr
    assert snapshot(pin_checkout) == before


def test_pin_images_writes_each_resolved_digest(pin_checkout, tmp_path):
    fake = tmp_path / "docker"
    # a digest per tag, so a digest written to the wrong image shows
    fake.write_text('#!/bin/sh\necho "Name: $4"\necho "Digest: sha256:$(printf %s "$4" | sha256sum | cut -c1-64)"\n')
    fake.chmod(0o755)
    p = pin(pin_checkout, str(fake))
    assert p.returncode == 0, p.stderr
    import hashlib

    def pinned(ref):
        return f"{ref}@sha256:{hashlib.sha256(ref.encode()).hexdigest()}"

    compose = (pin_checkout / "compose.yaml").read_text()
    assert f"image: {pinned('postgres:15.18-bookworm')}\n" in compose
    assert "image: tune-study-ray:0.1.0\n" in compose  # built here: nothing to pin
    assert f"FROM {pinned('python:3.11.14-slim-bookworm')}\n" in (pin_checkout / "Dockerfile.mlflow").read_text()
    assert f"FROM {pinned('rayproject/ray:2.60.0-py311-gpu')}\n" in (pin_checkout / "Dockerfile").read_text()
    # run again on pinned files: the same digests, not a second @sha256
    again = snapshot(pin_checkout)
    assert pin(pin_checkout, str(fake)).returncode == 0 and snapshot(pin_checkout) == again


@pytest.mark.parametrize("case, needle", [
    ("no file", "MLFLOW_DB_PASSWORD_FILE is not set"),
    ("short", "too short"),
    ("superuser", "MLFLOW_DB_USER must differ from POSTGRES_USER"),
    ("bad name", "lowercase letters, digits and _ only"),
])
def test_postgres_init_refuses_bad_input_before_touching_the_server(case, needle, tmp_path):
    password = tmp_path / "pw"
    password.write_text("short" if case == "short" else "x" * 32)
    env = {**os.environ, "POSTGRES_USER": "postgres", "POSTGRES_DB": "mlflow", "MLFLOW_DB_USER": "mlflow",
           "MLFLOW_DB_PASSWORD_FILE": str(password), "PATH": "/nonexistent"}  # psql unreachable: it must stop before
    if case == "no file":
        del env["MLFLOW_DB_PASSWORD_FILE"]
    elif case == "superuser":
        env["MLFLOW_DB_USER"] = "postgres"
    elif case == "bad name":
        env["MLFLOW_DB_USER"] = "ml'flow"
    p = subprocess.run([shutil.which("bash"), str(ROOT / "docker" / "postgres-init.sh")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0 and needle in p.stderr and p.stderr.count("error:") == 1, p.stderr


def test_sweep_cluster_needs_the_token_and_reads_it_from_the_secret_file(tmp_path):
    script = ROOT / "docker" / "sweep-cluster.sh"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    p = subprocess.run([str(script), "report"], env={**base, "ENV_FILE": str(tmp_path / "none"),
                                                     "SECRETS_DIR": str(tmp_path / "none")},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "no RAY_AUTH_TOKEN" in p.stderr and "token file" in p.stderr
    # A fake `ray` shows what would be submitted, and with which token.
    fake = tmp_path / "ray"
    fake.write_text('#!/bin/sh\necho "token=$RAY_AUTH_TOKEN path=$RAY_AUTH_TOKEN_PATH mode=$RAY_AUTH_MODE"\necho "$@"\n')
    fake.chmod(0o755)
    env_file = tmp_path / "env"
    env_file.write_text('# comment\nRAY_DASHBOARD_PUBLISHED_PORT=18265 # inline\n')
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ray_auth_token").write_text(TOKEN)
    p = subprocess.run([str(script), "report", "--smoke"], env={**base, "ENV_FILE": str(env_file), "RAY": str(fake),
                                                                "SECRETS_DIR": str(tmp_path / "secrets")},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    auth, args = p.stdout.splitlines()
    assert auth == f"token= path={tmp_path / 'secrets' / 'ray_auth_token'} mode=token"
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
