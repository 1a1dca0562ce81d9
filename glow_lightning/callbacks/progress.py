"""GlowProgressBar: Lightning's TQDM bar, showing ``train/bpd`` without a host-device sync every batch.

Lightning converts every ``prog_bar=True`` metric logged on step to a Python number (``.item()``) after each
training batch, whether a bar is shown or not: one host-device sync per batch (issue 17 item 2). So
``train/bpd`` is logged with ``prog_bar=False`` and this bar reads it itself, from ``trainer.callback_metrics``,
after the steps that log it (:func:`~glow_lightning.metrics.logs_at`: the first, then every ``log_every_n_steps``,
when the loggers read it too) and at the end of an epoch;
between refreshes it shows the last value read.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from ..metrics import logs_at

SHOWN = ("train/bpd",)  # logged on step without prog_bar; shown on the bar


class GlowProgressBar(TQDMProgressBar):
    """TQDM progress bar with ``train/bpd`` refreshed every ``log_every_n_steps`` (no sync per batch).

    Args:
        refresh_rate: redraw the bar every this many batches (as Lightning's ``TQDMProgressBar``).
        leave: leave the finished epoch's bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._shown: dict[str, float] = {}
        self._in_batch = False

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch = False

    @override
    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        due = not self._in_batch or logs_at(trainer, trainer.global_step - 1)  # the step just done logged it
        if due:
            metrics = trainer.callback_metrics
            self._shown.update({k: float(metrics[k]) for k in SHOWN if k in metrics})  # a sync, every N steps
        items.update(self._shown)
        return items
