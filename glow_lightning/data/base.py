"""The shared LightningDataModule of glow-lightning: quantization, augmentation, dequantization.

Datasets yield raw uint8 pixels; everything random happens on the device, in
``on_after_batch_transfer``, as a pure function of ``(seed, stream, image index)`` through a
counter-based hash (:mod:`.noise`). So:

- evaluation noise depends only on (seed, index): val/test bits/dim do not depend on the run, the
  worker count or the number of devices;
- training noise and flips depend on (seed, epoch, index): every rank draws its own (it sees other
  images), and a resume from an epoch boundary replays them exactly.

The batch handed to the model is a dict: ``x`` (dequantized floats in [0, 1]), ``bins`` (the
noise-free integer bins, for code that draws its own noise), ``label`` and ``index``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import signal
import warnings
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate
from typing_extensions import override

from ..flow.quantize import bins_to_unit, check_n_bits, pixels_to_bins
from .noise import EVAL_STREAM, flip_from_keys, item_keys, uniform_from_keys


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM, SIGINT and SIGUSR1: ``kill -TERM -<group>`` / ``scancel`` reach them
    too, and the main process (glow_lightning.callbacks.preemption) stops the fit and shuts them down.
    (torch's own worker SIGTERM handler would end the worker and the fit with a RuntimeError.)"""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class DatasetError(ValueError):
    """A dataset that does not fit its datamodule (wrong image shape, too small, unreadable)."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not where the datamodule looks (the message says where and how to get them)."""


class UnreadableFileError(DatasetError, RuntimeError):
    """A dataset file that is there but cannot be read (truncated, corrupt, another format)."""


class DownloadError(DatasetError):
    """A dataset could not be downloaded (no network, a server or quota refusal, a bad archive)."""


def md5_failures(checksums: list[tuple[str, str]]) -> list[str]:
    """The files of ``checksums`` ((path, md5) pairs) that are on disk with other bytes than that MD5."""
    failed = []
    for path, md5 in checksums:
        if os.path.isfile(path):
            digest = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != md5:
                failed.append(path)
    return failed


def download(name: str, data_dir: str, fetch, manual: str, checksums=None) -> None:
    """Run ``fetch()`` (torchvision's checksummed download); turn any failure into a DownloadError that
    says where the data goes and how to get it by hand, and which files on disk failed their MD5 check
    (``checksums()``: torchvision's (path, md5) pairs, read only after a failure). Call it only when the files are not already there:
    checksums are for downloads; files on disk that read well are used as they are."""
    try:
        fetch()
    except Exception as err:
        try:
            failed = md5_failures(checksums()) if checksums else []
        except Exception:  # torchvision without these attributes: report the failure without them
            failed = []
        if failed:
            raise DownloadError(
                f"could not download {name} into data_dir={data_dir!r} ({type(err).__name__}: {err}): "
                f"{', '.join(failed)} failed torchvision's MD5 checksum. If these are good copies (a recompressed "
                "archive has other bytes, same images), pass --data.download false to read the files as they are; "
                f"else delete them and retry, or get the data by hand: {manual}"
            ) from err
        raise DownloadError(
            f"could not download {name} into data_dir={data_dir!r} ({type(err).__name__}: {err}). Check the "
            f"network, or get it by hand: {manual}; then pass --data.download false"
        ) from err


def check_image_shape(dataset: Dataset, expected: tuple[int, int, int], where: str) -> None:
    """Raise :class:`DatasetError` naming ``where`` unless the first image is ``expected`` (C, H, W)."""
    shape = tuple(dataset[0][0].shape) if len(dataset) else expected
    if shape != expected:
        raise DatasetError(
            f"images in {where} have shape {shape} (C, H, W), but this datamodule expects {expected}: "
            "use a datamodule (or num_channels / image_size) that matches the dataset"
        )


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(uint8 image (C, H, W), label)`` into dicts that carry the image index."""

    def __init__(self, dataset: Dataset, indices: Tensor | None = None):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        index = int(self.indices[i]) if self.indices is not None else i
        pixels, label = self.dataset[index]
        return {"pixels": pixels, "label": label, "index": index}

    # ---- batched fetch: one indexing of a uint8 array per batch instead of one __getitem__ per image
    def __getitems__(self, items: list[int]) -> Sequence[dict]:
        """A whole batch at once (torch's DataLoader calls this with the batch's positions) when the
        wrapped dataset supports it (``get_batch(index)`` or a TensorDataset); else per image."""
        if not batched(self.dataset):
            return [self[i] for i in items]
        index = self.indices[items] if self.indices is not None else torch.as_tensor(items, dtype=torch.int64)
        pixels, label = fetch_batch(self.dataset, index)
        return BatchedItems({"pixels": pixels, "label": label, "index": index})


class BatchedItems(Sequence):
    """The items of a batch fetched at once: a sequence of per-image dicts (views, made only when
    asked for, so any collate function works), and ``batch``, the collated dict, which :func:`collate`
    returns without stacking again."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["index"])

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.batch.items()}


