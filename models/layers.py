"""Our own BatchNorm and Dropout.

They replace torch's layers so that the study's layers are ours to read and
change. The equivalence tests in tests/test_layers.py hold them to torch's
numbers; bench/compute_limit.py prices them against torch's fused kernels
(docs/performance.md has the measurements behind the choices below).
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm with a closed-form backward.

    Autograd through the forward's ops would replay every temporary (centring,
    squaring, the two reductions, the affine); the closed form reads the saved
    centred input and the upstream gradient twice each. torch.var_mean is not
    used: on the CPU it is ~15x slower than a two-pass mean/centred-square-mean.
    Returns the output and the batch mean and (biased) variance for the running
    statistics; those two carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dims, view, eps):
        # Statistics in fp32 even under bf16 autocast: a bf16 variance loses too
        # many bits for the running estimate.
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        mean = xf.mean(dims, keepdim=True)
        centred = xf - mean
        # The squares go into the output's buffer, which the affine then overwrites:
        # one full-size allocation fewer (fresh pages cost as much as a pass on the CPU).
        y = torch.mul(centred, centred)
        var = y.mean(dims)
        inv_std = torch.rsqrt(var + eps)
        scale = weight * inv_std
        torch.addcmul(bias.view(view), centred, scale.view(view), out=y)
        ctx.save_for_backward(centred, inv_std, scale)
        ctx.dims, ctx.view, ctx.x_dtype = dims, view, x.dtype
        mean = mean.view(-1)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        centred, inv_std, scale = ctx.saved_tensors
        dims, view = ctx.dims, ctx.view
        dy = dy.to(centred.dtype)
        n = centred.numel() // centred.shape[1]
        dbias = dy.sum(dims)
        dx = torch.mul(dy, centred)  # as in forward: this buffer becomes dx
        dy_dot_centred = dx.sum(dims)
        dweight = dy_dot_centred * inv_std
        # dx = scale * (dy - mean(dy) - centred * inv_std^2 * mean(dy * centred)), as two fused passes.
        shift = (scale * dbias).div_(-n).view(view)
        slope = (scale * inv_std.square() * dy_dot_centred).div_(-n).view(view)
        torch.addcmul(shift, dy, scale.view(view), out=dx).addcmul_(centred, slope)
        return dx.to(ctx.x_dtype), dweight, dbias, None, None, None


class _BatchNorm(nn.Module):
    """Batch normalisation over every dim but the channel dim (dim 1)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # Buffers, not parameters: they move with .to() and live in state_dict,
        # but the optimiser never sees them.
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _shape(self, x: torch.Tensor) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce_dims, view = self._shape(x)
        if self.training:
            y, mean, var = _BatchNormTrain.apply(x, self.weight, self.bias, reduce_dims, view, self.eps)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                # torch keeps the unbiased variance in its running estimate.
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
            return y
        # Fold normalisation and affine into one scale and shift, so the full-size
        # tensor is touched by a single fused multiply-add.
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N,) of an (N, C) input, as the MLP uses it."""

    def _shape(self, x):
        if x.dim() != 2:
            raise ValueError(f"BatchNorm1d expects (N, C) input, got shape {tuple(x.shape)}")
        return [0], [1, -1]


class BatchNorm2d(_BatchNorm):
    """BatchNorm per channel over (N, H, W) of an (N, C, H, W) input."""

    def _shape(self, x):
        if x.dim() != 4:
            raise ValueError(f"BatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        return [0, 2, 3], [1, -1, 1, 1]


class Dropout(nn.Module):
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p

    def _uniform(self, x: torch.Tensor) -> torch.Tensor:
        # rand_like keeps x's memory format (channels_last), so the multiply below stays dense.
        return torch.rand_like(x, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # Uniform draws compared with `keep`, in place: on the CPU this is ~4x faster
        # than bernoulli_ (which torch's own Dropout uses there). Drawn in fp32, so a
        # bf16 input does not quantise the rate.
        mask = self._uniform(x).lt_(keep).div_(keep)
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Channel dropout: zero whole (N, C) feature maps of an (N, C, H, W) input."""

    def _uniform(self, x):
        if x.dim() != 4:
            raise ValueError(f"Dropout2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        return torch.rand((x.shape[0], x.shape[1], 1, 1), device=x.device)
