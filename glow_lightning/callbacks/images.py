"""Image-grid callbacks: samples, reconstructions and latent interpolations during training.

Each callback runs at the end of every ``every_n_epochs``-th training epoch, on rank 0 only, with the
model in eval mode, with the EMA weights when EMA is on, and no gradients (train mode is restored after), and hands its grids to
:func:`log_image_grid`: to every active logger (W&B ``log_image``, TensorBoard ``add_image``) and,
always, to a PNG file ``<default_root_dir>/images/<name>_epoch<NNN>.png``. The PNG files are upscaled
``scale`` times (nearest neighbour) and carry a header row with the grid's caption (``T=0.7``,
``target | reconstruction``, ``linear interpolation``); the loggers get the plain grid (W&B shows the
caption under it, TensorBoard's ``add_image`` has none). The maths lives in
:mod:`glow_lightning.flow.visualize` (the same grid builders as ``glow reconstruct`` / ``interpolate``);
the images come from the datamodule's ``fixed_images`` (fixed, deterministic picks from its
validation split, prepared without flips).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..flow.visualize import Interpolation, image_grid, interpolation_grid, reconstruction_grid
from ..io import join, save_grid
from .ema import averaged_weights

Split = Literal["train", "val", "test"]


def images_dir(trainer: L.Trainer) -> str:
    """Where a run's image grids go: ``<trainer.default_root_dir>/images``."""
    return join(trainer.default_root_dir, "images")


@rank_zero_only
def log_image_grid(trainer: L.Trainer, name: str, grid: Tensor, *, caption: str | None = None, scale: int = 1) -> str:
    """Send an image grid to every active logger and save it as ``images/<name>_epoch<NNN>.png``.

    Args:
        trainer: the running trainer (its loggers, epoch, step and ``default_root_dir``).
        name: the grid's name, e.g. ``samples/t0.7``; loggers get it as is, the file name with ``/`` -> ``_``.
        grid: (3, H, W) floats in [0, 1], e.g. from :func:`glow_lightning.flow.visualize.image_grid`.
        caption: shown under the image by loggers that support captions (W&B), and as the PNG file's header row.
        scale: the PNG file's nearest-neighbour upscaling (the loggers get the grid as it is).

    Returns:
        The path of the PNG file written (on rank 0; other ranks do nothing and get None).
    """
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=name, images=[grid], step=step, **({"caption": [caption]} if caption else {}))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(name, grid, global_step=step)
    filename = f"{name.replace('/', '_')}_epoch{trainer.current_epoch:03d}.png"
    return save_grid(grid, f"{images_dir(trainer)}/{filename}", scale=scale, header=caption)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the previous train/eval mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def labels_of(flow, batch: dict) -> Tensor | None:
    return batch["label"] if flow.num_classes else None


class _EpochImages(Callback):
    """Runs :meth:`grids` every ``every_n_epochs`` training epochs (0 = never), on rank 0, in eval mode."""

    def __init__(self, every_n_epochs: int, scale: int = 1):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an integer >= 0 (0 = off), got {every_n_epochs!r}")
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
        self.every_n_epochs, self.scale = every_n_epochs, scale
        self.last_files: list[str] = []

    def grids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[tuple[str, Tensor, str]]:
        raise NotImplementedError

    def images(self, trainer: L.Trainer, split: Split, num_images: int, device: torch.device) -> dict | None:
        """Fixed images of the trainer's datamodule, or None (with a warning) where there are none."""
        datamodule = getattr(trainer, "datamodule", None)
        try:
            if not hasattr(datamodule, "fixed_images"):
                raise ValueError(f"real images need a glow_lightning datamodule, got {type(datamodule).__name__}")
            return datamodule.fixed_images(split, num_images, device)
        except ValueError as err:
            rank_zero_warn(f"{type(self).__name__}: no images ({err})")
            return None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        with averaged_weights(trainer, pl_module), eval_mode(pl_module):  # EMA weights when they are on
            self.last_files = [
                log_image_grid(trainer, name, grid, caption=caption, scale=self.scale)
                for name, grid, caption in self.grids(trainer, pl_module)
            ]


