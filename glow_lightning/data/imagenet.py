"""ImageNet at 32x32 and 64x64, in its two public downsampled versions (their bits/dim differ).

- ``version="oord"`` (``imagenet_oord``): van den Oord et al. (2016), "Pixel Recurrent Neural
  Networks", the version the Glow paper (Kingma & Dhariwal, 2018, table 2: 4.09 / 3.81 bits/dim),
  RealNVP and Flow++ report on; openai/glow calls it ``imagenet-oord``. Unlabelled PNG files in
  ``train_32x32/`` and ``valid_32x32/`` (or ``_64x64``), from the archives ``train_32x32.tar``,
  ``valid_32x32.tar``, ``train_64x64.tar``, ``valid_64x64.tar`` once served at
  http://image-net.org/small/download.php. TFDS's ``downsampled_imagenet`` gives 1,281,149 training
  and 49,999 validation images; openai/glow's converter (data_loaders/generate_tfr/imagenet_oord.py)
  asserts 1,281,148 and 50,000. Both are quoted, not checked here: no copy of the archives was at hand.
- ``version="downsampled"`` (``imagenet_downsampled``): Chrabaszcz et al. (2017), "A Downsampled
  Variant of ImageNet as an Alternative to the CIFAR datasets" (box-resized, with labels), from
  https://image-net.org/download-images.php (an account is needed): ``Imagenet32_train.zip`` and
  ``Imagenet32_val.zip`` (or their ``_npz`` twins), ``Imagenet64_train_part1.zip``,
  ``Imagenet64_train_part2.zip`` and ``Imagenet64_val.zip``. Unzipped: files ``train_data_batch_1``
  .. ``train_data_batch_10`` and ``val_data`` (pickled dicts, or ``.npz``) whose ``data`` is uint8
  rows of C*H*W values, channel-major (at 32x32, red of pixel (0, 0) is ``row[0]``, green is
  ``row[1024]``, red of pixel (0, 1) is ``row[1]``), and ``labels`` in 1..1000 (here 0..999).

The official validation images are the test set (as in every paper above); the validation set of
training is held out of the training images (``val_size``, seeded). Either version is converted once
(``prepare_data``, one process per machine) into ``.npy`` arrays beside the data and memory-mapped
(see :mod:`.arrays`): one copy per machine in the page cache, never one per DDP rank.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from PIL import Image
from typing_extensions import override

from .arrays import NpyImages, NpyWriter, npy_shape
from .base import DatasetError, DownloadError, GlowDataModule

OORD_URL = "http://image-net.org/small/download.php"
DOWNSAMPLED_URL = "https://image-net.org/download-images.php"
TRAIN_BATCHES = [f"train_data_batch_{i}" for i in range(1, 11)]
VAL_BATCHES = ["val_data"]
CHUNK = 4096  # PNG files decoded per step of the conversion


def manual_download(version: str, size: int) -> str:
    """Where to get which files, by hand, for one version and size."""
    if version == "oord":
        return (
            f"download train_{size}x{size}.tar and valid_{size}x{size}.tar (van den Oord et al., 2016; once at "
            f"{OORD_URL}) and extract them into data_dir, giving train_{size}x{size}/ and valid_{size}x{size}/"
        )
    archives = (
        "Imagenet32_train.zip and Imagenet32_val.zip (or the _npz ones)"
        if size == 32
        else "Imagenet64_train_part1.zip, Imagenet64_train_part2.zip and Imagenet64_val.zip"
    )
    return (
        f"download {archives} (Chrabaszcz et al., 2017) from {DOWNSAMPLED_URL} (login needed) and unzip them "
        "into data_dir, giving train_data_batch_1..10 and val_data"
    )


# ---- van den Oord et al.: folders of PNG files
def read_png(path: str, size: int) -> np.ndarray:
    """One PNG file -> uint8 (3, size, size); a file of another size or unreadable raises naming it."""
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read image file {path}: {err}") from err
    if pixels.shape != (size, size, 3):
        raise DatasetError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {size}x{size}")
    return pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def convert_png_folder(folder: str, path: str, size: int, threads: int = 8) -> None:
    """Every ``*.png`` in ``folder``, sorted by name (image i is the i-th name), -> ``path`` (N, 3, S, S)."""
    from tqdm.auto import tqdm

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png"))
    if not names:
        raise DatasetError(f"no PNG files in {folder}")
    with NpyWriter(path, (3, size, size)) as out, ThreadPoolExecutor(threads) as pool:
        bar = tqdm(total=len(names), desc=f"converting {folder} -> {os.path.basename(path)}", unit="img")
        for start in range(0, len(names), CHUNK):
            chunk = [os.path.join(folder, n) for n in names[start : start + CHUNK]]
            out.append(np.stack(list(pool.map(lambda p: read_png(p, size), chunk))))
            bar.update(len(chunk))
        bar.close()


# ---- Chrabaszcz et al.: pickled or .npz batches
def read_batch(path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 (N, 3, S, S), int64 labels 0..999); rows are C*H*W, channel-major."""
    try:
        if path.endswith(".npz"):
            with np.load(path) as entry:
                data, labels = entry["data"], entry["labels"]
        else:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data, labels = entry["data"], entry["labels"]
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64).reshape(-1)
    except Exception as err:  # a pickle can fail in many ways: UnpicklingError, EOFError, KeyError, TypeError...
        raise DatasetError(f"cannot read ImageNet batch file {path}: {type(err).__name__}: {err}") from err
    if data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise DatasetError(f"{path}: rows of {data.shape[1:]} values, expected {3 * size * size} (3x{size}x{size})")
    if len(labels) != len(data) or (len(labels) and (labels.min() < 1 or labels.max() > 1000)):
        raise DatasetError(f"{path}: expected one label in 1..1000 per row")
    return data.reshape(-1, 3, size, size), labels - 1


