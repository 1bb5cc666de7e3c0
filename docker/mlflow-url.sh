#!/usr/bin/env bash
# Prints the stack's MLflow URL and succeeds when the stack's server answers on this host; fails
# quietly otherwise (`make mlflow-ui` then serves the local store instead). The stack's server is
# recognised by its basic auth: an anonymous request must be refused with 401.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/env-file.sh
. docker/env-file.sh

port=${MLFLOW_PUBLISHED_PORT:-$(env_file_value MLFLOW_PUBLISHED_PORT)}
url=http://127.0.0.1:${port:-5000}
"${PYTHON:-python3}" - "$url" <<'PY' || exit 1
import sys, urllib.error, urllib.request

try:
    urllib.request.urlopen(sys.argv[1] + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=3)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 401 else 1)
except OSError:
    sys.exit(1)
sys.exit(1)  # answered without auth: not the stack's server
PY
echo "$url"
