"""GlowModule: the LightningModule that trains a :class:`~glow_lightning.flow.Glow`.

It holds no flow maths: the loss is the flow's bits/dim (Kingma & Dhariwal, 2018, section 5), the
optimizer is Adam (or Adamax) with linear warmup (the paper's lr 1e-3 with warmup), and ActNorm's
data-dependent initialisation runs once, at the start of fit, from training data (DESIGN.md rule 1).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from typing_extensions import override

from .flow import Glow
from .flow.glow import ARCH_KEYS, CompileMode
from .flow.layers import Coupling, Permutation
from .metrics import BitsPerDim


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (another architecture)."""


class GlowModule(L.LightningModule):
    """Train Glow on images; the loss is bits per dimension.

    Args:
        in_channels: image channels (linked from the datamodule).
        image_size: image height and width (linked from the datamodule).
        levels: number of levels L of the multi-scale flow.
        steps_per_level: flow steps K per level.
        hidden_channels: width of the coupling networks.
        coupling: ``affine`` or ``additive`` coupling.
        permutation: ``invconv_lu``, ``invconv``, ``reverse`` or ``shuffle``.
        learn_top: learn the top prior's mean and log-scale.
        n_bits: bits per colour channel (linked from the datamodule).
        num_classes: > 0 for a class-conditional top prior (linked from the datamodule).
        optimizer: ``adam`` (default) or ``adamax`` (as in openai/glow).
        lr: peak learning rate, reached after the warmup.
        weight_decay: L2 penalty added by the optimizer (0 = off).
        warmup_steps: optimizer steps of linear learning-rate warmup from 0 (0 = off).
        schedule: after the warmup, keep the learning rate ``constant`` or decay it to zero with a
            ``cosine`` over the rest of training (needs max_steps or max_epochs).
        init_batch_size: training images used for ActNorm's data-dependent initialisation.
        compile: ``torch.compile`` each flow step for training (``true`` or a mode: ``default``,
            ``reduce-overhead``, ``max-autotune``); see BENCHMARKS.md.
        memory_saving: recompute each flow step in the backward pass instead of storing its activations.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        levels: int = 3,
        steps_per_level: int = 32,
        hidden_channels: int = 512,
        coupling: Coupling = "affine",
        permutation: Permutation = "invconv_lu",
        learn_top: bool = True,
        n_bits: int = 8,
        num_classes: int = 0,
        optimizer: Literal["adam", "adamax"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        schedule: Literal["constant", "cosine"] = "constant",
        init_batch_size: int = 256,
        compile: bool | CompileMode = False,
        memory_saving: bool = False,
    ):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if init_batch_size < 1:
            raise ValueError(f"init_batch_size must be >= 1, got {init_batch_size!r}")
        self.save_hyperparameters()
        self.flow = Glow(**{k: self.hparams[k] for k in ARCH_KEYS}, compile=compile, memory_saving=memory_saving)
        self.train_bpd, self.val_bpd, self.test_bpd = BitsPerDim(), BitsPerDim(), BitsPerDim()

    # ------------------------------------------------------------------ steps
    def _labels(self, batch: dict) -> torch.Tensor | None:
        return batch["label"] if self.flow.num_classes else None

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        log_prob = self.flow.log_prob(batch["x"], self._labels(batch))  # (B,) nats
        metric = getattr(self, f"{stage}_bpd")
        if stage == "train":
            metric(log_prob, self.flow.dims, self.flow.n_bits)  # forward: keeps the batch value for on_step
        else:
            metric.update(log_prob, self.flow.dims, self.flow.n_bits)
        self.log(f"{stage}/bpd", metric, on_step=stage == "train", on_epoch=True, prog_bar=True)
        return (-log_prob / (self.flow.dims * math.log(2))).mean() + self.flow.n_bits

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}: "
                "lower the learning rate or raise warmup_steps"
            )
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        bpd = self.flow.bits_per_dim(batch["x"], self._labels(batch))
        return {"index": batch["index"], "label": batch["label"], "bpd": bpd}

    # ------------------------------------------------------------ data init
    @override
    def on_fit_start(self) -> None:
        """ActNorm's data-dependent init: once, on training data, identical on every rank; not on resume."""
        if self.flow.is_initialized:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "init_batch"):
            raise RuntimeError(
                "ActNorm needs a data-dependent initialisation: train with a glow_lightning datamodule, "
                "or call module.flow.initialize(images) before trainer.fit()"
            )
        batch = datamodule.init_batch(self.hparams.init_batch_size, self.device)
        self.flow.initialize(batch["x"], self._labels(batch))

    # ------------------------------------------------------------- optimizer
    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step``: linear warmup, then the schedule."""
        warmup = self.hparams.warmup_steps
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if self.hparams.schedule == "cosine" and step >= warmup:
            total = max(self.trainer.estimated_stepping_batches, warmup + 1)
            progress = min(1.0, (step - warmup) / (total - warmup))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer_class = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[self.hparams.optimizer]
        optimizer = optimizer_class(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture, naming the hyperparameters that differ."""
        saved = checkpoint.get("hyper_parameters", {})
        differ = {k: (saved[k], self.hparams[k]) for k in ARCH_KEYS if k in saved and saved[k] != self.hparams[k]}
        if differ:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs this model {b!r}" for k, (a, b) in differ.items())
            raise CheckpointMismatchError(f"the checkpoint was trained with another architecture ({lines})")
