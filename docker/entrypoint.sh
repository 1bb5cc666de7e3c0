#!/usr/bin/env bash
# The one entry point of the stack: `entrypoint.sh mlflow|head|worker`, plus `healthcheck mlflow|head`
# for compose and `requires MODE` for the static tests.
#
# Everything comes from the environment, so this same script runs in the containers and in
# tests/test_deploy_stack.py, which starts the stack without Docker. It waits for what a service
# needs, and it stops with one clear line when a secret or a service is missing: no default
# password or token exists anywhere, and none is ever put on a command line (`ps` shows those).
#
# Secrets come as files (compose's `secrets:`, mounted under /run/secrets): for each required VAR,
# VAR_FILE names the file holding its value. The value then goes only where it is used: a pgpass
# file, MLflow's auth config and credentials file, Ray's token path, or the environment of the one
# process that reads nothing else (the MLflow server's Flask key); never into every child's environment.
set -euo pipefail

MODE=${1:-}
PYTHON=${PYTHON:-python3}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-120}

# What each mode refuses to start without. `entrypoint.sh requires MODE` prints the list, so the
# static tests check it against compose.yaml and .env.example instead of a copy of it.
declare -A REQUIRED=(
    # MLFLOW_CLUSTER_PASSWORD: the non-admin user the Ray nodes log runs as, created or updated here.
    [mlflow]="MLFLOW_ADMIN_PASSWORD MLFLOW_CLUSTER_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY PGHOST PGUSER PGPASSWORD PGDATABASE"
    [head]="RAY_AUTH_TOKEN MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD"
    # Trials log to MLflow from the workers: they need the credentials; the URI comes with each trial.
    [worker]="RAY_AUTH_TOKEN RAY_HEAD_ADDRESS MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD"
)

log() { printf 'entrypoint %s: %s\n' "$MODE" "$*" >&2; }
die() {
    printf 'entrypoint %s: error: %s\n' "$MODE" "$*" >&2
    exit 1
}

# Where each secret was read from (load_secret_file): VAR -> its file.
declare -A SECRET_FILE=()

# load_secret_file VAR: VAR's value from the file VAR_FILE names (RAY_AUTH_TOKEN: also Ray's own
# RAY_AUTH_TOKEN_PATH), as a shell variable that no child sees unless a mode exports it.
load_secret_file() {
    local name=$1 file_var=${1}_FILE file value
    if [ "$name" = RAY_AUTH_TOKEN ] && [ -z "${RAY_AUTH_TOKEN_FILE:-}" ]; then file_var=RAY_AUTH_TOKEN_PATH; fi
    file=${!file_var:-}
    [ -n "$file" ] || return 0
    if [ -n "${!name:-}" ]; then
        die "both $name and $file_var are set; set only one"
    fi
    if [ ! -f "$file" ] || [ ! -r "$file" ]; then
        die "$file_var=$file is not a file readable by uid $(id -u); check the secret file and its permissions (README, \"Secrets\")"
    fi
    value=$(<"$file") # without the trailing newline an editor adds
    case $value in
        *$'\n'* | *$'\r'*) die "$file_var=$file must hold one line" ;;
    esac
    printf -v "$name" '%s' "$value"
    # shellcheck disable=SC2163 # un-exports the variable that $name names
    export -n "$name"
    SECRET_FILE[$name]=$file
}

load_secret_files() {
    local name
    for name in ${REQUIRED[$1]}; do
        load_secret_file "$name"
    done
}

# require VAR [MIN_LENGTH]: short secrets are refused here, before a service half-starts.
require() {
    local name=$1 min=${2:-1} value
    value=${!name:-}
    if [ -z "$value" ]; then
        die "$name is not set (nor ${name}_FILE); make env writes the secrets to secrets/ (see .env.example)"
    fi
    if [ "${#value}" -lt "$min" ]; then
        die "$name is too short (${#value} characters, at least $min); generate one with: openssl rand -hex 32"
    fi
}

require_all() {
    local name
    load_secret_files "$1"
    for name in ${REQUIRED[$1]}; do
        require "$name"
    done
}

# Tests set ENTRYPOINT_DRY_RUN=1 to see the final command (and the GPUs claimed) without running it.
run() {
    if [ -n "${ENTRYPOINT_DRY_RUN:-}" ]; then
        printf 'CUDA_VISIBLE_DEVICES=%s\n' "${CUDA_VISIBLE_DEVICES-<unset>}"
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}

