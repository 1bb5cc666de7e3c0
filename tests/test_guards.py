"""Conventions held by tests: the core stays free of Ray and MLflow, so it runs on a bare GPU box."""

import subprocess

import pytest

from conftest import PYTHON, ROOT

# What `tune train --record` and `tune study` need on a machine with torch and nothing else.
CORE = ["tune.config", "tune.data", "tune.train", "tune.record", "tune.fanout", "tune.cli", "tune.provenance", "models"]


@pytest.mark.parametrize("heavy", ["ray", "mlflow"])
def test_the_core_imports_neither_ray_nor_mlflow(heavy):
    code = f"import sys, {', '.join(CORE)}; print(sorted(m for m in sys.modules if m.split('.')[0] == '{heavy}'))"
    p = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"importing the core pulls in {heavy}: {p.stdout.strip()[:300]}"
