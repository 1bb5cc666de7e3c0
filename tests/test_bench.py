"""The benchmark suite's own machinery: JSON shape, FLOP counting, the ASHA replay, import hygiene.

The benchmarks themselves take minutes; compute-limit and history-read run here at their --tiny sizes.
"""

import json
import random
import subprocess

import pytest
import torch
from torch import nn

from bench import common
from bench.asha_vs_grid import Bracket, recommend, replay, replay_only, replays
from conftest import PYTHON, ROOT
from models import build_model, layers


@pytest.mark.slow
def test_compute_limit_tiny_prints_its_figures_last():
    p = subprocess.run([PYTHON, "-m", "bench", "compute-limit", "--tiny", "--data", "synthetic"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("mlp_fraction", "cnn_fraction", "mlp_vs_torch_layers", "cnn_vs_torch_layers"):
        assert result[key] > 0, key
    assert set(result["met"]) == {"mlp_fraction", "cnn_fraction", "mlp_vs_torch_layers", "cnn_vs_torch_layers"}
    for key in ("clocks", "machine", "versions", "date", "git_commit", "run", "details"):
        assert result[key], key
    assert result["variant"] == "tiny"
    # the table came first: its header, its rule, a row per run, then the JSON as the last line
    lines = p.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["run", "median"] and set(lines[1].replace(" ", "")) == {"-"}
    assert [line.split()[0] for line in lines[3:-1]] == ["mlp-ours", "mlp-torch", "cnn-ours", "cnn-torch",
                                                        "cnn-ours-channels_last"]


@pytest.mark.slow
def test_history_read_tiny_runs_every_path_and_they_agree():
    """Each history path of analysis/fetch.py (public and private, on SQLite and on a real `mlflow server`)
    reads the same points."""
    p = subprocess.run([PYTHON, "-m", "bench", "history-read", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["same_points"] is True and result["points"] == 6 * 4 * 10  # every run, epoch and key
    assert set(result["seconds"]) == {"sqlite public", "sqlite private", "server public", "server private"}


def test_flop_counter_matches_the_mlp_by_hand():
    # forward: two matmuls; backward: weight grads of both, input grad of the second only.
    forward = 2 * 100 * (3072 * 1024 + 1024 * 10)
    backward = 2 * 100 * 3072 * 1024 + 2 * (2 * 100 * 1024 * 10)
    assert common.step_flops(build_model("mlp"), 100) == forward + backward
    assert common.step_flops(build_model("mlp"), 100, train=False) == forward


def test_torch_layers_network_swaps_every_layer_of_ours():
    for model in ("mlp", "cnn"):
        ours, theirs = build_model(model), common.torch_layers_model(model)
        kinds = {type(m) for m in theirs.modules()}
        assert not kinds & {layers.BatchNorm1d, layers.BatchNorm2d, layers.Dropout, layers.Dropout2d}
        # the same structure, layer for layer: ours carry torch's class names
        assert [type(m).__name__ for m in theirs.modules()] == [type(m).__name__ for m in ours.modules()]
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_train_builds_the_network_it_is_given():
    from tune import data
    from tune.config import TrialConfig
    from tune.train import train

    built = []

    def build(*args, **kwargs):
        built.append(common.torch_layers_model(*args, **kwargs))
        return built[-1]

    cfg = TrialConfig(model="mlp", hidden=64, epochs=1, batch_size=50, device="cpu", data="synthetic", val_size=200)
    ours = train(cfg, data.synthetic(n_train=600, n_test=200))
    theirs = train(cfg, data.synthetic(n_train=600, n_test=200), build=build)
    assert len(built) == 1 and any(isinstance(m, nn.BatchNorm1d) for m in built[0].modules())
    assert theirs["best_val_loss"] != ours["best_val_loss"]  # torch's dropout draws differ from ours


def test_replayed_bracket_decides_as_rays():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng = random.Random(0)
    for grace, rf in ((1, 3), (2, 2), (3, 3)):
        ours, rays = Bracket(grace, 20, rf), _Bracket(grace, 20, rf, 0)
        trials = [Trial("__fake", trial_id=str(i), stub=True) for i in range(9)]
        for epoch in range(1, 20):
            for i, trial in enumerate(trials):
                reward = -rng.random()
                assert ours.on_result(i, epoch, reward) == (rays.on_result(trial, epoch, reward) == "STOP")


def curve(losses: list[float]) -> list[dict]:
    """A FIFO trial's result rows, as asha_vs_grid.sweep() records them, from its validation losses."""
    best = [min(losses[:i + 1]) for i in range(len(losses))]
    return [{"epoch": e + 1, "val_loss": v, "best_val_loss": b, "best_epoch": best.index(b) + 1, "test_acc": 1 - b,
             "time_total_s": e + 1.0} for e, (v, b) in enumerate(zip(losses, best))]


def test_replay_cuts_the_slow_starter_with_a_short_grace_period():
    fast = [0.5, 0.45, 0.44, 0.44, 0.44, 0.44]
    slow = [0.9, 0.7, 0.5, 0.4, 0.3, 0.2]  # the best trial, but worst early on
    trials = [{"dropout": 0.1, "curve": curve(fast)}, {"dropout": 0.2, "curve": curve(fast)},
              {"dropout": 0.9, "curve": curve(slow)}]
    assert replay(trials, grace=1, rf=2, slots=1)["winner_dropout"] != 0.9
    full = replay(trials, grace=6, rf=2, slots=1)
    assert full["winner_dropout"] == 0.9 and full["trial_epochs"] == 18


def test_replays_count_the_arrival_orders_that_keep_the_winner():
    # Two trials start together; at the first rung only the first to arrive passes unconditionally.
    # In grid order the fast starter arrives first and cuts the best trial; in about half of the
    # arrival orders the best trial arrives first and both go on.
    trials = [{"dropout": 0.1, "curve": curve([0.5, 0.45, 0.4, 0.4])}, {"dropout": 0.5, "curve": curve([0.6, 0.4, 0.3, 0.2])}]
    rows = {(r["grace"], r["rf"]): r for r in replays({"trials": trials, "wall_seconds": 0.0}, slots=2)}
    first_rung = rows[(1, 2)]
    assert first_rung["winner_dropout"] == 0.1 and first_rung["gap_points"] > 0.5
    assert 0.3 < first_rung["keeps_winner"] < 0.7
    assert rows[(3, 2)]["keeps_winner"] == 1.0  # past the crossing, the order no longer matters
    assert recommend(list(rows.values()))["keeps_winner"] >= 0.95


def test_replay_mode_reads_a_saved_result(tmp_path):
    def saved_curve(losses):  # as older results saved it: fewer fields
        return [{k: r[k] for k in ("epoch", "val_loss", "best_val_loss", "test_acc")} for r in curve(losses)]

    saved = {"details": {"curves": {"0.1": saved_curve([0.5, 0.45, 0.44, 0.44]), "0.5": saved_curve([0.9, 0.6, 0.4, 0.3])}}}
    path = tmp_path / "asha.json"
    path.write_text(json.dumps(saved))
    out = replay_only(str(path), slots=1)
    assert out["variant"] == "replay" and out["replay"] and out["replay_recommended"]["gap_points"] <= 0.5


@pytest.mark.slow
def test_gpu_packing_imports_neither_ray_nor_mlflow():
    code = ("import sys, bench.gpu_packing, bench.__main__; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'optuna', 'pandas'}); "
            "assert not bad, bad")
    p = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_record_judges_targets_and_names_files(tmp_path):
    r = common.record("x", "quick", {"ratio": 0.96, "gap": 0.7, "same": True},
                      targets={"ratio": (">=", 0.95), "gap": ("<=", 0.5)}, clocks={"a": "b"}, run={}, details={})
    assert r["met"] == {"ratio": True, "gap": False} and r["targets"]["ratio"] == ">= 0.95"
    assert common.write(r, tmp_path).name == "x.quick.json"
    assert common.result_path(tmp_path, "x", "full").name == "x.json"


def test_written_results_hold_no_path_of_this_machine(tmp_path):
    data = f"imagefolder:{ROOT.parent / 'shared' / 'data' / 'c.tar.gz'}"
    r = common.record("x", "quick", {}, targets={}, clocks={}, run={"data": data, "data_dir": str(ROOT / "data")}, details={})
    written = json.loads(common.write(r, tmp_path).read_text())
    assert written["run"] == {"data": "imagefolder:../shared/data/c.tar.gz", "data_dir": "./data"}
    assert str(ROOT.parent) not in json.dumps(written)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_our_layers_under_bf16_autocast_keep_fp32_statistics(model):
    torch.manual_seed(0)
    net = build_model(model, channels=(8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(8, 3, 32, 32))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    bns = [m for m in net.modules() if isinstance(m, (layers.BatchNorm1d, layers.BatchNorm2d))]
    assert bns and all(b.running_var.dtype == torch.float32 and b.weight.grad.dtype == torch.float32 for b in bns)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
