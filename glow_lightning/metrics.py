"""Bits per dimension as a torchmetrics Metric, exact across DDP ranks.

bits/dim = -log p(x) / (D ln 2) + n_bits (Glow paper, section 5; Theis et al., 2016, for the
discretization offset). The states are sums of bits and of dimensions, reduced with "sum", so the
value over several ranks equals the value over one.

:func:`logs_at`: the training steps whose on-step metrics are logged (Lightning writes them to the loggers
every ``log_every_n_steps`` only; each ``self.log`` call costs ~1 ms of Python on a CPU, see BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def logs_at(trainer, step: int) -> bool:
    """Whether the training batch of optimizer step ``step`` (0-based) logs its on-step metrics: the first step,
    the steps after which Lightning writes to the loggers (every ``log_every_n_steps``), and a stopping step."""
    return step == 0 or (step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop


class BitsPerDim(Metric):
    """Average bits/dim over every image seen: sum of bits / sum of dimensions."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("bits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dims", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_prob: Tensor, dims: int, n_bits: int) -> None:
        """Add a batch: ``log_prob`` (B,) in nats of the dequantized images, D = ``dims`` per image."""
        log_prob = log_prob.detach().double()
        self.bits += (-log_prob / math.log(2) + dims * n_bits).sum()
        self.dims += log_prob.numel() * dims

    def compute(self) -> Tensor:
        return (self.bits / self.dims).float()