wait_for_tcp() {
    local host=$1 port=$2 what=$3 deadline=$((SECONDS + WAIT_TIMEOUT))
    log "waiting for $what at $host:$port"
    # bash's /dev/tcp needs neither nc nor python: the script runs in the slim MLflow image too.
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
    until timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$what at $host:$port did not accept connections within ${WAIT_TIMEOUT}s; is it running, and is the address right?"
        fi
        sleep 1
    done
}

wait_for_postgres() {
    log "waiting for PostgreSQL at ${PGHOST}:${PGPORT}"
    # A psycopg2 connect, not pg_isready: the MLflow image has no PostgreSQL client, and a real
    # login also proves the password. A refused password or a missing database fails at once.
    "$PYTHON" - <<'EOF' || die "PostgreSQL is not usable (see above)"
import os, sys, time
import psycopg2

deadline = time.monotonic() + float(os.environ.get("WAIT_TIMEOUT", "120"))
where = f"{os.environ['PGUSER']}@{os.environ['PGHOST']}:{os.environ['PGPORT']}/{os.environ['PGDATABASE']}"
while True:
    try:
        psycopg2.connect(connect_timeout=3).close()  # libpq reads PGHOST, PGPORT, PGUSER, PGPASSFILE, PGDATABASE
        break
    except psycopg2.OperationalError as e:
        msg = " ".join(str(e).split())
        fatal = ("password authentication failed", "does not exist", "no password supplied", "no pg_hba.conf entry")
        if any(f in msg for f in fatal) or time.monotonic() > deadline:
            sys.exit(f"cannot connect to PostgreSQL as {where}: {msg}")
        time.sleep(1)
EOF
}

# The head checks MLflow with the cluster's own credentials, so a wrong password stops the head
# now rather than failing every trial of the first sweep.
wait_for_mlflow() {
    log "waiting for MLflow at $MLFLOW_TRACKING_URI"
    # The same check a sweep makes before it starts (tune.tracking.check_reachable), waiting while MLflow starts.
    "$PYTHON" -m tune check-tracking "$MLFLOW_TRACKING_URI" --wait "${WAIT_TIMEOUT:-120}" \
        || die "MLflow is not usable (see above)"
}

# ini_value VAR: VAR's value checked for an ini file (configparser strips whitespace at the ends,
# and reads a value up to the line's end) and with % written %% (configparser interpolates it).
ini_value() {
    local name=$1 value=${!1}
    case $value in
        *$'\n'* | *$'\r'*) die "$name must be one line" ;;
    esac
    if [ "$value" != "${value#[[:space:]]}" ] || [ "$value" != "${value%[[:space:]]}" ]; then
        die "$name must not start or end with whitespace (the config file would drop it)"
    fi
    printf '%s' "${value//%/%%}"
}

