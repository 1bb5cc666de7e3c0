#!/usr/bin/env bash
# `make env`: write .env from .env.example (settings only, no secret) and every missing secret as a
# file of its own in secrets/: 64 random hex characters, mode 600. It never overwrites: an existing
# .env stays, and so does each existing secret file (a secret in use is rotated on purpose, see
# README "Rotating secrets"). SECRETS_DIR moves secrets/ (compose reads ../secrets, beside docker/).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-.env}
dir=${SECRETS_DIR:-secrets}
docker=${DOCKER:-docker}
volume=${POSTGRES_VOLUME:-tune-study_postgres-data}
# One file per secret, so that compose can hand each service only its own (compose.yaml, `secrets:`).
NAMES=(postgres_password mlflow_db_password mlflow_admin_password mlflow_cluster_password
    mlflow_flask_secret_key ray_auth_token)

die() {
    printf 'init-env: error: %s\n' "$*" >&2
    exit 1
}

[ ! -e "$target" ] || die "$target exists; edit it, or move it away to generate a new one"

# The postgres image applies its passwords only when it creates its volume: new PostgreSQL secrets
# beside an existing volume would lock MLflow out of its runs. Asked only where a Docker daemon answers.
if [ ! -e "$dir/postgres_password" ] || [ ! -e "$dir/mlflow_db_password" ]; then
    if command -v "$docker" >/dev/null 2>&1 && "$docker" info >/dev/null 2>&1; then
        if "$docker" volume inspect "$volume" >/dev/null 2>&1; then
            die "the PostgreSQL volume $volume exists and keeps the passwords it was created with; new ones in" \
                "$dir/ would not match. Restore $dir/postgres_password and $dir/mlflow_db_password, or remove the" \
                "volume (docker volume rm $volume deletes every run); README, \"Rotating secrets\""
        fi
    else
        printf 'init-env: WARNING: no Docker daemon answered, so it is unchecked whether the PostgreSQL volume %s exists;\n' "$volume" >&2
        printf 'init-env: WARNING: if it does, PostgreSQL keeps its old passwords and MLflow cannot log in with the new ones\n' >&2
    fi
fi

umask 077
mkdir -p "$dir"
written=()
for name in "${NAMES[@]}"; do
    [ ! -e "$dir/$name" ] || continue
    # printf, not echo: no trailing newline (the readers strip one anyway).
    printf '%s' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >"$dir/$name"
    written+=("$name")
done
cat .env.example >"$target"
printf 'init-env: wrote %s (settings) and %d new secret files in %s/ (mode 600): %s\n' \
    "$target" "${#written[@]}" "$dir" "${written[*]:-none, all existed}" >&2
printf 'init-env: the containers read them as uid 999 (postgres) and 1000 (the rest): README, "Secrets", says how\n' >&2
printf 'init-env: your MLflow login is MLFLOW_ADMIN_USERNAME (%s) with the password in %s/mlflow_admin_password\n' \
    "$target" "$dir" >&2
