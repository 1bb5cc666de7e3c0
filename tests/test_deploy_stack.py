"""The stack of docker/compose.yaml on this machine, without Docker, through the real entry scripts.

PostgreSQL 15 (Debian's server binaries, with MLflow's role made by docker/postgres-init.sh), MLflow
with basic auth on it, a Ray head and one worker with token auth, all started by docker/entrypoint.sh
with every secret given as a file (the *_FILE variables, as compose's secrets are); then a smoke sweep
submitted with docker/sweep-cluster.sh (`ray job submit`), and its runs read back through MLflow's REST API.
Everything listens on 127.0.0.1 on free ports, and everything started is stopped, even on failure:
each process carries a marker in its environment, and teardown ends every process that has it.
"""

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them

ENTRY = ROOT / "docker" / "entrypoint.sh"
SWEEP = ROOT / "docker" / "sweep-cluster.sh"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
MARKER_VAR = "TUNE_STACK_TEST"
ADMIN = "admin"
CLUSTER = "cluster"  # the non-admin MLflow user the Ray nodes log runs as


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(size: int, taken: set[int]) -> int:
    """First port of `size` consecutive free ports, away from Ray's default worker range (10002-19999)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(30000, 40000 - size)
        ports = range(base, base + size)
        if taken.isdisjoint(ports) and all(_is_free(p) for p in ports):
            taken.update(ports)
            return base
    raise RuntimeError(f"no {size} consecutive free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def http(method: str, url: str, auth: tuple[str, str] | None = None, token: str | None = None, body=None, raw=None,
         host: str | None = None):
    """(status, body text) of one request; HTTP errors are answers, not exceptions. `host` sets the Host header
    (the request still goes to the URL's address)."""
    headers = {"Host": host} if host else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


class Services:
    """The processes of the stack: each in its own session, logging to a file, found again by marker."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, **values) -> dict:
        # The caller's Ray, MLflow and libpq settings must not leak into the stack.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PG"))}
        env.update(PATH=f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}", PYTHON=PYTHON)
        env[MARKER_VAR] = self.marker
        env.update({k: str(v) for k, v in values.items()})
        return env

    def start(self, name: str, args: list, env: dict) -> None:
        with open(self.log_path(name), "wb") as log:
            self.procs[name] = subprocess.Popen([str(a) for a in args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def tails(self) -> str:
        return "\n".join(self.tail(n) for n in self.procs)

    def wait_until(self, name: str, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) before {what}\n{self.tail(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout:.0f}s\n{self.tails()}")
            time.sleep(1)

    def marked_pids(self) -> list[int]:
        needle = f"{MARKER_VAR}={self.marker}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass  # gone, or not ours to read
        return pids

    def stop_started(self, grace: float = 10) -> None:
        """The services started here: SIGTERM to each one's process group, SIGKILL after `grace` seconds.
        (`ray start --block` can take half a minute to shut down politely; a test's cluster need not.)"""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    def stop_marked(self) -> None:
        """Whatever still carries the marker (Ray workers, job drivers, MLflow's server workers): terminated, then killed."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            pids = self.marked_pids()
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.5)
                pids = self.marked_pids()
            if not pids:
                return


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session: the process group is the service's own
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Postgres:
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1, run by the postgres user when we are root. As the postgres
    image sets it up: a superuser (`postgres`, its own password), the database, then docker/postgres-init.sh,
    which gives MLflow a role of its own (`mlflow`, not a superuser) owning that database."""

    def __init__(self, services: Services, port: int, password: str, superuser_password: str):
        self.services, self.port, self.password = services, port, password
        self.superuser_password = superuser_password
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="tsq-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args, timeout=120):
        p = subprocess.run([*self.as_postgres, *map(str, args)], env=self.services.env(), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            pytest.fail(f"{Path(str(args[0])).name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def start(self, mlflow_password_file: Path) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        if self.as_postgres:
            for path in (self.dir, pwfile):
                shutil.chown(path, "postgres", "postgres")
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--pwfile", pwfile, "--auth", "scram-sha-256",
                  "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
        pwfile.unlink()
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-w", "-t", "60",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}", "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.superuser_password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")  # the image's POSTGRES_DB
        conn.close()
        # The init script the image runs from /docker-entrypoint-initdb.d, with compose's settings.
        p = subprocess.run([str(ROOT / "docker" / "postgres-init.sh")], capture_output=True, text=True, timeout=60,
                           env=self.services.env(PGHOST="127.0.0.1", PGPORT=self.port, PGPASSWORD=self.superuser_password,
                                                 POSTGRES_USER="postgres", POSTGRES_DB="mlflow", MLFLOW_DB_USER="mlflow",
                                                 MLFLOW_DB_PASSWORD_FILE=mlflow_password_file,
                                                 PATH=f"{PG_BIN}{os.pathsep}{os.environ['PATH']}"))
        if p.returncode != 0:
            pytest.fail(f"docker/postgres-init.sh failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not (PG_BIN / "initdb").is_file():
        pytest.fail(f"PostgreSQL 15 server binaries are missing from {PG_BIN}: install Debian's postgresql package "
                    f"(.ci/run does: apt-get install -y postgresql), or set PG_BIN to another bin folder")
    work = tmp_path_factory.mktemp("stack")
    services = Services(work)
    taken: set[int] = set()
    (pg_port, mlflow_port, gcs, dashboard, client, *node_ports) = ports = free_ports(17)
    taken.update(ports)
    # MLflow's role's password holds what pgpass escapes (: and a backslash) and what SQL quotes ('), on purpose.
    pg = Postgres(services, pg_port, secrets.token_urlsafe(18) + ":\\'x", secrets.token_urlsafe(18))
    # Ray's socket paths must stay short: /tmp/rs-XXXXXXXX, not under pytest's tmp. One per node, as
    # on separate machines: a node deletes the job packages it no longer needs from its temp dir.
    ray_tmps = [Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp")) for _ in range(2)]
    s = {
        "token": secrets.token_hex(32),
        # A % on purpose: the auth config and the credentials file are ini files that interpolate it.
        "password": secrets.token_urlsafe(18) + "%x",
        "cluster_password": "%c" + secrets.token_urlsafe(18),
        "flask_key": secrets.token_hex(32),
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
        "jobs": f"http://127.0.0.1:{dashboard}",
        "dashboard_port": dashboard,
        "mlflow_data": work / "mlflow",
        "auth_config": work / "auth" / "basic_auth.ini",
        "storage": work / "ray-storage",
        "pg": pg,
        "services": services,
    }
    # Every secret as a file, as compose's secrets are (mounted under /run/secrets); a trailing newline, as an
    # editor leaves one.
    secret_dir = work / "secrets"
    secret_dir.mkdir(mode=0o700)
    files = {}
    for name, value in (("mlflow_db_password", pg.password), ("mlflow_admin_password", s["password"]),
                        ("mlflow_cluster_password", s["cluster_password"]), ("mlflow_flask_secret_key", s["flask_key"]),
                        ("ray_auth_token", s["token"])):
        files[name] = secret_dir / name
        files[name].write_text(value + "\n")
        files[name].chmod(0o600)
    s["secret_files"] = files
    mlflow_creds = {"MLFLOW_TRACKING_USERNAME": CLUSTER, "MLFLOW_TRACKING_PASSWORD_FILE": files["mlflow_cluster_password"]}

    def node(prefix: list[int], temp_dir: Path) -> dict:
        names = ("RAY_NODE_MANAGER_PORT", "RAY_OBJECT_MANAGER_PORT", "RAY_DASHBOARD_AGENT_LISTEN_PORT",
                 "RAY_DASHBOARD_AGENT_GRPC_PORT", "RAY_METRICS_EXPORT_PORT", "RAY_RUNTIME_ENV_AGENT_PORT")
        first = free_range(40, taken)
        return {**dict(zip(names, prefix)), "RAY_MIN_WORKER_PORT": first, "RAY_MAX_WORKER_PORT": first + 39,
                "RAY_TEMP_DIR": temp_dir, "RAY_OBJECT_STORE_MEMORY": 200 * 2**20,
                # Ray's own token path, as compose sets it; ~/.mlflow/credentials goes into the node's own HOME
                "RAY_AUTH_TOKEN_PATH": files["ray_auth_token"], "HOME": temp_dir / "home", "WAIT_TIMEOUT": 90,
                **mlflow_creds}

    try:
        pg.start(files["mlflow_db_password"])
        services.start("mlflow", [ENTRY, "mlflow"], services.env(
            PGHOST="127.0.0.1", PGPORT=pg_port, PGUSER="mlflow", PGPASSWORD_FILE=files["mlflow_db_password"],
            PGDATABASE="mlflow", MLFLOW_ADMIN_USERNAME=ADMIN, MLFLOW_ADMIN_PASSWORD_FILE=files["mlflow_admin_password"],
            MLFLOW_CLUSTER_USERNAME=CLUSTER, MLFLOW_CLUSTER_PASSWORD_FILE=files["mlflow_cluster_password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=files["mlflow_flask_secret_key"], MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=mlflow_port,
            MLFLOW_DATA_DIR=s["mlflow_data"], MLFLOW_AUTH_CONFIG_PATH=s["auth_config"],
            MLFLOW_WORKERS=2, WAIT_TIMEOUT=60, CLUSTER_HEAD_IP=TAILSCALE_HEAD))
        # The head waits for MLflow itself: starting it now overlaps the two startups.
        services.start("ray-head", [ENTRY, "head"], services.env(
            **node(node_ports[:6], ray_tmps[0]), RAY_GCS_PORT=gcs, RAY_DASHBOARD_HOST="127.0.0.1", RAY_DASHBOARD_PORT=dashboard,
            RAY_CLIENT_PORT=client, RAY_NUM_CPUS=0, RAY_NUM_GPUS=0, RAY_STORAGE_PATH=s["storage"],
            MLFLOW_TRACKING_URI=s["mlflow"]))
        services.start("ray-worker", [ENTRY, "worker"], services.env(
            **node(node_ports[6:12], ray_tmps[1]), RAY_HEAD_ADDRESS=f"127.0.0.1:{gcs}", RAY_NUM_CPUS=2,
            GPU_CLAIM_DIR=work / "gpu-claims"))
        services.wait_until("mlflow", "MLflow answers /health", lambda: http("GET", s["mlflow"] + "/health")[0] == 200, 120)
        head_health = services.env(RAY_DASHBOARD_PORT=dashboard)
        services.wait_until("ray-head", "the head's healthcheck passes", lambda: subprocess.run(
            [ENTRY, "healthcheck", "head"], env=head_health, capture_output=True).returncode == 0, 120)
        services.wait_until("ray-worker", "the worker joins the head",
                            lambda: alive_nodes(s["jobs"], s["token"]) == 2, 120)
        yield s
    finally:
        services.stop_started()
        pg.stop()
        services.stop_marked()
        for path in ray_tmps:
            shutil.rmtree(path, ignore_errors=True)


TAILSCALE_HEAD = "100.101.102.103"  # a head's address on a Tailscale network: outside the private ranges


def test_mlflow_answers_the_head_address_and_refuses_other_hosts_with_its_own_message(stack):
    """Trials on other hosts send the head's address as Host; the request itself goes to loopback only."""
    s = stack
    url = s["mlflow"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    port = s["mlflow"].rsplit(":", 1)[1]
    status, _ = http("GET", url, host=f"{TAILSCALE_HEAD}:{port}")
    assert status == 401  # past the Host check, at the login
    assert http("GET", url, host=f"{TAILSCALE_HEAD}:{port}", auth=(ADMIN, s["password"]))[0] == 200
    status, text = http("GET", url, host=f"100.64.0.9:{port}")
    assert status == 403 and "Invalid Host header" in text  # not a 401: nothing about passwords


def alive_nodes(jobs: str, token: str) -> int:
    status, text = http("GET", jobs + "/api/v0/nodes?limit=100", token=token)
    if status != 200:
        return -1
    nodes = json.loads(text)["data"]["result"]["result"]
    return sum(n.get("state") == "ALIVE" for n in nodes)


def test_mlflows_database_belongs_to_a_role_that_is_not_a_superuser(stack):
    """docker/postgres-init.sh's role owns the database and MLflow's tables, and has no superuser rights."""
    import psycopg2

    s = stack
    # MLflow is up on it (the fixture waited for /health), so its tables are there, made by that role.
    conn = psycopg2.connect(host="127.0.0.1", port=s["pg"].port, user="mlflow", password=s["pg"].password, dbname="mlflow")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb FROM pg_database d "
                    "JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = 'mlflow'")
        assert cur.fetchone() == ("mlflow", False, False, False)
        cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'experiments'")
        assert cur.fetchone() == ("mlflow",)
        # and it cannot act as the superuser
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CREATE ROLE intruder SUPERUSER")
    conn.close()
    # The superuser is a different role, with its own password, which MLflow was never given.
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=s["pg"].port, user="postgres", password=s["pg"].password, dbname="mlflow")


def test_the_cluster_user_logs_runs_but_administers_nothing(stack):
    """The Ray nodes' MLflow user: creates experiments and logs runs into them; creating users, making itself
    an admin or changing another user's permissions is refused (403), while the admin may."""
    s = stack
    api, admin, cluster = s["mlflow"] + "/api/2.0/mlflow", (ADMIN, s["password"]), (CLUSTER, s["cluster_password"])
    status, text = http("POST", api + "/experiments/create", auth=cluster, body={"name": "cluster-own"})
    assert status == 200, text
    exp_id = json.loads(text)["experiment_id"]
    status, text = http("POST", api + "/runs/create", auth=cluster, body={"experiment_id": exp_id, "start_time": 0})
    assert status == 200, text
    run_id = json.loads(text)["run"]["info"]["run_id"]
    status, text = http("POST", api + "/runs/log-metric", auth=cluster,
                        body={"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 0, "step": 0})
    assert status == 200, text

    # an experiment of the admin's: no permission by default (NO_PERMISSIONS)
    status, text = http("POST", api + "/experiments/create", auth=admin, body={"name": "admin-only"})
    assert status == 200, text
    admin_exp = json.loads(text)["experiment_id"]
    assert http("GET", api + f"/experiments/get?experiment_id={admin_exp}", auth=cluster)[0] == 403

    # users: the admin creates one, the cluster user may not; nor make itself an admin
    user = {"username": "alice", "password": secrets.token_urlsafe(18)}
    assert http("POST", api + "/users/create", auth=cluster, body={"username": "mallory", "password": "x" * 16})[0] == 403
    status, text = http("POST", api + "/users/create", auth=admin, body=user)
    assert status == 200, text
    assert http("PATCH", api + "/users/update-admin", auth=cluster, body={"username": CLUSTER, "is_admin": True})[0] == 403

    # another user's permission on an experiment the cluster user does not manage: refused, the admin may
    grant = s["mlflow"] + "/api/3.0/mlflow/users/permissions/grant"
    body = {"username": "alice", "resource_type": "experiment", "resource_id": admin_exp, "permission": "READ"}
    assert http("POST", grant, auth=cluster, body=body)[0] == 403
    assert http("POST", grant, auth=cluster, body={**body, "username": CLUSTER, "permission": "MANAGE"})[0] == 403
    status, text = http("POST", grant, auth=admin, body=body)
    assert status == 200, text
    # and the cluster user is no admin in MLflow's own record either
    status, text = http("GET", api + f"/users/get?username={CLUSTER}", auth=admin)
    assert status == 200 and json.loads(text)["user"]["is_admin"] is False, text


def test_a_sweep_submitted_to_the_stack_lands_in_mlflow_behind_auth(stack):
    s, services = stack, stack["services"]
    auth = (ADMIN, s["password"])

    # Token auth: the Jobs API refuses a request without the token, and one with a wrong token.
    assert http("GET", s["jobs"] + "/api/jobs/")[0] == 401
    assert http("GET", s["jobs"] + "/api/jobs/", token="0" * 64)[0] == 403
    assert http("GET", s["jobs"] + "/api/jobs/", token=s["token"])[0] == 200

    submit = subprocess.run(
        [SWEEP, "dropout-mlp", "--smoke", "--data", "synthetic", "--grid", "dropout=0.2,0.6", "--set", "epochs=2",
         "--set", "hidden=64", "--scheduler", "fifo"],
        env=services.env(RAY_AUTH_TOKEN=s["token"], RAY_DASHBOARD_PUBLISHED_PORT=s["dashboard_port"],
                         ENV_FILE="/nonexistent", CLUSTER_STORAGE_PATH=s["storage"],
                         CLUSTER_DATA_DIR=s["storage"] / "data"),
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, f"{out[-4000:]}\n{services.tails()}"
    assert "2 trials of dropout-mlp" in out, out[-4000:]
    assert any(p.is_dir() for p in s["storage"].glob("dropout-mlp-*")), "no sweep folder in Ray's storage path"

    # The runs, read back through the REST API with credentials.
    status, text = http("GET", s["mlflow"] + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=dropout-mlp",
                        auth=auth)
    assert status == 200, text
    exp_id = json.loads(text)["experiment"]["experiment_id"]
    # The sweep driver made the experiment as the cluster user (the nodes have no other credentials): it manages it.
    status, text = http("GET", s["mlflow"] + "/api/3.0/mlflow/users/permissions/get?username=" + CLUSTER
                        + f"&resource_type=experiment&resource_id={exp_id}", auth=auth)
    assert status == 200 and json.loads(text)["permission"] == "MANAGE", text
    search = {"experiment_ids": [exp_id], "max_results": 100}
    status, text = http("POST", s["mlflow"] + "/api/2.0/mlflow/runs/search", auth=auth, body=search)
    assert status == 200, text
    every = json.loads(text)["runs"]
    [parent] = [r for r in every if _kv(r["data"]["tags"]).get("run_kind") == "sweep"]
    runs = [r for r in every if "trial_id" in _kv(r["data"]["tags"])]
    assert len(runs) == 2 and len(every) == 3
    assert sorted(float(_kv(r["data"]["params"])["dropout"]) for r in runs) == [0.2, 0.6]
    for r in runs:
        assert r["info"]["status"] == "FINISHED"
        tags = _kv(r["data"]["tags"])
        assert tags["stopped_by"] == "completed" and tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        # the job ran an uploaded copy without .git; the submitter passed the commit on
        assert tags["mlflow.source.git.commit"].split("-")[0] == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert {"val_loss", "best_val_loss", "test_acc"} <= set(_kv(r["data"]["metrics"]))
        # the best weights went through the server's artifact proxy
        status, text = http("GET", f"{s['mlflow']}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}&path=model",
                            auth=auth)
        assert status == 200 and [f["path"] for f in json.loads(text)["files"]] == ["model/weights.pt"], text

    # The same request without credentials, or with a wrong password, is refused.
    assert http("POST", s["mlflow"] + "/api/2.0/mlflow/runs/search", body=search)[0] == 401
    assert http("POST", s["mlflow"] + "/api/2.0/mlflow/runs/search", auth=(ADMIN, "wrong-password-0"), body=search)[0] == 401

    # Artifacts go through the server (--serve-artifacts) onto its artifact folder, behind the same auth.
    run_id = runs[0]["info"]["run_id"]
    url = f"{s['mlflow']}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/check.txt"
    assert http("PUT", url, raw=b"no")[0] == 401
    status, text = http("PUT", url, auth=auth, raw=b"proxied")
    assert status == 200, text
    stored = list((s["mlflow_data"] / "artifacts").rglob("check.txt"))
    assert [p.read_text() for p in stored] == ["proxied"]

    # Users live in their own SQLite database on MLflow's volume, not among the runs in PostgreSQL.
    assert (s["mlflow_data"] / "auth" / "basic_auth.db").is_file()
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=s["pg"].port, user="mlflow", password=s["pg"].password, dbname="mlflow")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.runs'), to_regclass('public.users')")
        assert cur.fetchone() == ("runs", None)
    conn.close()
    # The config the entry script wrote holds the admin password: readable by its owner only.
    assert (s["auth_config"].stat().st_mode & 0o777) == 0o600

    # README's password rotation: MLflow's API first (then .env), the old password stops working.
    new = secrets.token_urlsafe(18)
    status, text = http("PATCH", s["mlflow"] + "/api/2.0/mlflow/users/update-password", auth=auth,
                        body={"username": ADMIN, "password": new, "current_password": s["password"]})
    assert status == 200, text
    assert http("POST", s["mlflow"] + "/api/2.0/mlflow/runs/search", auth=(ADMIN, new), body=search)[0] == 200
    assert http("POST", s["mlflow"] + "/api/2.0/mlflow/runs/search", auth=auth, body=search)[0] == 401


def test_no_secret_is_on_any_command_line_or_in_any_environment(stack):
    """Command lines are world-readable (ps), and an environment is inherited by every child: the secrets went
    into files (pgpass, auth config, credentials, Ray's token path). The one exception is the Flask key, which
    MLflow reads only from its environment: in the MLflow server's processes, and no other."""
    s, services = stack, stack["services"]
    secret_values = [s["token"], s["password"], s["cluster_password"], s["pg"].password, s["pg"].superuser_password]
    mlflow_tree = descendants(services.procs["mlflow"].pid)
    seen_key = False
    for pid in services.marked_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for value in [*secret_values, s["flask_key"]]:
            assert value not in cmdline, f"a secret is on the command line of pid {pid}: {cmdline[:200]}"
        for value in secret_values:
            assert value not in environ, f"a secret is in the environment of pid {pid}: {cmdline[:200]}"
        if s["flask_key"] in environ:
            assert pid in mlflow_tree, f"the Flask key is in the environment of pid {pid}: {cmdline[:200]}"
            seen_key = True
    assert seen_key, "the MLflow server has no Flask key in its environment: where did it read it from?"


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _kv(items: list[dict]) -> dict:
    return {i["key"]: i["value"] for i in items}
