"""Gaussian priors of the multi-scale Glow.

Kingma & Dhariwal (2018), section 3 and appendix: the factored-out half at each split has a diagonal
Gaussian whose mean and log-scale come from a zero-initialised convolution of the kept half
(Dinh et al., 2017, RealNVP section 3.6 "multi-scale architecture"); the top latent has a learned
per-position Gaussian (``learn_top``), optionally conditioned on the class label (paper section 5,
class-conditional CIFAR-10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ZeroConv2d, float32

LOG_2PI = math.log(2 * math.pi)


@float32
def gaussian_log_prob(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Sum over (C, H, W) of log N(z; mean, exp(logs)^2), in nats: (B, C, H, W) -> (B,)."""
    return (-0.5 * (LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))).flatten(1).sum(1)


def gaussian_sample(mean: Tensor, logs: Tensor, temperature: float, generator=None) -> Tensor:
    """Draw from N(mean, (temperature * exp(logs))^2); temperature 0 returns the mean."""
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return mean + temperature * torch.exp(logs) * eps


class SplitPrior(nn.Module):
    """p(z | h) at a split: (B, C, H, W) kept half -> mean, logs of the factored-out half."""

    def __init__(self, kept_channels: int, out_channels: int):
        super().__init__()
        self.conv = ZeroConv2d(kept_channels, 2 * out_channels)

    @float32
    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self.conv(h).chunk(2, dim=1)
        return mean, logs


class TopPrior(nn.Module):
    """p(z_top | y): learned per-position mean and log-scale (``learn_top``), plus a class term.

    With ``learn_top=False`` and no classes it is a standard normal. With ``num_classes > 0`` a
    zero-initialised linear map of the one-hot label adds a per-channel mean and log-scale.
    """

    def __init__(self, channels: int, size: int, learn_top: bool = True, num_classes: int = 0):
        super().__init__()
        self.channels, self.size, self.num_classes = channels, size, num_classes
        self.learned = nn.Parameter(torch.zeros(1, 2 * channels, size, size)) if learn_top else None
        self.class_proj = nn.Linear(num_classes, 2 * channels) if num_classes > 0 else None
        if self.class_proj is not None:
            nn.init.zeros_(self.class_proj.weight)
            nn.init.zeros_(self.class_proj.bias)

    @float32
    def forward(self, batch_size: int, device: torch.device, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = torch.zeros(batch_size, 2 * self.channels, self.size, self.size, device=device)
        if self.learned is not None:
            h = h + self.learned
        if self.class_proj is not None:
            if labels is None:
                raise ValueError("this Glow is class-conditional (num_classes > 0): pass `labels`")
            one_hot = F.one_hot(labels.long(), self.num_classes).float()
            h = h + self.class_proj(one_hot)[:, :, None, None]
        mean, logs = h.chunk(2, dim=1)
        return mean, logs
