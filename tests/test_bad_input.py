"""Bad input, in process: one line on stderr naming the problem and the fix, exit 2, nothing written, no Ray.

tests/test_reliability.py runs a few of these through the real entry point, in a subprocess."""

import os
import tarfile

import pytest

from tune.cli import main


def bad_archives(tmp_path):
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    unequal = tmp_path / "unequal"
    for folder in ("train/cat", "train/dog", "test/cat"):
        (unequal / folder).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (32, 32)).save(unequal / folder / "0.png")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    return {"corrupt": corrupt, "empty": empty, "unequal": unequal, "file": not_a_dir}


# (case, train args or None, sweep args or None, words the one line must hold)
BAD_INPUT = [
    ("dropout", ["--dropout", "1.0"], ["--set", "dropout=1.0"], "[0, 1)"),
    ("negative dropout", ["--dropout", "-0.1"], ["--set", "dropout=-0.1"], "[0, 1)"),
    ("unknown token", ["--order", "bn,relu,drop"], ["--set", "order=bn,relu,drop"], "unknown token"),
    ("repeated token", ["--order", "relu,relu"], ["--set", "order=bn,relu,relu"], "more than once"),
    ("no relu", ["--order", "bn,dropout"], ["--set", "order=bn,dropout"], "no 'relu'"),
    ("no pool", ["--model", "cnn", "--order", "bn,relu"], ["dropout-cnn", "--set", "order=bn,relu"], "no 'pool'"),
    ("scope", None, ["--set", "cnn.order=bn,relu"], "matches no trial"),
    ("model", ["--model", "vgg"], ["--set", "model=vgg"], "unknown value 'vgg'"),
    ("dropout kind", ["--dropout-kind", "spatial"], ["--set", "dropout_kind=spatial"], "unknown value 'spatial'"),
    ("experiment", None, ["no-such-experiment"], "unknown experiment"),
    ("zero epochs", ["--epochs", "0"], ["--set", "epochs=0"], "epochs"),
    ("negative batch", ["--batch-size", "-1"], ["--set", "batch_size=-1"], "batch_size"),
    ("missing dataset", ["--data", "imagefolder:/no/such/cifar.tar.gz"], ["--data", "imagefolder:/no/such/cifar.tar.gz"],
     "does not exist"),
    ("corrupt archive", ["--data", "imagefolder:{corrupt}"], ["--data", "imagefolder:{corrupt}"], "not a readable"),
    ("empty archive", ["--data", "imagefolder:{empty}"], ["--data", "imagefolder:{empty}"], "holds no"),
    ("unequal classes", ["--data", "imagefolder:{unequal}"], ["--data", "imagefolder:{unequal}"], "different classes"),
    ("tracking uri", None, ["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ("address", None, ["--address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
    ("gpus", None, ["--gpus-per-trial", "2"], "GPUs"),
    ("storage", None, ["--storage", "{file}/results"], "not writable"),
    # root ignores permission bits, and /proc refuses to make folders: only writing finds out
    ("storage in /proc", None, ["--storage", "/proc/nope"], "storage path /proc/nope is not writable"),
    ("tracking store in /proc", None, ["--tracking-uri", "sqlite:////proc/nope/mlflow.db"], "is not writable"),
    ("unknown flag", ["--bogus-flag", "1"], ["--bogus-flag", "1"], "unknown arguments"),
    ("set key", ["--warmup", "3"], ["--set", "warmup=3"], "unknown"),
]


BAD_CASES = [(command, case, args, words) for case, train_args, sweep_args, words in BAD_INPUT
             for command, args in (("train", train_args), ("sweep", sweep_args)) if args is not None]


def assert_refused(stderr: str, words: str, work) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert words in lines[0] and lines[0].startswith("error: "), lines[0]
    # nothing written: no MLflow store, no Ray results, no stray files
    assert sorted(os.listdir(work)) in ([], ["data"]), os.listdir(work)
    assert not (work / "data").exists() or not list((work / "data").rglob("*.npz"))


IN_PROCESS = [c for c in BAD_CASES if c[1] != "gpus"]  # the GPU check needs Ray's view of the cluster


@pytest.mark.parametrize("command, case, args, words", IN_PROCESS, ids=[f"{c[0]}-{c[1]}" for c in IN_PROCESS])
def test_bad_input_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, command, case, args, words):
    import ray

    paths = bad_archives(tmp_path)
    args = [a.format(**paths) for a in args]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if command == "train":
        argv = ["train", "--data", "synthetic", "--epochs", "1", *args]
    else:
        experiment = [] if not args[0].startswith("--") else ["dropout-mlp"]
        argv = ["sweep", *experiment, "--data", "synthetic", "--set", "epochs=1", *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err
    assert_refused(err, words, work)
    assert not ray.is_initialized()


@pytest.mark.parametrize("args, needle", [
    (["--dropout", "1.2"], "dropout"),
    (["--order", "bn,relu,dropout,pool,bogus"], "order"),
    (["--model", "cnn", "--order", "bn,dropout,pool"], "relu"),
    (["--epochs", "0"], "epochs"),
    (["--batch-size", "-5"], "batch_size"),
    (["--data", "imagefolder:/nonexistent/cifar.tar.gz"], "does not exist"),
    (["--bogus-flag", "1"], "unknown arguments"),
    (["--model", "transformer"], "model"),
    (["--threads", "0"], "--threads 0"),
    (["--experiment", "report", "--record", "r"], "composite"),
    (["--experiment", "dropout-mlp"], "add --record DIR"),
    (["--record", "/proc/nope"], "--record /proc/nope is not a writable folder"),
])
def test_train_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", "--data", "synthetic", "--epochs", "1", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert os.listdir(tmp_path) in ([], ["data"])
