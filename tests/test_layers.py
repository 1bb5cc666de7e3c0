import pytest
import torch
from torch import nn

from models import BatchNorm1d, BatchNorm2d, Dropout, Dropout2d


@pytest.mark.parametrize("ours_cls, theirs_cls, shape", [
    (BatchNorm1d, nn.BatchNorm1d, (32, 16)),
    (BatchNorm2d, nn.BatchNorm2d, (8, 6, 5, 7)),
])
def test_batchnorm_matches_torch(ours_cls, theirs_cls, shape):
    torch.manual_seed(0)
    c = shape[1]
    ours, theirs = ours_cls(c).double(), theirs_cls(c).double()
    # Start from non-trivial affine parameters, the same on both sides.
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    for step in range(5):  # several steps, so the running statistics accumulate
        x = (torch.randn(shape, dtype=torch.double) * (step + 1) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        upstream = torch.randn(shape, dtype=torch.double)
        y_ours, y_theirs = ours(x), theirs(x2)
        torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
        (y_ours * upstream).sum().backward()
        (y_theirs * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 5
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=torch.double) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_float32_matches_torch():
    torch.manual_seed(1)
    ours, theirs = BatchNorm2d(4), nn.BatchNorm2d(4)
    x = torch.randn(16, 4, 9, 9) * 2 + 3
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_state_is_buffers_not_parameters():
    bn = BatchNorm1d(3)
    assert {n for n, _ in bn.named_parameters()} == {"weight", "bias"}
    assert {"running_mean", "running_var"} <= {n for n, _ in bn.named_buffers()}
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))


def test_batchnorm_rejects_wrong_rank():
    with pytest.raises(ValueError, match="BatchNorm2d expects"):
        BatchNorm2d(3)(torch.randn(4, 3))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics(p):
    torch.manual_seed(0)
    layer = Dropout(p)
    x = torch.ones(200_000)
    y = layer(x)
    zero_fraction = (y == 0).float().mean().item()
    assert abs(zero_fraction - p) < 0.01
    survivors = y[y != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.02  # inverted dropout keeps the mean
    layer.eval()
    assert torch.equal(layer(x), x)


def test_dropout2d_zeroes_whole_channels():
    torch.manual_seed(0)
    p = 0.4
    layer = Dropout2d(p)
    x = torch.ones(500, 64, 4, 4)
    y = layer(x)
    per_channel = y.flatten(2)
    # every channel is all zero or all scaled: no partial channels
    assert torch.all((per_channel == 0).all(-1) | (per_channel == 1 / (1 - p)).all(-1))
    dropped = (per_channel == 0).all(-1).float().mean().item()
    assert abs(dropped - p) < 0.02
    assert abs(y.mean().item() - 1.0) < 0.03
    layer.eval()
    assert torch.equal(layer(x), x)


def test_dropout_rate_zero_is_identity_and_bad_rates_refused():
    x = torch.randn(10, 10)
    assert torch.equal(Dropout(0.0)(x), x)
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Dropout(p)


def test_train_eval_switch_reaches_every_layer():
    from models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # eval: no dropout, running statistics
    # eval: our BatchNorm uses its running statistics, so an image's output does not depend on its batch
    torch.testing.assert_close(model(x[:1]), a[:1])
    model.train()
    c, d = model(x), model(x)
    assert not torch.equal(c, d)  # train: fresh dropout masks
    # back in eval (running statistics moved on in train): deterministic and batch-independent again
    model.eval()
    e = model(x)
    assert torch.equal(e, model(x)) and not torch.equal(e, a)
    torch.testing.assert_close(model(x[1:2]), e[1:2])
