"""FIDMonitor: log ``val/fid`` of a few samples every k epochs during fit (off by default).

A cheap trend line, not a figure to publish: FID at small N is biased upward (FID-4k is larger than
FID-50k; STARFlow, Gu et al. 2025, notes it) and the 2048-d pool3 covariance is singular below N = 2,048.
The callback says so once. For a number comparable with papers: ``glow fid --num_samples 50000``.

Samples come from a fixed seed (the same latents every time, training's random streams untouched),
with the EMA weights when EMA is on, on rank 0 only; the real split's features are computed once
per fit (and cached on disk, :func:`glow_lightning.fid.real_features`). The maths is torchmetrics'
(:mod:`glow_lightning.fid`).
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..fid import feature_extractor, fid_score, real_features, sample_features, small_n_note
from .ema import averaged_weights
from .images import Split, eval_mode


class FIDMonitor(L.Callback):
    """Log ``val/fid`` of ``num_samples`` samples against the datamodule's ``split`` every ``every_n_epochs``.

    Args:
        every_n_epochs: compute at the end of every this many validation epochs (0 = off).
        num_samples: samples per evaluation (small: see the bias warning).
        temperature: prior temperature of the samples.
        split: the real images (all of the split).
        feature: Inception-v3 features (64, 192, 768, 2048), or the import path of an ``nn.Module`` class
            mapping uint8 (B, 3, H, W) images to (B, d) features.
        feature_weights: a local file of torch-fidelity's Inception weights (offline use).
        batch_size: images per batch, for sampling and for the feature extractor.
        cache_dir: where the real features are cached (default: ``$GLOW_CACHE_DIR/fid``, else
            ``~/.cache/glow-lightning/fid``).
        seed: seed of the sampling noise (and the labels of a class-conditional model).
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 0,
        num_samples: int = 1000,
        temperature: float = 1.0,
        split: Split = "val",
        feature: int | str = 2048,
        feature_weights: str | None = None,
        batch_size: int = 250,
        cache_dir: str | None = None,
        seed: int = 0,
    ):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"val_fid every_n_epochs must be an integer >= 0 (0 = off), got {every_n_epochs!r}")
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"val_fid num_samples must be an integer >= 2, got {num_samples!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"val_fid batch_size must be an integer >= 1, got {batch_size!r}")
        if not temperature >= 0:
            raise ValueError(f"val_fid temperature must be >= 0, got {temperature!r}")
        if every_n_epochs and feature_weights is not None:
            from ..fid import check_weights_file

            check_weights_file(feature_weights)  # before training, not at the first evaluation
        self.every_n_epochs, self.num_samples, self.temperature, self.split = (
            every_n_epochs,
            num_samples,
            temperature,
            split,
        )
        self.feature, self.feature_weights, self.batch_size, self.seed = feature, feature_weights, batch_size, seed
        self.cache_dir = cache_dir
        self._extractor: torch.nn.Module | None = None
        self._real: torch.Tensor | None = None
        self._warned = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_epochs and stage == "fit" and trainer.is_global_zero:  # a missing extractor fails now
            self._extractor = feature_extractor(self.feature, self.feature_weights)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero or self._extractor is None:
            return
        flow = pl_module.flow
        extractor = self._extractor.to(flow.device)
        if self._real is None:
            from ..data.imagecheck import cache_dir as glow_cache_dir

            cache = os.path.join(glow_cache_dir(), "fid") if self.cache_dir is None else self.cache_dir
            self._real, _, _ = real_features(
                trainer.datamodule, self.split, extractor, flow.n_bits, cache_dir=cache,
                batch_size=self.batch_size, device=flow.device,
            )  # fmt: skip
        if not self._warned:
            note = small_n_note(self.num_samples, self._real.shape[1])
            if note:
                rank_zero_warn(f"val/fid: {note}; glow fid --num_samples 50000 gives the published protocol")
            self._warned = True
        with averaged_weights(trainer, pl_module), eval_mode(pl_module):  # the EMA weights when they are on
            g = torch.Generator(device=flow.device).manual_seed(self.seed)
            fake = sample_features(
                flow, extractor, self.num_samples, temperature=self.temperature, batch_size=self.batch_size,
                generator=g,
            )  # fmt: skip
        pl_module.log("val/fid", fid_score(self._real, fake), rank_zero_only=True)
