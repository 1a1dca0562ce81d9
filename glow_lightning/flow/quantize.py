"""Pixels <-> the flow's [0, 1] floats (DESIGN.md, "The flow's contract").

With ``n_bits`` bits per channel, pixel p (0..255) falls in bin ``k = floor(p / 2**(8 - n_bits))``;
the noise-free value is ``k / 2**n_bits`` and uniform dequantization adds U(0, 1 / 2**n_bits).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_n_bits(n_bits: int) -> int:
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")
    return n_bits


def pixels_to_bins(pixels: Tensor, n_bits: int) -> Tensor:
    """uint8 pixels (0..255) -> integer bins k (0..2**n_bits - 1), as int64."""
    return pixels.long() >> (8 - n_bits)


def bins_to_unit(bins: Tensor, n_bits: int, offset: float = 0.0) -> Tensor:
    """Bins k -> ``(k + offset) / 2**n_bits``; offset 0 is the bin's lower edge, 0.5 its centre."""
    return (bins.float() + offset) / 2**n_bits


def unit_to_bins(x: Tensor, n_bits: int) -> Tensor:
    """Flow floats -> bins ``k = clamp(floor(x * 2**n_bits), 0, 2**n_bits - 1)`` (int64)."""
    return torch.floor(x * 2**n_bits).clamp(0, 2**n_bits - 1).long()


def unit_to_pixels(x: Tensor, n_bits: int) -> Tensor:
    """Flow floats -> uint8 pixels ``k * 2**(8 - n_bits)``."""
    return (unit_to_bins(x, n_bits) << (8 - n_bits)).to(torch.uint8)


def unit_to_image(x: Tensor, n_bits: int) -> Tensor:
    """Flow floats -> display floats in [0, 1] (bin k -> k / (2**n_bits - 1)), for image grids."""
    return unit_to_bins(x, n_bits).float() / (2**n_bits - 1)
