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

import functools
import io
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .base import DataNotFoundError, DatasetError, GlowDataModule
from .imagecheck import find_unreadable

SRGB = ImageCms.createProfile("sRGB")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
HIDDEN_FOLDERS = ("__MACOSX",)  # macOS zip archives' resource forks
NO_LABEL = -1
MAX_LISTED = 20
WHITE = 255  # transparent pixels are composited onto white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImageError(DatasetError, RuntimeError):
    """An image file Pillow cannot read (the ``glow`` command reports it in one line, without a traceback)."""


def to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> ``L`` (channels 1) or ``RGB`` (3); see the README's table of modes.

    16-bit pixels p become ``p >> 8`` (Pillow's own conversion clips them at 255); transparency is
    composited onto white; CMYK with an embedded ICC profile is converted to sRGB through it; float
    images (``F``) are refused: their range is unknown.
    """
    mode = img.mode
    if mode == "F":
        raise ValueError("float pixels (mode F) have no fixed range: save the image as 8- or 16-bit")
    if mode in SIXTEEN_BIT_MODES or mode == "I":  # "I": how Pillow < 10 opens 16-bit PNGs
        p = np.asarray(img).astype(np.int64)
        if mode == "I" and p.size and (p.min() < 0 or p.max() > 0xFFFF):
            raise ValueError("32-bit integer pixels (mode I) beyond 0..65535: save the image as 8- or 16-bit")
        img = Image.fromarray((p >> 8).astype(np.uint8), "L")
    elif mode == "CMYK" and img.info.get("icc_profile"):
        img = ImageCms.profileToProfile(
            img, ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"])), SRGB, outputMode="RGB"
        )
    elif mode == "P" or mode == "PA":
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:  # a tRNS colour key
        img = img.convert("LA" if mode == "L" else "RGBA")
    if img.mode in ("RGBA", "LA"):
        opaque = img.mode[:-1]  # "RGB" or "L"
        background = Image.new(opaque, img.size, (WHITE,) * len(opaque))
        background.paste(img.convert(opaque), mask=img.getchannel("A"))
        img = background
    return img.convert("L" if channels == 1 else "RGB")


def load_image(path: str, channels: int, size: int, crop: int | None = None) -> torch.Tensor:
    """Read an image -> uint8 (channels, size, size): upright, centre crop (``crop`` square or the
    largest), resized with an antialiasing filter. Unreadable files raise an error naming ``path``."""
    try:
        with Image.open(path) as img:
            img = to_8bit(ImageOps.exif_transpose(img), channels)
            if crop is not None:
                left, top = (img.width - crop) // 2, (img.height - crop) // 2
                img = img.crop((left, top, left + crop, top + crop))
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageCms.PyCMSError) as err:
        raise UnreadableImageError(f"cannot read image file {path}: {err}") from err
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)


def check_image(path: str, channels: int = 3) -> str | None:
    """Decode ``path`` fully and convert its mode as :func:`load_image` would: ``None`` if it loads, else why not."""
    try:
        with Image.open(path) as img:
            img.load()  # the whole file: a truncated JPEG fails here, not mid-epoch
            to_8bit(img, channels)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageCms.PyCMSError) as err:
        return str(err) or type(err).__name__
    return None


def unreadable_message(bad: list[tuple[str, str]], total: int, verb: str = "cannot be read") -> str:
    """``"N of M image files cannot be read:"`` and the first ``MAX_LISTED`` of them, one per line."""
    listed = "\n  ".join(f"{path} ({why})" for path, why in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{len(bad)} of {total} image files {verb}:\n  {listed}{more}"


def check_images(paths: list[str], channels: int = 3) -> None:
    """Decode every file (in parallel, cached); raise one error listing all the files that cannot be read."""
    bad = find_unreadable(paths, functools.partial(check_image, channels=channels))
    if bad:
        raise UnreadableImageError(unreadable_message(bad, len(paths)))


class ImageFiles(Dataset):
    """Image files loaded on access: items ``(uint8 image (C, S, S), label)``."""

    def __init__(self, paths: list[str], labels: list[int], channels: int, size: int, crop: int | None = None):
        self.paths, self.labels = paths, labels
        self.channels, self.size, self.crop = channels, size, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.paths[i], self.channels, self.size, self.crop), self.labels[i]


def is_hidden(name: str) -> bool:
    """Dot-names (``.DS_Store``, ``._photo.jpg``, ``.git``) and ``__MACOSX``: never images or classes."""
    return name.startswith(".") or name in HIDDEN_FOLDERS


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(name)


def list_dir(folder: str) -> list[os.DirEntry]:
    """The visible entries of ``folder``, sorted by name; a folder that cannot be listed is a DatasetError."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
    except OSError as err:
        raise DatasetError(f"cannot list image folder {folder}: {err.strerror or err}") from err


def find_images(folder: str) -> list[str]:
    """All image files under ``folder``, recursively, sorted (hidden files and folders skipped).

    Symbolic links are followed, but each real folder is visited once and each real file listed once
    (under the first path that reaches it): a link loop or a link to an ancestor adds nothing.
    """
    found, seen_dirs, seen_files = [], set(), set()

    def visit(path: str) -> None:
        real = os.path.realpath(path)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        for entry in list_dir(path):
            if entry.is_dir():  # follows links
                visit(entry.path)
            elif is_image(entry.name):  # a file, or a dangling link (the pre-check reports it)
                real_file = os.path.realpath(entry.path)
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    found.append(entry.path)

    visit(folder)
    return sorted(found)


def class_folders(folder: str) -> list[str] | None:
    """The class names of ``folder`` (its subfolders) if it holds only subfolders, else ``None``."""
    entries = list_dir(folder)
    subdirs = [e.name for e in entries if e.is_dir()]
    loose = [e for e in entries if is_image(e.name) and not e.is_dir()]
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
        check_files: decode every file at setup (in parallel, with the results cached by path, size
            and modification time) and report all unreadable files at once; otherwise a bad file stops
            training when it is first loaded.
        skip_unreadable: train and evaluate on the readable files: the unreadable ones are listed (with
            their count) in a warning and left out, instead of stopping at setup. Needs ``check_files``.
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
        skip_unreadable: bool = False,
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
        if skip_unreadable and not check_files:
            raise ValueError("skip_unreadable=True needs check_files=True (the check finds the files to skip)")
        self.test_fraction, self.check_files, self.skip_unreadable = test_fraction, check_files, skip_unreadable
        self._classes: list[str] | None = None
        self._files: dict[str, list[tuple[str, int]] | None] = {}

    # ---- layout
    def _check_dir(self) -> None:
        if not os.path.isdir(self.data_dir):
            raise DataNotFoundError(
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
            self._classes = class_folders(self.train_folder) or []
        return self._classes

    @property
    def dataset_classes(self) -> int:
        return len(self.classes)

    def no_labels_hint(self) -> str:
        return f": put the images of each class in its own subfolder of {self.data_dir} (or of its train/)"

    @property
    def train_folder(self) -> str:
        return os.path.join(self.data_dir, "train") if self.split_layout else self.data_dir

    def _labelled(self, folder: str) -> list[tuple[str, int]]:
        """(path, label) of every image in ``folder``: labels by the training folder's classes.

        Unconditional models take any subfolders (a held-out set from other sources): images under a
        class the training folder lacks, or loose ones, get no label (-1). A class-conditional model
        needs every subfolder to be a training class.
        """
        names = class_folders(folder) if self.classes and folder != self.train_folder else self.classes
        if not self.classes or (names is None and not self.class_conditional):
            return [(p, NO_LABEL) for p in find_images(folder)]
        if names is None:
            raise DatasetError(
                f"{folder} must hold one subfolder per class, like {self.train_folder}: {self.classes} "
                "(class_conditional=True)"
            )
        unknown = sorted(set(names) - set(self.classes))
        if unknown and self.class_conditional:
            raise DatasetError(
                f"{folder} has classes that {self.train_folder} lacks: {unknown} (class_conditional=True needs "
                f"them among the training classes: {self.classes})"
            )
        index = {name: i for i, name in enumerate(self.classes)}
        return [(p, index.get(n, NO_LABEL)) for n in names for p in find_images(os.path.join(folder, n))]

    def _list(self, folder: str) -> list[tuple[str, int]]:
        """(path, label) of every image in ``folder``, checked (``check_files``)."""
        files = self._labelled(folder)
        if not files:
            raise DataNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
        if self.check_files:
            bad = find_unreadable([p for p, _ in files], functools.partial(check_image, channels=self.num_channels))
            if bad and not self.skip_unreadable:
                raise UnreadableImageError(
                    unreadable_message(bad, len(files)) + "\n(--data.skip_unreadable true trains on the rest)"
                )
            if bad:
                warnings.warn(unreadable_message(bad, len(files), verb="cannot be read and are skipped"), stacklevel=2)
                skipped = {p for p, _ in bad}
                files = [(p, label) for p, label in files if p not in skipped]
                if not files:
                    raise UnreadableImageError(f"no readable image files in {folder}")
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
                    raise DataNotFoundError(f"no {split}/ folder in {self.data_dir} (it has a train/ folder)")
            else:
                files = self._list(self.data_dir)
                if len(files) < 3:
                    raise DatasetError(f"{self.data_dir} has {len(files)} images: too few to split into train/val/test")
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