def batched(dataset: Dataset) -> bool:
    """Whether ``dataset`` can fetch a batch in one call (:func:`fetch_batch`)."""
    return callable(getattr(dataset, "get_batch", None)) or isinstance(dataset, TensorDataset)


def fetch_batch(dataset: Dataset, index: Tensor) -> tuple[Tensor, Tensor]:
    """(uint8 pixels (B, C, H, W), int64 labels (B,)) of the images ``index`` (B,) of a batched dataset."""
    if isinstance(dataset, TensorDataset):
        pixels, labels = dataset.tensors[:2]
        return pixels[index], labels[index]
    return dataset.get_batch(index)


def collate(batch: list) -> dict:
    """A batch from :meth:`IndexedDataset.__getitems__` is collated already; per-image items are stacked."""
    return batch.batch if isinstance(batch, BatchedItems) else default_collate(batch)


NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not"


SEED_STRIDE = 100_003  # an epoch's order is seeded with seed * SEED_STRIDE + epoch: seeds do not share orders


class EpochRandomSampler(RandomSampler):
    """A RandomSampler whose order is a function of (seed, epoch): exact on resume.

    Lightning calls ``set_epoch`` every epoch; under DDP the datamodule uses :class:`EpochDistributedSampler`
    instead. ``start``: images of the epoch's order to skip, once (a resume in the middle
    of an epoch goes on with the images that epoch had not reached; ``len`` stays the whole epoch's, as Lightning
    counts the batches already done).
    """

    def __init__(self, data_source, seed: int = 0, epoch: int = 0, start: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch, self.start = seed, epoch, start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)  # as EpochDistributedSampler's
        start, self.start = self.start, 0
        return iter(torch.randperm(len(self.data_source), generator=g)[start:].tolist())