# libpq reads the password from a pgpass file (mode 600, or libpq ignores it) instead of PGPASSWORD,
# which every child (the server and its workers) would otherwise carry in its environment.
write_pgpass() {
    local dir password=${PGPASSWORD//\\/\\\\}
    password=${password//:/\\:} # pgpass escapes : and \ with a backslash
    dir=$(mktemp -d "${TMPDIR:-/tmp}/pgpass.XXXXXX")
    PGPASSFILE=$dir/pgpass
    (
        umask 077
        printf '*:*:*:%s:%s\n' "$PGUSER" "$password" >"$PGPASSFILE"
    )
    export PGPASSFILE
    unset PGPASSWORD
}

write_auth_config() {
    local password
    password=$(ini_value MLFLOW_ADMIN_PASSWORD)
    # The config holds the admin password: outside the data volume by default, readable by us only.
    if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
        MLFLOW_AUTH_CONFIG_PATH="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")/basic_auth.ini"
    fi
    export MLFLOW_AUTH_CONFIG_PATH
    mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")" "$MLFLOW_DATA_DIR/auth"
    # configparser interpolates %, so a literal % is written %%.
    (
        umask 077
        cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    )
    # Set, even empty, these would override the file: the file is the one source. The server needs
    # the password nowhere else, so it leaves the environment too.
    unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_ADMIN_PASSWORD
}

# The cluster's own MLflow user, not an admin: the Ray nodes log with it, so a leaked node secret
# cannot create users or change anyone's permissions. MLflow's default permission stays
# NO_PERMISSIONS; a user gets MANAGE on the experiments it creates, so the sweep drivers (on the
# head) create experiments and every node logs runs into them. Created on first start, its password
# set again on every start (so a new secret file takes effect), and never an admin.
ensure_cluster_user() {
    log "MLflow user $MLFLOW_CLUSTER_USERNAME (the Ray cluster's, not an admin): creating or updating it"
    # The password travels on descriptor 3, not on the command line or in the environment.
    "$PYTHON" - "$MLFLOW_AUTH_DATABASE_URI" "$MLFLOW_CLUSTER_USERNAME" 3<<<"$MLFLOW_CLUSTER_PASSWORD" <<'EOF' \
        || die "cannot create or update the MLflow user $MLFLOW_CLUSTER_USERNAME (see above)"
import os, sys
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

db_uri, username = sys.argv[1:3]
with os.fdopen(3) as f:
    pw = f.read().removesuffix("\n")
store = SqlAlchemyStore()
store.init_db(db_uri)
if store.has_user(username, use_primary=True):
    store.update_user(username, pw, False)  # and never an admin
else:
    store.create_user(username, pw, False)
EOF
    unset MLFLOW_CLUSTER_PASSWORD
}

start_mlflow() {
    require_all mlflow
    require MLFLOW_ADMIN_PASSWORD 12 # MLflow's own minimum, checked here so the message names the setting
    require MLFLOW_CLUSTER_PASSWORD 12
    require MLFLOW_FLASK_SERVER_SECRET_KEY 32
    : "${PGPORT:=5432}" "${MLFLOW_ADMIN_USERNAME:=admin}" "${MLFLOW_CLUSTER_USERNAME:=cluster}"
    : "${MLFLOW_HOST:=0.0.0.0}" "${MLFLOW_PORT:=5000}" "${MLFLOW_DATA_DIR:=/mlflow}" "${MLFLOW_WORKERS:=4}"
    : "${MLFLOW_ARTIFACTS_DIR:=$MLFLOW_DATA_DIR/artifacts}"
    : "${MLFLOW_AUTH_DATABASE_URI:=sqlite:///$MLFLOW_DATA_DIR/auth/basic_auth.db}"
    if [ "$MLFLOW_CLUSTER_USERNAME" = "$MLFLOW_ADMIN_USERNAME" ]; then
        die "MLFLOW_CLUSTER_USERNAME must differ from MLFLOW_ADMIN_USERNAME: the cluster logs runs as a non-admin user"
    fi
    # The Host headers MLflow answers: its own defaults (loopback, private ranges), which any explicit
    # list would replace, plus the compose service name, plus whatever the operator adds.
    local hosts="mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*" i
    for i in $(seq 16 31); do hosts+=",172.$i.*"; done
    # Multi-host: trials on other hosts reach MLflow at the head's private address, which may lie outside
    # the ranges above (Tailscale hands out 100.64.0.0/10 and fd7a: addresses). fnmatch needs [ escaped.
    if [ -n "${CLUSTER_HEAD_IP:-}" ]; then
        case $CLUSTER_HEAD_IP in
            *:*) hosts+=",[$CLUSTER_HEAD_IP],[[]$CLUSTER_HEAD_IP]:*" ;;
            *) hosts+=",$CLUSTER_HEAD_IP,$CLUSTER_HEAD_IP:*" ;;
        esac
    fi
    export MLFLOW_SERVER_ALLOWED_HOSTS="$hosts${MLFLOW_SERVER_ALLOWED_HOSTS:+,$MLFLOW_SERVER_ALLOWED_HOSTS}"
    export PGHOST PGPORT PGUSER PGDATABASE
    case $PGUSER$PGDATABASE in
        *[!A-Za-z0-9_-]*) die "PGUSER and PGDATABASE may hold letters, digits, _ and - only" ;;
    esac
    write_pgpass
    wait_for_postgres
    write_auth_config
    ensure_cluster_user
    mkdir -p "$MLFLOW_ARTIFACTS_DIR"
    log "serving on $MLFLOW_HOST:$MLFLOW_PORT, runs in PostgreSQL, artifacts in $MLFLOW_ARTIFACTS_DIR"
    # MLflow reads its Flask key only from this variable: exported now, it reaches the server
    # (exec'd below) and its workers, and none of the helpers run before.
    export MLFLOW_FLASK_SERVER_SECRET_KEY
    # The password stays out of the URI: libpq reads PGPASSFILE. The driver is named because
    # SQLAlchemy 2.1 defaults to psycopg 3, and psycopg2 is what the server extra pins.
    run mlflow server \
        --backend-store-uri "postgresql+psycopg2://$PGUSER@$PGHOST:$PGPORT/$PGDATABASE" \
        --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DIR" \
        --app-name basic-auth \
        --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS"
}

