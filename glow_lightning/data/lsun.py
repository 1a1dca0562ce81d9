"""LSUN scenes (Yu et al., 2015, "LSUN: Construction of a Large-scale Image Dataset using Deep Learning
with Humans in the Loop") at 64x64, preprocessed as RealNVP (Dinh et al., 2017, section 4.1) and
openai/glow's ``lsun_realnvp`` problem, which the Glow paper's table 2 reports on (bedroom 2.38,
tower 2.46, church outdoor 2.67 bits/dim).

Data: the official LMDB exports (``python download.py -c bedroom`` of https://github.com/fyu/lsun),
unzipped into ``data_dir``: ``<category>_train_lmdb/`` and ``<category>_val_lmdb/`` (300 images),
each an LMDB whose keys are image ids and whose values are the encoded (WebP) images, the layout
``torchvision.datasets.LSUN`` reads. Read here with ``lmdb`` directly (``pip install
'glow-lightning[lsun]'``): torchvision's ``LSUNClass`` caches the key list in the current working
directory under a file name made of the root path's letters only (two roots that differ in digits
share it, and a stale list silently reads the wrong keys) and opens the LMDB in its constructor
(not picklable for spawned workers). Here the key list is cached beside the LMDB, checked against
its entry count, and each process opens the LMDB on first access.

Preprocessing (openai/glow data_loaders/generate_tfr/lsun.py with ``realnvp``): each image is
downscaled so that its shorter side is ``resize`` (96); openai/glow keeps the whole 96xW image and
takes random 64x64 crops from it (data_loaders/get_data.py, in training and evaluation). Here the
dataset keeps the central 96x96 square (so batches collate) and the crop is taken on the device:
random 64x64 crops in training at offsets that are a function of (seed, epoch, image index), like
the flips and the noise, and the central 64x64 crop in evaluation (deterministic val/test bits/dim).
Downscaling is PIL's antialiased resampling, not skimage's ``pyramid_reduce``.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from .base import DatasetError, DownloadError, GlowDataModule
from .noise import hash32, item_keys

LSUN_URL = "https://github.com/fyu/lsun"
_CROP_SALT = 0x2C1B_3C6D
CATEGORIES = (
    "bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room", "kitchen",
    "living_room", "restaurant", "tower",
)  # fmt: skip


def crop_images(pixels: Tensor, size: int, keys: Tensor | None = None) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): the central square, or at offsets drawn from ``keys`` (B,)."""
    b, _, h, w = pixels.shape
    if keys is None:
        top, left = (h - size) // 2, (w - size) // 2
        return pixels[:, :, top : top + size, left : left + size]
    key = hash32(keys ^ _CROP_SALT)
    top, left = key % (h - size + 1), (key >> 16) % (w - size + 1)  # (B,), (B,)
    span = torch.arange(size, device=pixels.device)
    rows = (top[:, None] + span)[:, None, :, None]  # (B, 1, size, 1)
    cols = (left[:, None] + span)[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(b, device=pixels.device)[:, None, None, None]
    chans = torch.arange(pixels.shape[1], device=pixels.device)[None, :, None, None]
    return pixels[batch, chans, rows, cols]


def crop_for_model(pixels: Tensor, size: int, seed: int, index: Tensor, train: bool, epoch: int) -> Tensor:
    """The model's crop of a raw batch: random in training (a function of (seed, epoch, index)), else central."""
    return crop_images(pixels, size, item_keys(seed, epoch, index.long()) if train else None)


def load_scaled(data: bytes, resize: int) -> Tensor:
    """Encoded image bytes -> uint8 (3, resize, resize): shorter side scaled to ``resize``, central square."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.fit(img.convert("RGB"), (resize, resize), method=Image.Resampling.LANCZOS)
        pixels = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


class LmdbImages(Dataset):
    """The images of one LSUN LMDB (sorted keys), each scaled to ``(3, resize, resize)``; label -1."""

    def __init__(self, path: str, resize: int):
        import lmdb  # noqa: F401  (fail early with the extra's hint, see LSUNDataModule)

        self.path, self.resize = path, resize
        self.keys = self._keys()
        self._env = None

    def _open(self):
        import lmdb

        return lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)

    def _keys(self) -> list[bytes]:
        cache = self.path.rstrip("/") + "_keys.pkl"
        env = self._open()
        try:
            count = env.stat()["entries"]
            if os.path.isfile(cache):
                with open(cache, "rb") as f:
                    keys = pickle.load(f)
                if len(keys) == count:
                    return keys
            with env.begin(write=False) as txn:
                keys = sorted(txn.cursor().iternext(keys=True, values=False))
        finally:
            env.close()
        try:
            with open(cache + ".partial", "wb") as f:
                pickle.dump(keys, f)
            os.replace(cache + ".partial", cache)
        except OSError:
            pass  # a read-only data_dir: list the keys again next time
        return keys

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._env is None:
            self._env = self._open()
        with self._env.begin(write=False) as txn:
            data = txn.get(self.keys[i])
        try:
            return load_scaled(data, self.resize), -1
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot decode image {self.keys[i]!r} of {self.path}: {err}") from err


class LSUNDataModule(GlowDataModule):
    """LSUN at 64x64 as RealNVP / openai/glow's ``lsun_realnvp``: one category's official LMDB.

    Args:
        category: the LSUN scene category (``bedroom``, ``tower``, ``church_outdoor``, ...): reads
            ``data_dir/<category>_train_lmdb`` and ``<category>_val_lmdb`` (the test set, 300 images).
        image_size: side of the square crops the model sees (64).
        resize: images are downscaled so that their shorter side is this (96), then the central
            square is kept; training crops are random, evaluation crops central.
        val_size: training images held out for validation (seeded), a count or a fraction.
        download: LSUN is downloaded by hand; with ``true`` a missing dataset is reported with how.
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...).
    """

    num_channels = 3
    check_shapes = False  # the dataset yields (3, resize, resize); the model sees image_size crops

    def __init__(
        self,
        *,
        category: str = "bedroom",
        image_size: int = 64,
        resize: int = 96,
        val_size: int | float = 3000,
        download: bool = False,
        **kwargs,
    ):
        super().__init__(val_size=val_size, download=download, **kwargs)
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {', '.join(CATEGORIES)}; got {category!r}")
        if not isinstance(image_size, int) or not isinstance(resize, int) or not 1 <= image_size <= resize:
            raise ValueError(
                f"need integers 1 <= image_size <= resize, got image_size={image_size!r}, resize={resize!r}"
            )
        self.category, self.image_size, self.resize = category, image_size, resize

    def _lmdb(self, split: str) -> str:
        path = os.path.join(self.data_dir, f"{self.category}_{split}_lmdb")
        if not os.path.isdir(path):
            how = (
                f"download it with download.py -c {self.category} of {LSUN_URL} and unzip "
                f"{self.category}_train_lmdb.zip and {self.category}_val_lmdb.zip into data_dir"
            )
            if self.download:
                raise DownloadError(f"LSUN cannot be downloaded automatically: {how}; then pass --data.download false")
            raise DatasetError(f"LSUN {self.category} not found: {path} does not exist; {how}")
        try:
            return LmdbImages(path, self.resize)
        except ImportError as err:
            raise DatasetError(f"LSUN needs the lmdb package: pip install 'glow-lightning[lsun]' ({err})") from err

    @override
    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self._lmdb(split)  # checks the folders; lists and caches the keys once per machine

    def load_split(self, train: bool) -> LmdbImages:
        return self._lmdb("train" if train else "val")

    @override
    def prepare_batch(self, batch: dict, train: bool, epoch: int = 0) -> dict:
        """Crop to ``image_size`` (random in training, central in evaluation), then as every datamodule."""
        pixels = crop_for_model(batch["pixels"], self.image_size, self.seed, batch["index"], train, epoch)
        return super().prepare_batch({**batch, "pixels": pixels}, train=train, epoch=epoch)