class EpochDistributedSampler(DistributedSampler):
    """DDP: this rank's share of an order that is a function of (seed, epoch), as Lightning's DistributedSampler,
    but made by the datamodule, so that it knows where a resumed fit goes on: the epoch, at creation (Lightning sets
    it only after DataLoader workers have drawn their first indices), and ``start``, images of this rank's share to
    skip, once (a resume in the middle of an epoch). Lightning keeps a DistributedSampler it is given.

    The epoch's order is :class:`EpochRandomSampler`'s, whatever the number of ranks: rank r takes its positions r,
    r + W, r + 2W, ... So the first n images of the order are done after n / W of every rank's share, and a run
    resumed mid-epoch on another number of devices (or with another batch size) can go on after them."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0, epoch: int = 0, start: int = 0):
        # DistributedSampler's permutation is seeded with seed + epoch: EpochRandomSampler's generator
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed * SEED_STRIDE)
        self.epoch, self.start = epoch, start

    def __iter__(self):
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


class GlowDataModule(L.LightningDataModule):
    """Base datamodule: subclasses provide ``train_set`` / ``test_set`` of uint8 images.

    Args:
        data_dir: where the dataset is, or is downloaded to.
        download: download the dataset (through torchvision) if it is missing.
        n_bits: bits per colour channel (1..8); linked into the model.
        val_size: images held out of the training set for validation (seeded split): a count, or a
            fraction of the training set when a float below 1. Ignored by datasets with their own
            validation split (CelebA, an image folder with ``val/``).
        batch_size: images per batch and per device (the effective batch is this x devices x
            num_nodes x accumulate_grad_batches).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory for faster transfer to the GPU.
        flip: random horizontal flips of training images.
        seed: seed of the train/val split, the data order, the flips and the dequantization noise.
        predict_split: the split that ``glow predict`` scores.
        class_conditional: train a class-conditional model (paper section 5): the dataset's class
            count is linked into the model as ``num_classes``. Off: unconditional (num_classes 0).
    """

    # A resume in the middle of an epoch skips the images of the checkpoint's batches (_resume_position); one with
    # another batch size or number of devices has its batch count converted first (callbacks.checkpoint's
    # rescale_epoch_position). StreamingDataModule: litdata's loader state restores its own position.
    resumes_by_count = True

    num_channels: int = 3
    image_size: int = 32
    dataset_classes: int = 0  # the dataset's class count (0: no labels)
    check_shapes: bool = True  # False where the dataset itself resizes every image to image_size

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = True,
        n_bits: int = 8,
        val_size: int | float = 5000,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        flip: bool = True,
        seed: int = 0,
        predict_split: Literal["train", "val", "test"] = "test",
        class_conditional: bool = False,
    ):
        super().__init__()
        self.data_dir = os.path.expanduser(data_dir)
        self.download = download
        self.n_bits = check_n_bits(n_bits)
        if isinstance(val_size, float) and not 0 <= val_size < 1:
            raise ValueError(f"val_size must be an image count or a fraction in [0, 1), got {val_size!r}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.val_size, self.batch_size, self.num_workers = val_size, batch_size, num_workers
        if isinstance(val_size, int) and val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size!r}")
        self.pin_memory, self.flip, self.seed, self.predict_split = pin_memory, flip, seed, predict_split
        self.class_conditional = class_conditional
        self.splits: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        """The class count linked into the model: the dataset's when ``class_conditional``, else 0."""
        if not self.class_conditional:
            return 0
        if self.dataset_classes < 1:
            raise ValueError(
                f"class_conditional=True needs class labels, but {type(self).__name__} has none here"
                f"{self.no_labels_hint()}"
            )
        return self.dataset_classes

    def no_labels_hint(self) -> str:
        """Why this dataset has no labels and how to get some (appended to the class_conditional error)."""
        return ""

    # ---- what subclasses provide
    def load_split(self, train: bool) -> Dataset:
        """The full training (``train=True``) or test set: items ``(uint8 tensor (C, H, W), label)``."""
        raise NotImplementedError

    def load_val_split(self) -> Dataset | None:
        """The dataset's own validation set, if it has one (CelebA); ``None``: hold one out of training."""
        return None

    # ---- splits
    @override
    def setup(self, stage: str | None = None) -> None:
        # `glow test` (and predict on the test split) reads the test set only: a download of just the test files
        # (out-of-distribution evaluation on SVHN's test_32x32.mat) is enough
        test_only = stage == "test" or (stage == "predict" and self.predict_split == "test")
        if "train" not in self.splits and not test_only:
            full = self.load_split(train=True)
            if self.check_shapes:
                check_image_shape(full, self.image_shape, f"the training set of {self.data_dir}")
            val = self.load_val_split()
            if val is not None:  # a predefined split: val_size does not apply
                self.splits["train"], self.splits["val"] = IndexedDataset(full), IndexedDataset(val)
            else:
                self._hold_out_val(full)
        if stage in ("test", "predict", None) and "test" not in self.splits:
            test = self.load_split(train=False)
            if self.check_shapes:
                check_image_shape(test, self.image_shape, f"the test set of {self.data_dir}")
            self.splits["test"] = IndexedDataset(test)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.num_channels, self.image_size, self.image_size)

    def _hold_out_val(self, full: Dataset) -> None:
        """The seeded train / val split of ``full``: ``val_size`` images (or that fraction, at least 1)."""
        val_size = self.val_size
        if isinstance(val_size, float):
            val_size = max(1, math.ceil(val_size * len(full))) if val_size > 0 else 0
        if val_size >= len(full):
            raise DatasetError(f"val_size={self.val_size} must be smaller than the training set ({len(full)} images)")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
        cut = len(full) - val_size
        self.splits["train"] = IndexedDataset(full, perm[:cut].sort().values)
        self.splits["val"] = IndexedDataset(full, perm[cut:].sort().values)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.splits[split]
        rank, world_size = self._rank_and_world_size()
        if train:
            if world_size > 1:
                sampler = EpochDistributedSampler(dataset, world_size, rank, self.seed, *self._resume_position())
            else:
                sampler = EpochRandomSampler(dataset, self.seed, *self._resume_position())
            warnings.filterwarnings("ignore", message=NOT_RESUMABLE)  # these samplers resume mid-epoch: not true
        elif world_size > 1:
            # Evaluation under DDP: every image exactly once over all ranks (Lightning's DistributedSampler
            # would pad uneven sets with repeats and bias val/test bits/dim); ranks may differ by one image.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        else:
            sampler = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
            drop_last=train and len(dataset) > self.batch_size,
            collate_fn=collate,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return self._loader(self.predict_split)

    # ---- quantization, augmentation, dequantization (on the device)
    def dequantize(self, bins: Tensor, index: Tensor, stream: int = EVAL_STREAM, keys: Tensor | None = None) -> Tensor:
        """Integer bins (B, C, H, W) -> ``(k + u) / 2**n_bits``, u ~ U(0, 1) a function of (seed, stream, index).

        ``keys``: the images' ``item_keys(seed, stream, index)``, when the caller has them already."""
        keys = item_keys(self.seed, stream, index) if keys is None else keys
        noise = uniform_from_keys(keys, tuple(bins.shape[1:]))
        return bins_to_unit(bins, self.n_bits).add_(noise.div_(2**self.n_bits))

    def flip_images(self, images: Tensor, index: Tensor, stream: int, keys: Tensor | None = None) -> Tensor:
        """Mirror about half of the images (pixels or bins) left-right, as a function of (seed, stream, index)."""
        flip = flip_from_keys(item_keys(self.seed, stream, index) if keys is None else keys)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def prepare_batch(self, batch: dict, train: bool, epoch: int = 0) -> dict:
        """Raw collated batch -> ``{"x", "bins", "label", "index"}`` on the batch's device."""
        index = batch["index"].long()
        pixels, stream = batch["pixels"], epoch if train else EVAL_STREAM
        keys = item_keys(self.seed, stream, index)  # once for the flips and the noise
        if train and self.flip:
            pixels = self.flip_images(pixels, index, stream, keys)  # on uint8: an eighth of the bytes of the bins
        bins = pixels_to_bins(pixels, self.n_bits)
        return {"x": self.dequantize(bins, index, stream, keys), "bins": bins, "label": batch["label"], "index": index}

    @override
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        train = trainer is not None and trainer.training
        return self.prepare_batch(batch, train=train, epoch=trainer.current_epoch if train else 0)

    def evaluation_draw(self, bins: Tensor, index: Tensor, draw: int) -> Tensor:
        """Evaluation noise draw ``draw`` of these bins: draw 0 is the ``x`` of an evaluation batch; draws 1, 2, ...
        are further independent ones (importance-weighted bounds), each a function of (seed, draw, index)."""
        return self.dequantize(bins, index, EVAL_STREAM + draw)

    def _resume_position(self) -> tuple[int, int]:
        """(epoch, images of it already trained on) where the attached trainer's fit goes on; (0, 0) outside one.

        The epoch is what Lightning passes to ``set_epoch``, but it does so only after DataLoader workers have
        drawn their first indices: a resume with workers ran its first epoch in epoch 0's order. The images done
        are those of the batches a checkpoint from the middle of an epoch had trained on (Lightning's mid-epoch
        restart runs the rest of the epoch's batches: without them skipped, the epoch's first images again)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        epochs = loop.epoch_progress.current
        mid_epoch = epochs.started > epochs.processed
        done = loop.epoch_loop.batch_progress.current.processed if mid_epoch else 0
        return epochs.processed, done * self.batch_size

    def _rank_and_world_size(self) -> tuple[int, int]:
        """The attached trainer's global rank and world size; (0, 1) outside a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def split(self, name: str) -> Dataset:
        """The ``train``, ``val`` or ``test`` split (set up on first use)."""
        if name not in self.splits:
            self.setup({"train": "fit", "test": "test"}.get(name, "validate"))
        return self.splits[name]

    def images(self, split: str, picks: list[int], device: torch.device | str = "cpu", *, train: bool = False) -> dict:
        """Images ``picks`` (positions in ``split``) as one prepared batch on ``device``.

        ``train=False``: evaluation preparation (no flips, evaluation noise); ``train=True``: epoch 0's
        training preparation. Sets up the split if needed.
        """
        batch = next(iter(DataLoader(Subset(self.split(split), picks), batch_size=len(picks), collate_fn=collate)))
        batch = {k: v.to(device) for k, v in batch.items()}
        return self.prepare_batch(batch, train=train, epoch=0)

    def fixed_images(self, split: str, num_images: int, device: torch.device | str = "cpu") -> dict:
        """The first ``num_images`` images of ``split`` (fewer if it has fewer), without noise-dependent picks or flips.

        The same images every time (a split's images are in a fixed, seeded order): for image grids and checks.
        Raises ValueError when the split is empty.
        """
        size = len(self.split(split))
        if size == 0:
            raise ValueError(f"the datamodule's {split!r} split is empty")
        return self.images(split, list(range(min(num_images, size))), device)

    def init_batch(self, num_images: int, device: torch.device | str = "cpu") -> dict:
        """A prepared batch of ``num_images`` random training images for ActNorm's data-dependent init.

        Different random images on each DDP rank (the statistics are all-reduced over ranks).
        """
        rank = self._rank_and_world_size()[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + rank)
        picks = torch.randperm(len(self.split("train")), generator=g)[:num_images].tolist()
        return self.images("train", picks, device, train=True)
