"""Any folder of images (PNG, JPEG, BMP, GIF, TIFF, WebP), loaded lazily with Pillow.

Two layouts:

- ``data_dir/train/``, optionally ``val/`` and ``test/``: the splits as given (without ``val/`` the
  validation set is held out of ``train/`` with ``val_size``);
- one folder: ``test_fraction`` of it becomes the test set and ``val_size`` of the rest the
  validation set, both seeded.

In either, if the (train) folder holds only subfolders, each subfolder is a class (its images are
found recursively) and labels are the sorted subfolder names' indices; otherwise every image in it
is used, recursively, without a label (-1). Each image is turned upright (EXIF), converted to 1 or 3
channels, resized so that its shorter side is ``image_size`` and centre-cropped to a square.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .base import DatasetError, GlowDataModule

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
NO_LABEL = -1
MAX_LISTED = 20


class UnreadableImageError(DatasetError, RuntimeError):
    """An image file Pillow cannot read (the ``glow`` command reports it in one line, without a traceback)."""


def load_image(path: str, channels: int, size: int, crop: int | None = None) -> torch.Tensor:
    """Read an image -> uint8 (channels, size, size): upright, centre crop (``crop`` square or the
    largest), resized with an antialiasing filter. Unreadable files raise an error naming ``path``."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB")
            if crop is not None:
                left, top = (img.width - crop) // 2, (img.height - crop) // 2
                img = img.crop((left, top, left + crop, top + crop))
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image file {path}: {err}") from err
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def check_images(paths: list[str]) -> None:
    """Open every file's header; raise one error listing all the files Pillow cannot read."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 (the header is parsed on open)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            bad.append(f"{path} ({err})")
    if bad:
        listed = "\n  ".join(bad[:MAX_LISTED]) + (
            f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        )
        raise UnreadableImageError(f"{len(bad)} of {len(paths)} image files cannot be read:\n  {listed}")


class ImageFiles(Dataset):
    """Image files loaded on access: items ``(uint8 image (C, S, S), label)``."""

    def __init__(self, paths: list[str], labels: list[int], channels: int, size: int, crop: int | None = None):
        self.paths, self.labels = paths, labels
        self.channels, self.size, self.crop = channels, size, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[i], self.channels, self.size, self.crop), self.labels[i]


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def find_images(folder: str) -> list[str]:
    """All image files under ``folder``, recursively, sorted (hidden files and folders skipped)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if is_image(f))
    return sorted(found)


def class_folders(folder: str) -> list[str] | None:
    """The class names of ``folder`` (its subfolders) if it holds only subfolders, else ``None``."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    subdirs = sorted(e for e in entries if os.path.isdir(os.path.join(folder, e)))
    loose = [e for e in entries if is_image(e)]
    return subdirs if subdirs and not loose else None


class ImageFolderDataModule(GlowDataModule):
    """Your own images: ``data_dir`` with ``train/`` (``val/``, ``test/``) subfolders, or one folder.

    Args:
        image_size: height and width of the square images the model sees (shorter side resized to
            this, then centre-cropped).
        channels: 3 (RGB) or 1 (grayscale); images are converted.
        val_size: when there is no ``val/`` folder: images held out of the training images for
            validation, a count or (float below 1) a fraction, seeded.
        test_fraction: one-folder layout only: the fraction of the images (at least one) held out as
            the test set, seeded.
        check_files: open every file's header at setup and report all unreadable files at once
            (otherwise a bad file stops training when it is first loaded).
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...);
            ``download`` is ignored (there is nothing to download).
    """

    check_shapes = False  # every image is resized and cropped to image_size on loading

    def __init__(
        self,
        *,
        image_size: int = 64,
        channels: int = 3,
        val_size: int | float = 0.05,
        test_fraction: float = 0.1,
        check_files: bool = True,
        **kwargs,
    ):
        super().__init__(val_size=val_size, **kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.image_size, self.num_channels = image_size, channels
        self.test_fraction, self.check_files = test_fraction, check_files
        self._classes: list[str] | None = None
        self._files: dict[str, list[tuple[str, int]] | None] = {}

    # ---- layout
    def _check_dir(self) -> None:
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(
                f"image folder not found: {self.data_dir} does not exist. Point --data.data_dir at a folder of "
                "images, or at one with train/ (val/, test/) subfolders."
            )

    @property
    def split_layout(self) -> bool:
        return os.path.isdir(os.path.join(self.data_dir, "train"))

    @property
    def classes(self) -> list[str]:
        """The class names (sorted subfolder names of the training folder); empty without labels."""
        if self._classes is None:
            self._check_dir()
            root = os.path.join(self.data_dir, "train") if self.split_layout else self.data_dir
            self._classes = class_folders(root) or []
        return self._classes

    @property
    def dataset_classes(self) -> int:
        return len(self.classes)

    def no_labels_hint(self) -> str:
        return f": put the images of each class in its own subfolder of {self.data_dir} (or of its train/)"

    def _list(self, folder: str) -> list[tuple[str, int]]:
        """(path, label) of every image in ``folder``, by the training folder's classes."""
        if not self.classes:
            files = [(p, NO_LABEL) for p in find_images(folder)]
        else:
            names = class_folders(folder)
            if names is None:
                raise ValueError(f"{folder} must hold one subfolder per class like the training folder: {self.classes}")
            unknown = sorted(set(names) - set(self.classes))
            if unknown:
                raise ValueError(f"{folder} has classes the training folder lacks: {unknown}")
            index = {name: i for i, name in enumerate(self.classes)}
            files = [(p, index[n]) for n in names for p in find_images(os.path.join(folder, n))]
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
        if self.check_files:
            check_images([p for p, _ in files])
        return files

    def _split_files(self, split: str) -> list[tuple[str, int]] | None:
        """The files of a split; ``None`` for val when the layout has none (it is held out of train)."""
        if split not in self._files:
            self._check_dir()
            if self.split_layout:
                folder = os.path.join(self.data_dir, split)
                if os.path.isdir(folder):
                    self._files[split] = self._list(folder)
                elif split == "val":
                    self._files[split] = None
                else:
                    raise FileNotFoundError(f"no {split}/ folder in {self.data_dir} (it has a train/ folder)")
            else:
                files = self._list(self.data_dir)
                if len(files) < 3:
                    raise ValueError(f"{self.data_dir} has {len(files)} images: too few to split into train/val/test")
                perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed)).tolist()
                n_test = max(1, math.ceil(self.test_fraction * len(files)))
                self._files["test"] = [files[i] for i in sorted(perm[:n_test])]
                self._files["train"] = [files[i] for i in sorted(perm[n_test:])]
                self._files["val"] = None
        return self._files[split]

    def _dataset(self, files: list[tuple[str, int]]) -> ImageFiles:
        paths, labels = zip(*files)
        return ImageFiles(list(paths), list(labels), self.num_channels, self.image_size)

    def load_split(self, train: bool) -> ImageFiles:
        return self._dataset(self._split_files("train" if train else "test"))

    def load_val_split(self) -> ImageFiles | None:
        files = self._split_files("val")
        return self._dataset(files) if files is not None else None
