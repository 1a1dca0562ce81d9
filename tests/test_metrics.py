"""BitsPerDim: sums of bits and dimensions, so batches (and DDP ranks) combine exactly."""

from __future__ import annotations

import math

import torch

from glow_lightning.metrics import BitsPerDim


def test_bits_per_dim_matches_formula_and_combines_batches_exactly():
    log_prob = torch.tensor([-2000.0, -2100.0, -1900.0, -2500.0])
    dims, n_bits = 3072, 8
    expected = (-log_prob / (dims * math.log(2)) + n_bits).mean()
    metric = BitsPerDim()
    metric.update(log_prob[:1], dims, n_bits)
    metric.update(log_prob[1:], dims, n_bits)
    assert torch.allclose(metric.compute(), expected)
    # two "ranks" holding uneven parts, merged as torchmetrics does with dist_reduce_fx="sum"
    a, b = BitsPerDim(), BitsPerDim()
    a.update(log_prob[:3], dims, n_bits)
    b.update(log_prob[3:], dims, n_bits)
    a.merge_state(b)
    assert torch.allclose(a.compute(), expected)
