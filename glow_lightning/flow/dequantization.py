"""Variational dequantization (Ho et al., 2019, "Flow++", section 3.1), in pure PyTorch.

Uniform dequantization trains the flow on ``x = (k + u) / 2**n_bits`` with ``u ~ U(0, 1)``; the
variational one draws ``u ~ q(u | k)`` from a small conditional flow instead and trains both jointly
on the variational bound (Flow++ eq. 12)::

    log P(k) >= E_q[ log p(x) - log q_x(x | k) ],   q_x(x | k) = 2**(n_bits D) q(u | k)

so with ``log_prob`` of the model in nats, ``-(log p(x) - log q(u | k)) / (D ln 2) + n_bits`` is the
bound in bits/dim: the usual bits/dim formula applied to ``log p(x) - log q(u | k)``. For uniform
dequantization ``log q(u | k) = 0`` and the formula is the plain one.

q is a flow on ``R^D``, mapped into the unit cube by a sigmoid: base noise ``eps ~ Logistic(0, 1)``
(the logit of a U(0, 1) draw, so the datamodule's uniform noise is the base noise and evaluation
stays a function of (seed, image index)), a few checkerboard affine couplings conditioned on
features of the bin image, then ``u = sigmoid(h)``. The couplings start at the identity, and
``sigmoid(Logistic)`` is exactly U(0, 1): at initialisation q *is* uniform dequantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import float32
from .quantize import bins_to_unit

U_MAX = 1.0 - 2.0**-16  # keeps (k + u) / 2**n_bits inside bin k in float32 for every k < 2**8


def checkerboard(height: int, width: int, parity: int, like: Tensor) -> Tensor:
    """A (1, 1, H, W) 0/1 checkerboard; ``parity`` 0 or 1 chooses which squares are 1."""
    i = torch.arange(height, device=like.device)[:, None]
    j = torch.arange(width, device=like.device)[None, :]
    return ((i + j + parity) % 2).to(like.dtype)[None, None]


@float32
def logistic_log_prob(eps: Tensor) -> Tensor:
    """Sum over (C, H, W) of log Logistic(eps; 0, 1) = log sigmoid'(eps): (B, C, H, W) -> (B,)."""
    return (-F.softplus(-eps) - F.softplus(eps)).flatten(1).sum(1)


class ConditionalCoupling(nn.Module):
    """Checkerboard affine coupling ``y = m*h + (1-m)*(h*exp(log_s) + shift)``, NN sees ``m*h`` and the context."""

    def __init__(self, channels: int, context_channels: int, hidden_channels: int, parity: int):
        super().__init__()
        self.parity = parity
        self.net = nn.Sequential(
            nn.Conv2d(channels + context_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 2 * channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # starts at the identity
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        mask = checkerboard(h.shape[2], h.shape[3], self.parity, h)  # (1, 1, H, W)
        shift, raw = self.net(torch.cat([h * mask, context], dim=1)).chunk(2, dim=1)
        log_s = torch.tanh(raw) * (1 - mask)  # |log_s| < 1 per step: stable at any learning rate
        y = h * mask + (1 - mask) * (h * torch.exp(log_s) + shift)
        return y, log_s.flatten(1).sum(1)


class VariationalDequantizer(nn.Module):
    """q(u | k): uniform noise -> dequantization noise u in (0, 1) conditioned on the bins k.

    Args:
        in_channels: image channels.
        n_bits: bits per channel of the bins.
        hidden_channels: width of the context and coupling networks.
        steps: number of conditional couplings (alternating checkerboards).
    """

    def __init__(self, in_channels: int = 3, n_bits: int = 8, hidden_channels: int = 32, steps: int = 4):
        super().__init__()
        self.n_bits = n_bits
        self.context = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
        )
        self.couplings = nn.ModuleList(
            ConditionalCoupling(in_channels, hidden_channels, hidden_channels, parity=i % 2) for i in range(steps)
        )

    def forward(self, bins: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Integer bins (B, C, H, W) and U(0, 1) noise of the same shape -> (u in (0, 1), log q(u | k) in nats (B,))."""
        noise = noise.clamp(2.0**-20, 1.0 - 2.0**-20)
        eps = torch.logit(noise)  # Logistic(0, 1)
        log_q = logistic_log_prob(eps)
        context = self.context(bins_to_unit(bins, self.n_bits, offset=0.5).to(noise.dtype) - 0.5)
        h = eps
        for coupling in self.couplings:
            h, logdet = coupling(h, context)
            log_q = log_q - logdet
        log_q = log_q - logistic_log_prob(h)  # log sigmoid'(h), the Jacobian of u = sigmoid(h)
        return torch.sigmoid(h).clamp(max=U_MAX), log_q


def unit_noise(x: Tensor, bins: Tensor, n_bits: int) -> Tensor:
    """The uniform noise inside dequantized images: ``x * 2**n_bits - k`` in [0, 1] (exact in float32)."""
    return x * 2**n_bits - bins.to(x.dtype)


def dequantize(bins: Tensor, u: Tensor, n_bits: int) -> Tensor:
    """``(k + u) / 2**n_bits``, computed as the datamodule does (k / 2**n_bits + u / 2**n_bits)."""
    return bins_to_unit(bins, n_bits) + u / 2**n_bits