# Optional `ray start` flags, each set only when its variable is: Ray's defaults suit containers,
# and the test pins every port so that two nodes (and other Ray instances) share one host.
RAY_ARGS=()
add_ray_arg() {
    local var=$1 flag=$2
    if [ -n "${!var:-}" ]; then RAY_ARGS+=("$flag" "${!var}"); fi
}
common_ray_args() {
    add_ray_arg RAY_NODE_IP --node-ip-address
    add_ray_arg RAY_TEMP_DIR --temp-dir
    add_ray_arg RAY_NUM_CPUS --num-cpus
    add_ray_arg RAY_NUM_GPUS --num-gpus
    add_ray_arg RAY_OBJECT_STORE_MEMORY --object-store-memory
    add_ray_arg RAY_NODE_MANAGER_PORT --node-manager-port
    add_ray_arg RAY_OBJECT_MANAGER_PORT --object-manager-port
    add_ray_arg RAY_MIN_WORKER_PORT --min-worker-port
    add_ray_arg RAY_MAX_WORKER_PORT --max-worker-port
    add_ray_arg RAY_DASHBOARD_AGENT_LISTEN_PORT --dashboard-agent-listen-port
    add_ray_arg RAY_DASHBOARD_AGENT_GRPC_PORT --dashboard-agent-grpc-port
    add_ray_arg RAY_METRICS_EXPORT_PORT --metrics-export-port
    add_ray_arg RAY_RUNTIME_ENV_AGENT_PORT --runtime-env-agent-port
    RAY_ARGS+=(--disable-usage-stats --block)
}

secure_ray() {
    require RAY_AUTH_TOKEN 32
    # Token auth is not optional: every node, the Jobs API and the dashboard demand the token.
    export RAY_AUTH_MODE=token
    if [ -n "${SECRET_FILE[RAY_AUTH_TOKEN]:-}" ]; then
        # Ray (2.60) reads the token from this file itself, in every process it starts.
        export RAY_AUTH_TOKEN_PATH=${SECRET_FILE[RAY_AUTH_TOKEN]}
        unset RAY_AUTH_TOKEN
    else
        export RAY_AUTH_TOKEN
        unset RAY_AUTH_TOKEN_PATH
    fi
}

# MLflow clients read ~/.mlflow/credentials (no variable names another path) when the environment
# holds no password: the trials on this node find the cluster user's password there, and the
# password leaves the environment of Ray and its workers.
write_mlflow_credentials() {
    local username password
    username=$(ini_value MLFLOW_TRACKING_USERNAME)
    password=$(ini_value MLFLOW_TRACKING_PASSWORD)
    mkdir -p "$HOME/.mlflow" || die "cannot create $HOME/.mlflow for MLflow's credentials file"
    (
        umask 077
        cat >"$HOME/.mlflow/credentials" <<EOF
[mlflow]
mlflow_tracking_username = ${username}
mlflow_tracking_password = ${password}
EOF
    )
    chmod 600 "$HOME/.mlflow/credentials"
    export MLFLOW_TRACKING_USERNAME
    unset MLFLOW_TRACKING_PASSWORD
}

start_head() {
    require_all head
    secure_ray
    write_mlflow_credentials
    : "${RAY_GCS_PORT:=6379}" "${RAY_DASHBOARD_HOST:=0.0.0.0}" "${RAY_DASHBOARD_PORT:=8265}" "${RAY_CLIENT_PORT:=10001}"
    if [ -n "${RAY_STORAGE_PATH:-}" ]; then
        mkdir -p "$RAY_STORAGE_PATH" || die "cannot create Ray's storage path $RAY_STORAGE_PATH"
        [ -w "$RAY_STORAGE_PATH" ] || die "Ray's storage path $RAY_STORAGE_PATH is not writable by $(id -un)"
    fi
    wait_for_mlflow
    common_ray_args
    log "starting the Ray head: GCS port $RAY_GCS_PORT, dashboard and Jobs API $RAY_DASHBOARD_HOST:$RAY_DASHBOARD_PORT"
    run ray start --head --port "$RAY_GCS_PORT" --include-dashboard true \
        --dashboard-host "$RAY_DASHBOARD_HOST" --dashboard-port "$RAY_DASHBOARD_PORT" \
        --ray-client-server-port "$RAY_CLIENT_PORT" "${RAY_ARGS[@]}"
}

