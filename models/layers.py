"""Our own BatchNorm and Dropout.

They replace torch's layers so that the study's layers are ours to read and
change. The equivalence tests in tests/test_layers.py hold them to torch's
numbers; bench/compute_limit.py prices them against torch's fused kernels.
"""

import torch
from torch import nn


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
            # Statistics in fp32 even under bf16 autocast: a bf16 variance loses
            # too many bits for the running estimate.
            stats_x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            var, mean = torch.var_mean(stats_x, dim=reduce_dims, unbiased=False)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                # torch keeps the unbiased variance in its running estimate.
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        # Fold normalisation and affine into one scale and shift, so the full-size
        # tensor is touched by a single fused multiply-add.
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
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

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return x.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # The mask is drawn and scaled in place: one temporary, one multiply.
        mask = torch.empty(self._mask_shape(x), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Channel dropout: zero whole (N, C) feature maps of an (N, C, H, W) input."""

    def _mask_shape(self, x):
        if x.dim() != 4:
            raise ValueError(f"Dropout2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        return (x.shape[0], x.shape[1], 1, 1)
