"""GlowTrainer: Lightning's Trainer plus the ``glow sample / reconstruct / interpolate / manipulate / fid`` subcommands.

LightningCLI turns each method's typed arguments and docstring into ``glow <subcommand> --help``
(DESIGN.md: extra subcommands are Trainer methods); the docstring's first line is the subcommand's
one-line summary in ``glow --help`` (``fit`` / ``validate`` / ``test`` / ``predict`` get ours too). Each loads the weights of ``--ckpt_path``
(``torch.load(weights_only=True)``: no code in the file runs), works on the trainer's root device
(the GPU when there is one), writes one PNG grid and prints where. Each grid has a header row saying what
it shows (``T=0.7``, ``target | reconstruction``, ...); ``--scale N`` upscales it N times (nearest neighbour). Sampling draws from torch's
global generator, so ``--seed_everything S`` makes it reproducible.

Private library API used here (check on upgrades): ``_PLUGIN_INPUT``, the type of ``Trainer(plugins=...)``
(lightning.pytorch.trainer.connectors.accelerator_connector), repeated so the CLI documents ``--trainer.plugins``.
"""

from __future__ import annotations

import functools
import inspect
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.connectors.accelerator_connector import _PLUGIN_INPUT

from ..callbacks.images import Split, labels_of
from ..callbacks.progress import GlowProgressBar
from ..flow.quantize import bins_to_unit
from ..flow.visualize import Interpolation, image_grid, interpolation_grid, reconstruction_grid
from ..io import (
    AtomicCheckpointIO,
    NotWritableError,
    UnreadableCheckpointError,
    first_line,
    load_checkpoint_file,
    require_glow_checkpoint,
    save_grid,
)


def load_weights(model: L.LightningModule, ckpt_path: str) -> None:
    """Load a checkpoint's weights into ``model`` after checking the architecture (``on_load_checkpoint``)."""
    ckpt = require_glow_checkpoint(load_checkpoint_file(ckpt_path), ckpt_path)  # weights_only; errors name the file
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])


