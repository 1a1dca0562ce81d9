"""Counter-based noise: every random number of the data pipeline as a pure function of (seed, stream, index).

A 32-bit integer mixer hashes (seed, stream, image index) into one key per image, and each key into
uniform noise per pixel (in the spirit of Salmon et al., 2011, "Parallel random numbers: as easy as
1, 2, 3"). Nothing depends on a generator's state, so a value does not change with the worker count,
the number of devices, the batch an image lands in, or a resume.

Streams: training uses the epoch number; evaluation (val / test / predict) uses :data:`EVAL_STREAM`,
and extra evaluation draws (importance-weighted bounds) ``EVAL_STREAM + s``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
EVAL_STREAM = 0x7FFF_FFF0  # noise stream of val / test / predict (training uses the epoch number)
FLIP_SALT = 0x68E3_1DA4  # keys of the flips differ from those of the noise


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (int64 tensors holding values < 2**32), vectorised on any device."""
    return _hash32_(x & _MASK32)


def _hash32_(x):
    """:func:`hash32` of a value already < 2**32: an int64 tensor in place (the data pipeline's hot path: 4
    allocations instead of 11), or a Python int (the same value, no tensor op)."""
    for _ in range(2):
        x ^= x >> 16
        x *= 0x045D9F3B
        x &= _MASK32
    x ^= x >> 16
    return x


def item_keys(seed: int, stream: int, index: Tensor) -> Tensor:
    """One 32-bit key per image from (seed, stream, index): (B,) int64."""
    key = _hash32_(_hash32_(seed & _MASK32) ^ (stream & _MASK32))  # Python ints: the same for every image
    return _hash32_((index & _MASK32) ^ key)


def uniform_from_keys(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per-key deterministic U(0, 1) noise of ``shape`` per key: (B,) -> (B, *shape), float32."""
    numel = 1
    for s in shape:
        numel *= s
    pos = torch.arange(numel, device=keys.device, dtype=torch.int64)
    h = keys[:, None] + pos * 0x9E3779B9  # (B, numel)
    h = _hash32_(h.bitwise_and_(_MASK32)).bitwise_right_shift_(8)
    u = h.float().add_(0.5).div_(2**24)  # strictly inside (0, 1)
    return u.view(keys.shape[0], *shape)


def flip_mask(seed: int, stream: int, index: Tensor) -> Tensor:
    """Which images to mirror: about half, a function of (seed, stream, index): (B,) bool."""
    return flip_from_keys(item_keys(seed, stream, index))


def flip_from_keys(keys: Tensor) -> Tensor:
    """:func:`flip_mask` from the images' :func:`item_keys` (the data pipeline computes them once per batch)."""
    return (_hash32_(keys ^ FLIP_SALT) & 1).bool()  # keys and the salt are < 2**32: so is their xor
