#!/usr/bin/env bash
# `make worker-env`: write .env.worker, the settings a worker host needs, from .env.worker.example
# with each setting the head's env file ($ENV_FILE, default .env) gives filled in; CLUSTER_NODE_IP
# excepted, which differs per host. Only the names .env.worker.example lists are read, so nothing
# else of the head's settings reaches a worker host. It never overwrites.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/env-file.sh
. docker/env-file.sh
target=${1:-.env.worker}

die() {
    printf 'worker-env: error: %s\n' "$*" >&2
    exit 1
}
[ ! -e "$target" ] || die "$target exists; edit it, or move it away to write a new one"
[ -f "${ENV_FILE:-.env}" ] || die "no ${ENV_FILE:-.env}: run 'make env' first"

umask 077
while IFS= read -r line || [ -n "$line" ]; do
    # KEY=value, or an optional setting commented out as "# KEY=default"
    key=$(sed -nE 's/^(# )?([A-Z][A-Z0-9_]*)=.*/\2/p' <<<"$line")
    if [ -n "$key" ] && [ "$key" != CLUSTER_NODE_IP ] && value=$(env_file_value "$key") && [ -n "$value" ]; then
        printf '%s=%s\n' "$key" "$value"
    else
        printf '%s\n' "$line"
    fi
done <.env.worker.example >"$target"
printf 'worker-env: wrote %s. On each worker host: copy it as .env, set CLUSTER_NODE_IP, copy secrets/ray_auth_token\n' "$target" >&2
printf 'worker-env: and secrets/mlflow_cluster_password (no other secret), then run make worker-up\n' >&2
