"""GlowEMA: an exponential moving average of the weights, on Lightning's ``EMAWeightAveraging``.

Lightning's callback keeps a ``torch.optim.swa_utils.AveragedModel`` of the whole LightningModule,
updates it after every optimizer step, swaps it in for validation, copies it into the model when
training ends and writes it to the checkpoint's ``state_dict`` (the raw weights go to
``current_model_state``; a resumed fit restores both). So every consumer of a checkpoint
(``glow test`` / ``predict`` / ``sample``, ``Glow.from_checkpoint``) gets the EMA weights.

What this subclass adds for Glow:

- Off unless ``decay`` is set (one config line: ``ema: {decay: 0.999}`` or ``--ema.decay 0.999``).
- Only parameters are averaged (``use_buffers=False``): the flow's buffers are constants (LU masks and
  signs, permutations) and ActNorm's ``initialized`` flag, which an EMA formula would round or truncate.
  Lightning's swap and final copy move buffers too, so the average's buffers are set to the module's
  once ActNorm is initialised (``on_train_start``); from then on both hold the same constants.
- No swap or copy before the first update (the average is then a copy taken before ActNorm's
  data-dependent initialisation, e.g. during Lightning's sanity check).
- :func:`averaged_weights`: a context manager for other callbacks (image grids) to run with the
  EMA weights whenever they are not already swapped in.

Private library API used here (check on upgrades): ``WeightAveraging._average_model``, ``_swap_models``,
``_copy_average_to_current``.

The 1x1 convolution's eval cache compares weights by value, so swaps through ``.data.copy_``
(which do not bump tensor versions) still refresh its inverse and log-determinant.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from typing_extensions import override


def warmed_up_decay(decay: float, num_averaged: torch.Tensor) -> torch.Tensor:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's ExponentialMovingAverage with
    ``num_updates``): 0.18, 0.25, 0.31, ... at first, ``decay`` after ``(10 decay - 1) / (1 - decay)`` updates
    (8,990 for 0.999). A tensor on the parameters' device: no host sync."""
    n = num_averaged.to(torch.float64)
    return torch.clamp((1 + n) / (10 + n), max=decay).to(torch.float32)


@torch.no_grad()
def ema_multi_update(ema_params: list, current_params: list, num_averaged: torch.Tensor, decay: float,
                     warmup: bool = True) -> None:  # fmt: skip
    """``ema = d ema + (1 - d) current`` over all parameters at once (foreach, in place), ``d`` = ``decay`` or,
    with ``warmup``, :func:`warmed_up_decay`. Module-level, so the callback pickles (``ddp_spawn``)."""
    d = warmed_up_decay(decay, num_averaged) if warmup else decay
    torch._foreach_sub_(ema_params, current_params)  # ema - current
    torch._foreach_mul_(ema_params, d)  # d (ema - current)
    torch._foreach_add_(ema_params, current_params)  # d ema + (1 - d) current


class GlowEMA(EMAWeightAveraging):
    """Exponential moving average of the weights, used for validation, test, prediction and sampling.

    Args:
        decay: EMA decay per update (e.g. 0.999); None = EMA off.
        update_every_n_steps: update the average every this many optimizer steps.
        update_starting_at_step: first optimizer step (0-based) that updates the average (None = 0).
        device: where to keep the average (None = the model's device; ``cpu`` saves GPU memory).
        warmup: the decay grows as ``min(decay, (1 + n) / (10 + n))`` over the first ``n`` updates, so that the
            average of a short run is not mostly its first weights (false: ``decay`` from the first update; a
            one-minute MNIST run with 0.999 then validated at the weights of its first ~500 steps).
    """

    def __init__(
        self,
        *,
        decay: float | None = None,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
        warmup: bool = True,
    ):
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay (--ema.decay) must be in [0, 1), got {decay!r}")
        if update_every_n_steps < 1:
            raise ValueError(f"ema update_every_n_steps must be >= 1, got {update_every_n_steps!r}")
        super().__init__(
            device=device,
            use_buffers=False,
            decay=0.0 if decay is None else decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        # Lightning's averaging function is torch's get_ema_avg_fn: a closure, so the callback could not be pickled
        # and `--trainer.strategy ddp_spawn` failed before training ("Can't pickle local object ... ema_update"),
        # and a per-parameter function, which torch calls in a Python loop. This one is module-level and foreach.
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = functools.partial(
            ema_multi_update, decay=0.0 if decay is None else decay, warmup=warmup
        )
        self.decay, self.warmup = decay, warmup
        self.swapped = False  # True while the module holds the EMA weights and the average the raw ones

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    def has_average(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled:
            super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """ActNorm is initialised by now (GlowModule.on_fit_start): give the average the module's buffers."""
        if self._average_model is not None:
            with torch.no_grad():
                for average, current in zip(self._average_model.module.buffers(), pl_module.buffers()):
                    average.copy_(current)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enabled:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        if self.has_average():
            if self.swapped:
                self.swap(pl_module)
            self._copy_average_to_current(pl_module)

    def swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the module's weights with the average's (EMA in <-> raw in)."""
        self._swap_models(pl_module)
        self.swapped = not self.swapped

    @override
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.has_average() and not self.swapped:
            self.swap(pl_module)

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.swapped:
            self.swap(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() if self.enabled else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled and "latest_update_step" in state_dict:
            super().load_state_dict(state_dict)

    @override
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self.has_average():
            return
        if not self.swapped:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # the module holds the EMA weights (state_dict is already them); the raw ones are in the average
        average_state = self._average_model.state_dict()
        checkpoint["current_model_state"] = {
            k[7:]: v.clone() for k, v in average_state.items() if k.startswith("module.")
        }
        checkpoint["averaging_state"] = {k: v for k, v in average_state.items() if not k.startswith("module.")}

    @override
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # outside fit there is no average to restore: the checkpoint's state_dict already holds the EMA weights
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


@contextlib.contextmanager
def averaged_weights(trainer: L.Trainer, pl_module: L.LightningModule):
    """Run the block with the EMA weights in ``pl_module`` when a GlowEMA holds an average that is not in use.

    For callbacks that sample or reconstruct during fit; a no-op without EMA, outside fit (the
    loaded weights are already the EMA ones) and while validation has swapped them in.
    """
    ema = next((c for c in trainer.callbacks if isinstance(c, GlowEMA)), None)
    if ema is None or not ema.has_average() or ema.swapped:
        yield
        return
    ema.swap(pl_module)
    try:
        yield
    finally:
        ema.swap(pl_module)
