import itertools

import pytest
import torch
from torch import nn

from models import Dropout, Dropout2d, build_model
from models.layers import BatchNorm1d, BatchNorm2d

STUDY_ORDERS = ["bn,relu,dropout,pool", "relu,bn,dropout,pool", "bn,relu,pool,dropout",
                "relu,dropout,pool", "bn,relu,pool"]


def valid_orders():
    for r in range(2, 5):
        for tokens in itertools.permutations(["bn", "relu", "dropout", "pool"], r):
            if "relu" in tokens and "pool" in tokens:
                yield ",".join(tokens)


@pytest.mark.parametrize("order", sorted(set(valid_orders())))
@pytest.mark.parametrize("kind", ["element", "channel"])
def test_every_cnn_order_and_kind_runs(order, kind):
    model = build_model("cnn", order=order, dropout=0.3, dropout_kind=kind)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    types = [type(m) for m in model[0]]
    layer = {"bn": BatchNorm2d, "relu": nn.ReLU, "pool": nn.MaxPool2d, "dropout": Dropout2d if kind == "channel" else Dropout}
    assert types[1:] == [layer[t] for t in order.split(",")]  # the layers in the order asked for


@pytest.mark.parametrize("order", ["bn,relu,dropout", "relu,bn,dropout", "relu,dropout", "bn,relu", "relu"])
def test_mlp_orders(order):
    model = build_model("mlp", order=order, dropout=0.2)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    layer = {"bn": BatchNorm1d, "relu": nn.ReLU, "dropout": Dropout}
    assert [type(m) for m in model][2:2 + len(order.split(","))] == [layer[t] for t in order.split(",")]


def test_default_cnn_is_the_study_network():
    model = build_model("cnn")
    text = str(model)
    assert "in_features=10368" in text
    assert "Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in text
    assert "Conv2d(64, 128, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))" in text
    assert text.count("MaxPool2d(kernel_size=2, stride=2, padding=1") == 2
    assert [type(m) for m in model[0]][1:] == [BatchNorm2d, nn.ReLU, Dropout, nn.MaxPool2d]
    # no torch BN/Dropout anywhere: the study's layers are ours
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)) for m in model.modules())


def test_in_features_follow_the_shapes():
    # a third block pools 9 -> 5: the linear layer must follow, not be hard-coded
    model = build_model("cnn", channels=(16, 32, 8), kernels=(3, 3, 3))
    assert model[-1].in_features == 8 * 5 * 5
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_default_mlp_is_the_study_network():
    model = build_model("mlp")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 1024), (1024, 10)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(order="bn,relu,dropout,pool,softmax"), "unknown token 'softmax'"),
    (dict(order="bn,relu,relu,pool"), "more than once"),
    (dict(order="bn,dropout,pool"), "no 'relu'"),
    (dict(order="bn,relu,dropout"), "no 'pool'"),
    (dict(dropout=1.0), r"outside \[0, 1\)"),
    (dict(dropout=-0.1), r"outside \[0, 1\)"),
    (dict(model="resnet"), "unknown model"),
    (dict(dropout_kind="spatial"), "unknown dropout kind"),
    (dict(model="mlp", dropout_kind="channel"), "element for the MLP"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{"model": "cnn", **kwargs})
