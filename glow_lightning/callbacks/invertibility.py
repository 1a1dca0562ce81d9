"""InvertibilityMonitor: log how far ``decode(encode(x))`` is from ``x`` on a fixed validation batch.

The flow is invertible in exact arithmetic only; in float32 a badly conditioned 1x1 convolution or a
coupling scale near zero makes the round trip drift. A rising ``val/recon_error`` is the early sign
of the "input is not invertible" failures reported against public Glow code, long before the loss
turns NaN.
"""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override


class InvertibilityMonitor(L.Callback):
    """Log ``val/recon_error`` = max |decode(encode(x)) - x| on the first validation images.

    Args:
        every_n_epochs: check at the end of every this many validation epochs (0 = off).
        num_images: images of the first validation batch used (the same images every time).
    """

    def __init__(self, *, every_n_epochs: int = 1, num_images: int = 8):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an integer >= 0, got {every_n_epochs!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self._batch: dict | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return bool(self.every_n_epochs) and not trainer.sanity_checking

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._due(trainer):
            n = self.num_images
            self._batch = {"x": batch["x"][:n].detach(), "label": batch["label"][:n]}

    @torch.no_grad()
    def recon_error(self, pl_module) -> torch.Tensor:
        """max |decode(encode(x)) - x| over the kept batch (a 0-dim tensor on the device)."""
        flow, batch = pl_module.flow, self._batch
        labels = batch["label"] if flow.num_classes else None
        latents, _ = flow.encode(batch["x"], labels)
        return (flow.decode(latents) - batch["x"]).abs().max()

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._batch is None or not self._due(trainer):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            pl_module.log("val/recon_error", self.recon_error(pl_module), reduce_fx="max", sync_dist=True)
        self._batch = None
