#!/usr/bin/env bash
# The one entry point of the stack: `entrypoint.sh mlflow|head|worker`, plus `healthcheck mlflow|head`
# for compose and `requires MODE` for the static tests.
#
# Everything comes from the environment, so this same script runs in the containers and in
# tests/test_deploy_stack.py, which starts the stack without Docker. It waits for what a service
# needs, and it stops with one clear line when a secret or a service is missing: no default
# password or token exists anywhere, and none is ever put on a command line (`ps` shows those).
set -euo pipefail

MODE=${1:-}
PYTHON=${PYTHON:-python3}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-120}

# What each mode refuses to start without. `entrypoint.sh requires MODE` prints the list, so the
# static tests check it against compose.yaml and .env.example instead of a copy of it.
declare -A REQUIRED=(
    [mlflow]="MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY PGHOST PGUSER PGPASSWORD PGDATABASE"
    [head]="RAY_AUTH_TOKEN MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD"
    # Trials log to MLflow from the workers: they need the credentials; the URI comes with each trial.
    [worker]="RAY_AUTH_TOKEN RAY_HEAD_ADDRESS MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD"
)

log() { printf 'entrypoint %s: %s\n' "$MODE" "$*" >&2; }
die() {
    printf 'entrypoint %s: error: %s\n' "$MODE" "$*" >&2
    exit 1
}

# require VAR [MIN_LENGTH]: short secrets are refused here, before a service half-starts.
require() {
    local name=$1 min=${2:-1} value
    value=${!name:-}
    if [ -z "$value" ]; then
        die "$name is not set; put it in .env (see .env.example) or the environment"
    fi
    if [ "${#value}" -lt "$min" ]; then
        die "$name is too short (${#value} characters, at least $min); generate one with: openssl rand -hex 32"
    fi
}

require_all() {
    local name
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
        psycopg2.connect(connect_timeout=3).close()  # libpq reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
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

write_auth_config() {
    local password=$MLFLOW_ADMIN_PASSWORD
    case $password in
        *$'\n'* | *$'\r'*) die "MLFLOW_ADMIN_PASSWORD must be one line" ;;
    esac
    if [ "$password" != "${password#[[:space:]]}" ] || [ "$password" != "${password%[[:space:]]}" ]; then
        die "MLFLOW_ADMIN_PASSWORD must not start or end with whitespace (the auth config would drop it)"
    fi
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
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$MLFLOW_DATA_DIR/auth/basic_auth.db}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${password//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    )
    # Set, even empty, these would override the file: the file is the one source. The server needs
    # the password nowhere else, so it leaves the environment too.
    unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_ADMIN_PASSWORD
}

start_mlflow() {
    require_all mlflow
    require MLFLOW_ADMIN_PASSWORD 12 # MLflow's own minimum, checked here so the message names .env
    require MLFLOW_FLASK_SERVER_SECRET_KEY 32
    : "${PGPORT:=5432}" "${MLFLOW_ADMIN_USERNAME:=admin}" "${MLFLOW_HOST:=0.0.0.0}" "${MLFLOW_PORT:=5000}"
    : "${MLFLOW_DATA_DIR:=/mlflow}" "${MLFLOW_WORKERS:=4}"
    : "${MLFLOW_ARTIFACTS_DIR:=$MLFLOW_DATA_DIR/artifacts}"
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
    export PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE MLFLOW_FLASK_SERVER_SECRET_KEY
    case $PGUSER$PGDATABASE in
        *[!A-Za-z0-9_-]*) die "PGUSER and PGDATABASE may hold letters, digits, _ and - only" ;;
    esac
    wait_for_postgres
    write_auth_config
    mkdir -p "$MLFLOW_ARTIFACTS_DIR"
    log "serving on $MLFLOW_HOST:$MLFLOW_PORT, runs in PostgreSQL, artifacts in $MLFLOW_ARTIFACTS_DIR"
    # The password stays out of the URI: libpq reads PGPASSWORD. The driver is named because
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
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
    unset RAY_AUTH_TOKEN_PATH
}

start_head() {
    require_all head
    secure_ray
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
