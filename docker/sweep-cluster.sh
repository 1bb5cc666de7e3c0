#!/usr/bin/env bash
# `make sweep-cluster`: submit `python -m tune sweep ARGS...` to the stack's Ray head as a Ray job.
# The driver runs on the head, so it uses the head's MLflow URI and credentials and the cluster's
# paths; this side needs only the Ray token: RAY_AUTH_TOKEN from the environment, else the file
# `make env` wrote (secrets/ray_auth_token, or RAY_AUTH_TOKEN_FILE), which Ray reads itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/env-file.sh
. docker/env-file.sh

die() {
    printf 'sweep-cluster: error: %s\n' "$*" >&2
    exit 1
}
[ $# -ge 1 ] || die "usage: docker/sweep-cluster.sh EXPERIMENT [sweep options]"

export RAY_AUTH_MODE=token
unset RAY_ADDRESS
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    export RAY_AUTH_TOKEN
    unset RAY_AUTH_TOKEN_PATH
else
    token_file=${RAY_AUTH_TOKEN_FILE:-${SECRETS_DIR:-secrets}/ray_auth_token}
    [ -f "$token_file" ] && [ -r "$token_file" ] && [ -s "$token_file" ] \
        || die "no RAY_AUTH_TOKEN in the environment and no readable token file $token_file (make env, or see .env.example)"
    RAY_AUTH_TOKEN_PATH=$(realpath "$token_file")
    export RAY_AUTH_TOKEN_PATH
fi

port=${RAY_DASHBOARD_PUBLISHED_PORT:-$(env_file_value RAY_DASHBOARD_PUBLISHED_PORT)}
address=${RAY_JOBS_ADDRESS:-http://127.0.0.1:${port:-8265}}
# Paths on the cluster (the volumes of compose.yaml), not on this machine. Ours come first so
# that the caller's own --storage or --set data_dir=... win.
storage=${CLUSTER_STORAGE_PATH:-/mnt/ray-storage}
data_dir=${CLUSTER_DATA_DIR:-/data}

# The uploaded copy has no .git: tell the runs which commit they ran (as a local sweep would name it).
commit=$(TUNE_GIT_COMMIT='' "${PYTHON:-python3}" -c 'from tune.provenance import git_commit; print(git_commit())')

# --working-dir ships this checkout (less what .gitignore lists), so the cluster runs the code you
# see here; the image supplies the pinned dependencies.
exec "${RAY:-ray}" job submit --address "$address" --working-dir . \
    --runtime-env-json "{\"env_vars\": {\"TUNE_GIT_COMMIT\": \"$commit\"}}" -- \
    python -m tune sweep --storage "$storage" --set "data_dir=$data_dir" "$@"