# Compose gives every replica of a service the same GPUs (it has no per-replica device list), so
# `--scale ray-worker=N` on one host would count each GPU N times. Each worker instead claims
# GPUS_PER_WORKER of the GPUs it sees with a lock file per GPU on a volume the host's workers
# share; the lock lives as long as this process (ray start --block inherits the descriptor).
claim_gpus() {
    if [ -n "${RAY_NUM_GPUS:-}" ]; then
        log "RAY_NUM_GPUS=$RAY_NUM_GPUS set: using the GPUs as given, no claim"
        return
    fi
    local listing count want dir i fd claimed=()
    if ! listing=$(nvidia-smi -L 2>/dev/null); then
        log "no GPU visible (nvidia-smi missing or failing): this worker offers CPUs only"
        return
    fi
    count=$(grep -c '^GPU ' <<<"$listing" || true)
    if [ "$count" -eq 0 ]; then
        log "no GPU visible: this worker offers CPUs only"
        return
    fi
    want=${GPUS_PER_WORKER:-all}
    [ "$want" = all ] && want=$count
    case $want in
        '' | *[!0-9]*) die "GPUS_PER_WORKER=$want must be a positive whole number or 'all'" ;;
    esac
    if [ "$want" -lt 1 ] || [ "$want" -gt "$count" ]; then
        die "GPUS_PER_WORKER=$want, but this host shows $count GPUs"
    fi
    dir=${GPU_CLAIM_DIR:-/var/lib/gpu-claims}
    mkdir -p "$dir" || die "cannot create the GPU claim folder $dir"
    for ((i = 0; i < count && ${#claimed[@]} < want; i++)); do
        exec {fd}>"$dir/gpu-$i.lock"
        if flock -n "$fd"; then claimed+=("$i"); else exec {fd}>&-; fi
    done
    if [ "${#claimed[@]}" -lt "$want" ]; then
        die "only ${#claimed[@]} of this host's $count GPUs are free and this worker needs $want (GPUS_PER_WORKER);" \
            "run at most $((count / want)) ray-worker replicas on this host, or lower GPUS_PER_WORKER"
    fi
    CUDA_VISIBLE_DEVICES=$(
        IFS=,
        echo "${claimed[*]}"
    )
    export CUDA_VISIBLE_DEVICES
    RAY_NUM_GPUS=$want
    log "claimed GPUs $CUDA_VISIBLE_DEVICES of $count"
}

start_worker() {
    require_all worker
    secure_ray
    write_mlflow_credentials
    case $RAY_HEAD_ADDRESS in
        *:*) ;;
        *) die "RAY_HEAD_ADDRESS=$RAY_HEAD_ADDRESS must be HOST:PORT of the head's GCS (e.g. ray-head:6379)" ;;
    esac
    wait_for_tcp "${RAY_HEAD_ADDRESS%:*}" "${RAY_HEAD_ADDRESS##*:}" "the Ray head's GCS"
    claim_gpus
    common_ray_args
    log "joining the Ray cluster at $RAY_HEAD_ADDRESS"
    run ray start --address "$RAY_HEAD_ADDRESS" "${RAY_ARGS[@]}"
}

healthcheck() {
    case ${1:-} in
        mlflow)
            "$PYTHON" -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/health" % os.environ.get("MLFLOW_PORT", "5000"), timeout=5)'
            ;;
        head)
            # Ray exempts its health endpoints from token auth: this needs no secret.
            "$PYTHON" -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/api/gcs_healthz" % os.environ.get("RAY_DASHBOARD_PORT", "8265"), timeout=5)'
            ;;
        *) die "usage: entrypoint.sh healthcheck mlflow|head" ;;
    esac
}

case $MODE in
    mlflow) start_mlflow ;;
    head) start_head ;;
    worker) start_worker ;;
    healthcheck) healthcheck "${2:-}" ;;
    requires)
        [ -n "${REQUIRED[${2:-none}]:-}" ] || die "usage: entrypoint.sh requires mlflow|head|worker"
        tr ' ' '\n' <<<"${REQUIRED[$2]}"
        ;;
    *) die "usage: entrypoint.sh mlflow|head|worker (or healthcheck mlflow|head)" ;;
esac
