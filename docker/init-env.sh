#!/usr/bin/env bash
# `make env`: write .env from .env.example, each empty value (a secret) filled with 64 random hex
# characters. It never overwrites an existing file: secrets already in use stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-.env}
if [ -e "$target" ]; then
    printf 'init-env: %s exists; edit it, or move it away to generate a new one\n' "$target" >&2
    exit 1
fi
umask 077
while IFS= read -r line || [ -n "$line" ]; do
    case $line in
        [A-Z]*=) printf '%s%s\n' "$line" "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" ;;
        *) printf '%s\n' "$line" ;;
    esac
done <.env.example >"$target"
printf 'init-env: wrote %s with new secrets (mode 600); the MLflow login is MLFLOW_ADMIN_USERNAME / MLFLOW_ADMIN_PASSWORD\n' "$target" >&2