class SampleImages(_EpochImages):
    """Random samples, one grid per temperature, drawn from the same fixed noise every epoch.

    Args:
        temperatures: prior temperatures (paper section 5: lower is smoother, 1 is the model's density).
        num_samples: images per grid.
        nrow: images per grid row.
        every_n_epochs: draw every this many training epochs (0 = off).
        seed: seed of the sampling noise; fixed, so successive epochs decode the same latents and
            training's random number streams are not touched.
        scale: nearest-neighbour upscaling of the PNG files (``4``: each pixel a 4x4 block).
    """

    def __init__(
        self,
        *,
        temperatures: Sequence[float] = (0.5, 0.7, 1.0),
        num_samples: int = 64,
        nrow: int = 8,
        every_n_epochs: int = 1,
        seed: int = 0,
        scale: int = 1,
    ):
        super().__init__(every_n_epochs, scale)
        if any(not t >= 0 for t in temperatures):
            raise ValueError(f"temperatures must be >= 0, got {list(temperatures)!r}")
        if num_samples < 1 or nrow < 1:
            raise ValueError(f"num_samples and nrow must be >= 1, got {num_samples!r} and {nrow!r}")
        self.temperatures, self.num_samples, self.nrow, self.seed = list(temperatures), num_samples, nrow, seed

    @override
    def grids(self, trainer, pl_module):
        flow = pl_module.flow
        labels, classes = None, ""
        if flow.num_classes:  # class k in column k (mod nrow) when nrow == num_classes
            labels = torch.arange(self.num_samples, device=flow.device) % flow.num_classes
            classes = f", classes 0-{flow.num_classes - 1} in turn"
        for t in self.temperatures:
            g = torch.Generator(device=flow.device).manual_seed(self.seed)
            images = flow.sample(self.num_samples, temperature=t, labels=labels, generator=g)
            yield f"samples/t{float(t)}", image_grid(images, flow.n_bits, self.nrow), f"T={t:g}{classes}"


class ReconstructionImages(_EpochImages):
    """Fixed validation images beside their reconstructions decode(encode(x)) (equal after quantization).

    Args:
        num_images: validation images shown (the split's first ones).
        pairs_per_row: (target, reconstruction) pairs per grid row.
        split: the datamodule split the images come from.
        every_n_epochs: run every this many training epochs (0 = off).
        scale: nearest-neighbour upscaling of the PNG files.
    """

    def __init__(
        self,
        *,
        num_images: int = 16,
        pairs_per_row: int = 4,
        split: Split = "val",
        every_n_epochs: int = 1,
        scale: int = 1,
    ):
        super().__init__(every_n_epochs, scale)
        if num_images < 1 or pairs_per_row < 1:
            raise ValueError(f"num_images and pairs_per_row must be >= 1, got {num_images!r} and {pairs_per_row!r}")
        self.num_images, self.pairs_per_row, self.split = num_images, pairs_per_row, split

    @override
    def grids(self, trainer, pl_module):
        flow = pl_module.flow
        batch = self.images(trainer, self.split, self.num_images, flow.device)
        if batch is None:
            return
        grid = reconstruction_grid(flow, batch["bins"], labels_of(flow, batch), self.pairs_per_row)
        yield "reconstructions", grid, "target | reconstruction"


class InterpolationImages(_EpochImages):
    """Rows of images decoded along a path between the latents (all levels) of fixed pairs of images.

    Image i of the split is paired with image ``pairs + i``; each row starts and ends with the pair's
    reconstructions.

    Args:
        pairs: pairs of validation images, one grid row each.
        steps: images per row, both endpoints included.
        method: ``linear`` (the paper's figure 5) or ``spherical`` (slerp) interpolation.
        split: the datamodule split the images come from.
        every_n_epochs: run every this many training epochs (0 = off).
        scale: nearest-neighbour upscaling of the PNG files.
    """

    def __init__(
        self,
        *,
        pairs: int = 4,
        steps: int = 8,
        method: Interpolation = "linear",
        split: Split = "val",
        every_n_epochs: int = 1,
        scale: int = 1,
    ):
        super().__init__(every_n_epochs, scale)
        if pairs < 1 or steps < 2:
            raise ValueError(f"pairs must be >= 1 and steps >= 2, got {pairs!r} and {steps!r}")
        self.pairs, self.steps, self.method, self.split = pairs, steps, method, split

    @override
    def grids(self, trainer, pl_module):
        flow = pl_module.flow
        batch = self.images(trainer, self.split, 2 * self.pairs, flow.device)
        pairs = batch["bins"].shape[0] // 2 if batch is not None else 0
        if pairs == 0:
            rank_zero_warn(f"InterpolationImages: the {self.split!r} split has fewer than 2 images")
            return
        bins, labels = batch["bins"][: 2 * pairs], labels_of(flow, batch)
        labels = labels[: 2 * pairs] if labels is not None else None
        grid = interpolation_grid(flow, bins, self.steps, self.method, labels)
        yield f"interpolations/{self.method}", grid, f"{self.method} interpolation"
