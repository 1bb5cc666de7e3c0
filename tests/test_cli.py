"""The real entry points, in subprocesses, with tiny sizes."""

import json
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


@pytest.mark.parametrize("args, needle", [
    (["--dropout", "1.2"], "dropout"),
    (["--order", "bn,relu,dropout,pool,bogus"], "order"),
    (["--model", "cnn", "--order", "bn,dropout,pool"], "relu"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "-5"], "batch_size"),
    (["--data", "imagefolder:/nonexistent/cifar.tar.gz"], "does not exist"),
    (["--bogus-flag", "1"], "unknown arguments"),
    (["--model", "transformer"], "model"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    p = run("tune", "train", "--data", "synthetic", "--epochs", "1", *args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert p.stdout == ""


def test_help_documents_every_option():
    import dataclasses

    from tune.config import TrialConfig

    p = run("tune", "train", "--help")
    assert p.returncode == 0
    for f in dataclasses.fields(TrialConfig):
        assert "--" + f.name.replace("_", "-") in p.stdout
    top = run("tune", "--help")
    assert top.returncode == 0 and "train" in top.stdout