def find_batch(data_dir: str, name: str) -> str | None:
    """``name`` or ``name.npz`` in ``data_dir`` or one of its subfolders (the unzipped archives)."""
    folders = [data_dir] + sorted(
        os.path.join(data_dir, d) for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))
    )
    for folder in folders:
        for candidate in (name, name + ".npz"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None


def convert_batches(paths: list[str], pixels_path: str, labels_path: str, size: int) -> None:
    """Batch files -> ``pixels_path`` (N, 3, S, S) and ``labels_path`` (N,), in file then row order."""
    from tqdm.auto import tqdm

    labels = []
    with NpyWriter(pixels_path, (3, size, size)) as out:
        for path in tqdm(paths, desc=f"converting -> {os.path.basename(pixels_path)}", unit="file"):
            data, label = read_batch(path, size)
            out.append(data)
            labels.append(label)
    np.save(labels_path, np.concatenate(labels))


class ImageNetDataModule(GlowDataModule):
    """Downsampled ImageNet, 32x32 or 64x64: ``version`` oord (the Glow paper's) or downsampled.

    Args:
        version: ``oord`` (van den Oord et al., 2016: unlabelled PNG folders train_SxS/, valid_SxS/;
            the version of the Glow paper's table 2) or ``downsampled`` (Chrabaszcz et al., 2017:
            train_data_batch_1..10 and val_data, with labels). Their bits/dim are not comparable.
        image_size: 32 or 64.
        val_size: training images held out for validation (seeded): a count, or a fraction when a
            float below 1. The official validation images are the test set.
        download: the data cannot be downloaded automatically; with ``true`` a missing dataset is
            reported with where to get which files.
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...).
    """

    num_channels = 3

    def __init__(
        self,
        *,
        version: Literal["oord", "downsampled"] = "oord",
        image_size: Literal[32, 64] = 32,
        val_size: int | float = 10000,
        download: bool = False,
        **kwargs,
    ):
        super().__init__(val_size=val_size, download=download, **kwargs)
        if version not in ("oord", "downsampled"):
            raise ValueError(f"version must be 'oord' or 'downsampled', got {version!r}")
        if image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {image_size!r}")
        self.version, self.image_size = version, image_size
        self.dataset_classes = 1000 if version == "downsampled" else 0

    def no_labels_hint(self) -> str:
        return ": the oord version is unlabelled; use --data.version downsampled (Chrabaszcz et al., 2017)"

    # ---- files
    def converted(self, split: Literal["train", "test"]) -> tuple[str, str | None]:
        """(pixels .npy, labels .npy or None) of a split, beside the data."""
        s = self.image_size
        if self.version == "oord":
            return os.path.join(self.data_dir, f"{'train' if split == 'train' else 'valid'}_{s}x{s}.npy"), None
        stem = os.path.join(self.data_dir, f"Imagenet{s}_{'train' if split == 'train' else 'val'}")
        return stem + ".npy", stem + "_labels.npy"

    def _missing(self, what: str) -> DatasetError:
        manual = manual_download(self.version, self.image_size)
        if self.download:
            return DownloadError(f"ImageNet {self.image_size}x{self.image_size} ({self.version}) cannot be downloaded "
                                 f"automatically: {manual}; then pass --data.download false")  # fmt: skip
        return DatasetError(f"ImageNet ({self.version}) not found: {what} missing. To get it, {manual}")

    def _convert(self, split: Literal["train", "test"]) -> None:
        pixels_path, labels_path = self.converted(split)
        if os.path.isfile(pixels_path) and (labels_path is None or os.path.isfile(labels_path)):
            return
        if not os.path.isdir(self.data_dir):
            raise self._missing(f"data_dir={self.data_dir!r}")
        s = self.image_size
        if self.version == "oord":
            folder = os.path.join(self.data_dir, f"{'train' if split == 'train' else 'valid'}_{s}x{s}")
            if not os.path.isdir(folder):
                raise self._missing(folder)
            convert_png_folder(folder, pixels_path, s)
        else:
            names = TRAIN_BATCHES if split == "train" else VAL_BATCHES
            paths = [find_batch(self.data_dir, n) for n in names]
            missing = [n for n, p in zip(names, paths) if p is None]
            if missing:
                raise self._missing(f"{', '.join(missing)} (or .npz) in {self.data_dir} and its subfolders")
            convert_batches(paths, pixels_path, labels_path, s)

    @override
    def prepare_data(self) -> None:  # one process per machine: convert once
        for split in ("train", "test"):
            self._convert(split)

    def load_split(self, train: bool) -> NpyImages:
        split = "train" if train else "test"
        self._convert(split)  # a no-op after prepare_data; converts when setup is called alone
        pixels_path, labels_path = self.converted(split)
        shape = npy_shape(pixels_path)
        if shape[1:] != self.image_shape:
            raise DatasetError(f"{pixels_path} holds images of {shape[1:]}, expected {self.image_shape}: delete it")
        return NpyImages(pixels_path, labels_path)
