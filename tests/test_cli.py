"""The real entry points, in subprocesses, with tiny sizes."""

import json
import re
import subprocess

import pytest

from conftest import PYTHON, ROOT

pytestmark = pytest.mark.slow  # real Ray, servers or a subprocess per case: `make test` runs them


def run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([PYTHON, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_train_cli_on_real_data(shared_archive, data_dir):
    p = run("tune", "train", "--model", "cnn", "--dropout", "0.5", "--epochs", "2", "--channels", "8,16",
            "--data", f"imagefolder:{shared_archive}", "--data-dir", str(data_dir),
            "--limit", "1000", "--eval-limit", "500", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("best_epoch", "best_val_loss", "best_val_acc", "test_loss", "test_acc"):
        assert key in result
    assert result["config"]["model"] == "cnn" and result["config"]["dropout"] == 0.5
    assert 0.0 <= result["best_val_acc"] <= 1.0 and result["best_epoch"] in (1, 2)
    epoch_lines = [line for line in p.stderr.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2


def test_help_documents_every_option():
    import dataclasses

    from tune.config import TrialConfig, field_help

    p = run("tune", "train", "--help")
    assert p.returncode == 0
    docs, text = field_help(), " ".join(p.stdout.split())
    for f in dataclasses.fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        # the flag itself (--data is not --data-dir), with its field's docstring as help
        assert re.search(rf"^\s+{re.escape(flag)}[\s,]", p.stdout, re.M), flag
        assert docs[f.name][:40] in text, flag
    top = run("tune", "--help")
    assert top.returncode == 0 and "train" in top.stdout