def _with_atomic_checkpoint_io(plugins):
    """``plugins`` plus an :class:`~glow_lightning.io.AtomicCheckpointIO` unless one of them is a CheckpointIO."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return list(plugins)  # the user's own checkpoint IO (async, cloud, ...) is left alone
    return [*plugins, AtomicCheckpointIO()]


def _summarized(method, summary: str):
    """A Trainer method under a one-line summary of ours: ``glow --help`` lists each subcommand by its docstring's
    first line, and Lightning's (``test``: "It's separated from fit to make sure you never run on your") are cut
    mid-sentence. The signature and the argument docs stay Lightning's."""

    @functools.wraps(method)
    def subcommand(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    subcommand.__doc__ = f"{summary}\n\n{inspect.cleandoc(method.__doc__ or '')}"
    return subcommand


class GlowTrainer(L.Trainer):
    """Lightning's Trainer with Glow's image subcommands (``glow sample``, ``reconstruct``, ``interpolate``).

    Checkpoints are written atomically and loaded with ``weights_only=True`` (:class:`~glow_lightning.io.AtomicCheckpointIO`)
    unless ``plugins`` holds a CheckpointIO of its own. The progress bar is
    :class:`~glow_lightning.callbacks.progress.GlowProgressBar` unless ``callbacks`` holds one of its own.
    """

    def __init__(self, *args, plugins: _PLUGIN_INPUT | list[_PLUGIN_INPUT] | None = None, **kwargs):
        callbacks = kwargs.get("callbacks")
        callbacks = (
            [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        )
        if kwargs.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, GlowProgressBar()]
        super().__init__(*args, plugins=_with_atomic_checkpoint_io(plugins), **kwargs)

    fit = _summarized(
        L.Trainer.fit, "Train a Glow; checkpoints, logs and image grids go to --trainer.default_root_dir."
    )
    validate = _summarized(L.Trainer.validate, "Report a checkpoint's bits/dim on the validation split.")
    test = _summarized(L.Trainer.test, "Report a checkpoint's bits/dim on the test split.")
    predict = _summarized(L.Trainer.predict, "Write each image's bits/dim (and its parts) to a CSV file.")

    def _prepare(self, model: L.LightningModule, ckpt_path: str) -> L.LightningModule:
        load_weights(model, ckpt_path)
        return model.to(self.strategy.root_device).eval()

    @staticmethod
    def _check_output(output: str, **per_row: int) -> None:
        """Before any work: ``--output`` names a PNG file (so it never replaces a checkpoint or a config),
        and the images-per-row options (and ``--scale``) are positive."""
        for name, value in per_row.items():
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not output.lower().endswith(".png"):
            raise ValueError(f"--output {output}: the grid is written as a PNG; give a file name ending in .png")
        if os.path.isdir(output):
            raise ValueError(f"--output {output} is a directory; give a file name ending in .png")

    def _write(self, grid: torch.Tensor, output: str, what: str, header: str, scale: int) -> str:
        try:
            save_grid(grid, output, scale=scale, header=header)
        except OSError as err:
            raise NotWritableError(f"--output {output} cannot be written ({first_line(err)})") from err
        print(f"wrote {what} to {output}")
        return output

    @torch.no_grad()
    def sample(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        ckpt_path: str,
        weights_only: bool | None = None,
        num_samples: int = 64,
        temperature: float = 0.7,
        label: int | None = None,
        nrow: int = 8,
        output: str = "samples.png",
        scale: int = 1,
    ) -> str:
        """Draw random images from a trained Glow and save them as a PNG grid.

        Works with ``--ckpt_path`` alone: the architecture comes from the checkpoint.

        Args:
            model: the GlowModule (architecture from the checkpoint).
            datamodule: not needed; accepted so that a training config can be reused.
            ckpt_path: checkpoint of a ``glow fit`` run, or ``last`` (``<default_root_dir>/checkpoints/last.ckpt``).
            weights_only: accepted so that the ``config.yaml`` a fit saved can be passed as it is; checkpoints are
                always loaded with ``weights_only=True``.
            num_samples: number of images.
            temperature: prior temperature (0 = the prior means; 1 = the model's density).
            label: class to draw from, for a class-conditional model (0..num_classes - 1).
            nrow: images per grid row.
            output: the PNG file to write.
            scale: nearest-neighbour upscaling of the PNG (``4``: each pixel a 4x4 block).
        """
        self._check_output(output, nrow=nrow, scale=scale)
        if not 0 <= temperature < float("inf"):  # before the checkpoint is loaded; named as the option
            raise ValueError(f"--temperature must be a number >= 0, got {temperature}")
        flow = self._prepare(model, ckpt_path).flow
        labels, header = None, f"T={temperature:g}"
        if label is not None:
            if not flow.num_classes:
                raise ValueError(f"--label {label}: this model is unconditional (trained without class labels)")
            if not 0 <= label < flow.num_classes:
                raise ValueError(f"--label {label} is out of range: this model has classes 0..{flow.num_classes - 1}")
            labels = torch.full((num_samples,), label, dtype=torch.long, device=flow.device)
            names = getattr(datamodule, "classes", None) or []
            header += f", class {label}" + (f" ({names[label]})" if label < len(names) else "")
        elif flow.num_classes:  # one class per column
            labels = torch.arange(num_samples, device=flow.device) % flow.num_classes
            header += f", classes 0-{flow.num_classes - 1} in turn"
        images = flow.sample(num_samples, temperature=temperature, labels=labels)
        grid = image_grid(images, flow.n_bits, nrow)
        return self._write(grid, output, f"{num_samples} samples at T={temperature:g}", header, scale)

    @torch.no_grad()
    def reconstruct(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        ckpt_path: str,
        weights_only: bool | None = None,
        num_images: int = 32,
        split: Split = "val",
        pairs_per_row: int = 4,
        output: str = "reconstructions.png",
        scale: int = 1,
    ) -> str:
        """Encode and decode real images; save targets and reconstructions side by side as a PNG grid.

        Images are the first ``num_images`` of the datamodule's ``split`` (set with ``--config`` or ``--data``).

        Args:
            model: the GlowModule (architecture from the checkpoint).
            datamodule: where the images come from.
            ckpt_path: checkpoint of a ``glow fit`` run, or ``last`` (``<default_root_dir>/checkpoints/last.ckpt``).
            weights_only: accepted so that the ``config.yaml`` a fit saved can be passed as it is; checkpoints are
                always loaded with ``weights_only=True``.
            num_images: number of images.
            split: ``val`` or ``test`` (or ``train``) split of the datamodule.
            pairs_per_row: (target, reconstruction) pairs per grid row.
            output: the PNG file to write.
            scale: nearest-neighbour upscaling of the PNG.
        """
        self._check_output(output, pairs_per_row=pairs_per_row, scale=scale)
        flow = self._prepare(model, ckpt_path).flow
        batch = self._images(datamodule, split, num_images, flow.device)
        grid = reconstruction_grid(flow, batch["bins"], labels_of(flow, batch), pairs_per_row)
        what = f"{len(batch['bins'])} {split} images and reconstructions"
        return self._write(grid, output, what, "target | reconstruction", scale)

    @torch.no_grad()
    def interpolate(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        ckpt_path: str,
        weights_only: bool | None = None,
        pairs: int = 4,
        steps: int = 8,
        method: Interpolation = "linear",
        split: Split = "val",
        output: str = "interpolations.png",
        scale: int = 1,
    ) -> str:
        """Decode images along paths between the latents of pairs of real images; one grid row per pair.

        Image i of the datamodule's ``split`` is paired with image ``pairs + i``; each row holds ``steps``
        images, the first and last being the two images' reconstructions.

        Args:
            model: the GlowModule (architecture from the checkpoint).
            datamodule: where the images come from.
            ckpt_path: checkpoint of a ``glow fit`` run, or ``last`` (``<default_root_dir>/checkpoints/last.ckpt``).
            weights_only: accepted so that the ``config.yaml`` a fit saved can be passed as it is; checkpoints are
                always loaded with ``weights_only=True``.
            pairs: number of image pairs (grid rows).
            steps: images per row, both endpoints included (>= 2).
            method: ``linear`` or ``spherical`` (slerp) interpolation of every level's latents.
            split: ``val`` or ``test`` (or ``train``) split of the datamodule.
            output: the PNG file to write.
            scale: nearest-neighbour upscaling of the PNG.
        """
        if pairs < 1 or steps < 2:
            raise ValueError(f"--pairs must be >= 1 and --steps >= 2, got {pairs} and {steps}")
        self._check_output(output, scale=scale)
        flow = self._prepare(model, ckpt_path).flow
        batch = self._images(datamodule, split, 2 * pairs, flow.device)
        if batch["bins"].shape[0] < 2 * pairs:
            raise ValueError(
                f"--pairs {pairs} needs {2 * pairs} images; the {split!r} split has {batch['bins'].shape[0]}"
            )
        grid = interpolation_grid(flow, batch["bins"], steps, method, labels_of(flow, batch))
        return self._write(grid, output, f"{pairs} {method} interpolations", f"{method} interpolation", scale)

    @torch.no_grad()
    def manipulate(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        ckpt_path: str,
        attribute: str | None = None,
        direction: str | None = None,
        direction_images: int = 2000,
        num_images: int = 8,
        strengths: list[float] = [-1.5, -0.75, 0.0, 0.75, 1.5],  # noqa: B006 (jsonargparse needs the list)
        split: Split = "val",
        output: str = "manipulations.png",
        scale: int = 1,
    ) -> str:
        """Edit real images along an attribute's direction in standardized latent space (Glow paper, section 5).

        The direction is the mean standardized latent of the training images with the attribute minus that of
        those without (:meth:`~glow_lightning.flow.glow.Glow.attribute_direction`); it is saved next to
        ``--output`` as ``.pt`` (attribute, counts, checkpoint) and reused with ``--direction FILE``.
        The grid has one row per image of ``split`` and one column per strength; strength 0 is the exact
        reconstruction.

        Args:
            model: the GlowModule (architecture from the checkpoint).
            datamodule: where the images come from; its labels define the attribute.
            ckpt_path: checkpoint of a ``glow fit`` run, or ``last`` (``<default_root_dir>/checkpoints/last.ckpt``).
            attribute: a class of the datamodule's labels, by index or name (``7`` on MNIST: 7 vs not 7; a
                folder's subfolder name); on CelebA the attribute set with ``--data.attribute`` (present vs absent).
            direction: a ``.pt`` direction saved by an earlier run, instead of computing one.
            direction_images: training images per side (with / without) for the direction; fewer if fewer.
            num_images: images to edit (grid rows).
            strengths: multiples of the direction added, one grid column each.
            split: ``val`` or ``test`` (or ``train``) split of the images to edit.
            output: the PNG file to write.
            scale: nearest-neighbour upscaling of the PNG.
        """
        self._check_output(output, num_images=num_images, direction_images=direction_images, scale=scale)
        if not strengths:
            raise ValueError("--strengths must hold at least one number")
        flow = self._prepare(model, ckpt_path).flow
        if direction is not None:
            try:
                saved = load_checkpoint_file(direction)
            except FileNotFoundError:  # not "no such checkpoint file"
                hint = "glow manipulate --attribute A --output X.png saves one as X.direction.pt"
                raise ValueError(f"--direction {direction}: no such file ({hint})") from None
            except UnreadableCheckpointError:
                saved = None
            if not isinstance(saved, dict) or "direction" not in saved:
                raise ValueError(f"--direction {direction} is not a direction saved by glow manipulate")
            name, vectors = saved["attribute"], [d.to(flow.device) for d in saved["direction"]]
        else:
            name, vectors = self._direction(flow, datamodule, attribute, direction_images, ckpt_path, output)
        batch = self._images(datamodule, split, num_images, flow.device)
        images = flow.manipulate(bins_to_unit(batch["bins"], flow.n_bits), vectors, strengths, labels_of(flow, batch))
        grid = image_grid(images, flow.n_bits, len(strengths))
        header = f"{name}: strengths {', '.join(f'{s:g}' for s in strengths)}"
        return self._write(grid, output, f"{len(batch['bins'])} images edited along {header}", header, scale)

    def _direction(self, flow, datamodule, attribute, per_side: int, ckpt_path: str, output: str):
        """Compute and save the attribute direction from the datamodule's labelled training images."""
        from tqdm import tqdm

        name, positive = resolve_attribute(datamodule, attribute)
        train = datamodule.split("train")
        loader = torch.utils.data.DataLoader(train, batch_size=256)
        sides: dict[bool, list] = {True: [], False: []}
        counts = {True: 0, False: 0}
        for raw in tqdm(loader, desc=f"collecting {name} images", leave=False):
            batch = datamodule.prepare_batch(raw, train=False)
            has = batch["label"] == positive
            for side in (True, False):
                keep = (has == side).nonzero()[:, 0][: per_side - counts[side]]
                if len(keep):
                    sides[side].append((batch["bins"][keep], batch["label"][keep]))
                    counts[side] += len(keep)
            if min(counts.values()) >= per_side:
                break
        if not counts[True] or not counts[False]:
            raise ValueError(
                f"--attribute {attribute}: the training split has {counts[True]} images with it and "
                f"{counts[False]} without; both sides need at least one"
            )
        (x_with, y_with), (x_without, y_without) = (
            (bins_to_unit(torch.cat([b for b, _ in sides[s]]), flow.n_bits), torch.cat([y for _, y in sides[s]]))
            for s in (True, False)
        )
        conditional = bool(flow.num_classes)
        vectors = flow.attribute_direction(
            x_with, x_without, y_with if conditional else None, y_without if conditional else None,
            progress=lambda batches: tqdm(batches, desc=f"encoding {name} direction", leave=False),
        )  # fmt: skip
        path = os.path.splitext(output)[0] + ".direction.pt"
        payload = {
            "attribute": name, "label": positive, "direction": [v.cpu() for v in vectors],
            "counts": {"with": counts[True], "without": counts[False]}, "ckpt_path": ckpt_path,
        }  # fmt: skip
        torch.save(payload, path)
        print(f"direction of {name} from {counts[True]} images with and {counts[False]} without: {path}")
        return name, vectors

    @torch.no_grad()
    def fid(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        ckpt_path: str,
        weights_only: bool | None = None,
        num_samples: int = 10_000,
        temperature: float = 1.0,
        split: Split = "test",
        batch_size: int = 250,
        feature: int | str = 2048,
        feature_weights: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        cache_dir: str | None = None,
    ) -> dict:
        """FID and KID of samples against the real images of --split (torchmetrics; needs pip install '.[fid]').

        Samples are drawn with the checkpoint's ``state_dict`` weights (the EMA weights when EMA was on); a
        class-conditional model's labels are drawn uniformly over its classes. The split's features are
        cached under ``--cache_dir``. Published FIDs use ``--num_samples 50000``; smaller N gives larger FIDs.

        Args:
            model: the GlowModule (architecture from the checkpoint).
            datamodule: the real images (the training config, ``--config``, or ``--data``).
            ckpt_path: checkpoint of a ``glow fit`` run, or ``last`` (``<default_root_dir>/checkpoints/last.ckpt``).
            weights_only: accepted so that the ``config.yaml`` a fit saved can be passed as it is; checkpoints are
                always loaded with ``weights_only=True``.
            num_samples: samples drawn (N).
            temperature: prior temperature of the samples (1 = the model's density).
            split: the real images: ``test``, ``val`` or ``train`` split of the datamodule, all of it.
            batch_size: images per batch, for sampling and for the feature extractor.
            feature: Inception-v3 features (64, 192, 768 or 2048 = pool3, the standard), or the import path
                (``package.module.Class``) of an ``nn.Module``, built without arguments, that maps uint8
                (B, 3, H, W) images to (B, d) features.
            feature_weights: a local file of torch-fidelity's Inception weights
                (``weights-inception-2015-12-05-6726825d.pth``) for offline use; default: downloaded once.
            kid_subsets: KID's random subsets.
            kid_subset_size: images per KID subset (lowered to N, or the split's size, where that is smaller).
            cache_dir: where the real features are cached (default: ``$GLOW_CACHE_DIR/fid``, else
                ``~/.cache/glow-lightning/fid``).
        """
        from tqdm import tqdm

        from ..data.imagecheck import cache_dir as glow_cache_dir
        from ..fid import feature_extractor, fid_score, kid_score, real_features, sample_features, small_n_note

        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"--num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
        for name, value in (
            ("batch_size", batch_size),
            ("kid_subsets", kid_subsets),
            ("kid_subset_size", kid_subset_size),
        ):
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {temperature}")
        if datamodule is None or not hasattr(datamodule, "split"):
            raise ValueError("glow fid needs the real images: pass the training config (--config) or --data")
        extractor = feature_extractor(feature, feature_weights)
        flow = self._prepare(model, ckpt_path).flow
        extractor = extractor.to(flow.device)
        datamodule.prepare_data()
        cache = os.path.join(glow_cache_dir(), "fid") if cache_dir is None else cache_dir
        real, path, cached = real_features(
            datamodule, split, extractor, flow.n_bits, cache_dir=cache, batch_size=batch_size, device=flow.device,
            progress=lambda it: tqdm(it, desc=f"features of the {split} images", leave=False),
        )  # fmt: skip
        print(f"{'read' if cached else 'computed'} the features of {len(real)} {split} images" + (
            f" ({'from' if cached else 'cached in'} {path})" if path else ""))  # fmt: skip
        fake = sample_features(
            flow, extractor, num_samples, temperature=temperature, batch_size=batch_size,
            progress=lambda it: tqdm(it, desc=f"sampling at T={temperature:g}", leave=False),
        )  # fmt: skip
        subset_size = min(kid_subset_size, len(fake), len(real))
        if subset_size < kid_subset_size:
            print(
                f"KID subset_size {kid_subset_size} > the {min(len(fake), len(real))} images of a set: using {subset_size}"
            )
        fid = fid_score(real, fake)
        kid_mean, kid_std = kid_score(real, fake, subsets=kid_subsets, subset_size=subset_size)
        where = f"N={num_samples} samples at T={temperature:g} vs the {len(real)} {split} images of {type(datamodule).__name__}"
        print(f"FID {fid:.3f}  KID {kid_mean:.5f} ± {kid_std:.5f}  ({where}; {real.shape[1]}-d features)")
        note = small_n_note(num_samples, real.shape[1])
        if note:
            print(f"note: {note}")
        return {
            "fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "num_samples": num_samples,
            "temperature": temperature, "split": split, "num_real": len(real), "kid_subset_size": subset_size,
        }  # fmt: skip

    def prepare(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        *,
        output: str,
        num_workers: int | None = None,
        chunk_bytes: str = "64MB",
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, int]:
        """Convert the datamodule's splits into litdata shards for streaming (StreamingDataModule).

        The shards are read with ``--data.input_dir`` of StreamingDataModule. Lossless: uint8 pixels, label and
        image index; needs ``pip install ".[streaming]"``.

        Args:
            model: not used (a training config can be passed as it is).
            datamodule: the dataset to convert (``--config <dataset config>`` or ``--data ...``).
            output: a local folder, ``s3://bucket/prefix``, ``gs://...`` or ``local:/path``; a split already
                converted there is kept, so an interrupted run can be started again.
            num_workers: conversion worker processes (default: one per CPU).
            chunk_bytes: target size of one shard file.
            ckpt_path: not used (accepted so that the ``config.yaml`` a fit saved can be passed as it is).
            weights_only: not used (as ``ckpt_path``).
        """
        from ..data.streaming import check_chunk_bytes, convert

        check_chunk_bytes(chunk_bytes)
        if datamodule is None or not hasattr(datamodule, "splits"):
            raise ValueError("glow prepare needs a glow_lightning datamodule: pass its config (--config) or --data")
        datamodule.prepare_data()
        sizes = convert(datamodule, output, num_workers=num_workers, chunk_bytes=chunk_bytes)
        print(f"wrote {', '.join(f'{n} {split}' for split, n in sizes.items())} images to {output}")
        return sizes

    def _images(self, datamodule, split: str, num_images: int, device) -> dict:
        if datamodule is None:
            raise ValueError("this subcommand needs images: pass the training config (--config) or --data")
        if num_images < 1:
            raise ValueError(f"the number of images must be >= 1, got {num_images}")
        if not hasattr(datamodule, "fixed_images"):
            raise ValueError(f"real images need a glow_lightning datamodule, got {type(datamodule).__name__}")
        datamodule.prepare_data()
        return datamodule.fixed_images(split, num_images, device)


def resolve_attribute(datamodule, attribute: str | None) -> tuple[str, int]:
    """``--attribute`` -> (its name, the label of the images that have it)."""
    if datamodule is None:
        raise ValueError("glow manipulate needs labelled images: pass the training config (--config) or --data")
    celeba = getattr(datamodule, "attribute", None)
    if celeba is not None or type(datamodule).__name__.startswith("CelebA"):
        if not celeba:
            raise ValueError("--attribute on CelebA: set it with --data.attribute (e.g. Smiling)")
        if attribute not in (None, celeba):
            raise ValueError(f"--attribute {attribute}: this CelebA datamodule's labels are --data.attribute {celeba}")
        return celeba, 1
    if attribute is None:
        raise ValueError("glow manipulate needs --attribute (a class index or name of the dataset's labels)")
    names = [str(n) for n in getattr(datamodule, "classes", None) or []]
    classes = datamodule.dataset_classes
    if str(attribute) in names:
        return str(attribute), names.index(str(attribute))
    if str(attribute).isdigit() and int(attribute) < classes:
        return str(attribute), int(attribute)
    known = f"classes 0..{classes - 1}" + (f" or {', '.join(names)}" if names else "") if classes else "no labels"
    raise ValueError(f"--attribute {attribute} is not a class of {type(datamodule).__name__} (it has {known})")
