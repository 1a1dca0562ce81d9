"""CelebA (Liu et al., 2015), aligned and cropped faces: 162,770 training, 19,867 validation and
19,962 test images of 178x218 pixels, with 40 binary attributes, split by ``list_eval_partition.txt``.

Layout (torchvision's): ``data_dir/celeba/img_align_celeba/*.jpg``, ``list_eval_partition.txt``,
``list_attr_celeba.txt`` (and ``identity_CelebA.txt``, ``list_bbox_celeba.txt``,
``list_landmarks_align_celeba.txt``, which are not needed here). Images are loaded lazily: a central
``crop_size`` square (148, as in RealNVP, Dinh et al., 2017, section 4.1) resized to ``image_size``
(64). ``n_bits`` defaults to 5, the Glow paper's setting for CelebA-HQ (Kingma & Dhariwal, 2018,
section 6). torchvision's download goes through Google Drive (``pip install glow-lightning[celeba]``
for gdown) and often hits its quota: see the README for the manual download.
"""

from __future__ import annotations

import os

from typing_extensions import override

from .base import DataNotFoundError, DatasetError, GlowDataModule, UnreadableFileError, download
from .folder import MAX_LISTED, ImageFiles

CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
PARTITIONS = {"train": 0, "val": 1, "test": 2}


def read_lines(path: str) -> list[str]:
    """The lines of a CelebA text file; a file that cannot be read (or is not text) is an UnreadableFileError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UnreadableFileError(f"cannot read {path}: {err}") from err


def read_partition(path: str) -> dict[str, int]:
    """``list_eval_partition.txt`` -> {image file name: 0 train / 1 val / 2 test}."""
    partition = {}
    for line_no, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise UnreadableFileError(f"{path}, line {line_no}: expected '<image> <0|1|2>', got {line.strip()!r}")
        partition[fields[0]] = int(fields[1])
    return partition


def read_attribute(path: str, name: str) -> dict[str, int]:
    """One column of ``list_attr_celeba.txt`` -> {image file name: 1 if the attribute is present else 0}."""
    lines = read_lines(path)  # the image count, the attribute names, then one line per image
    names = lines[1].split() if len(lines) > 1 else []
    if name not in names:
        raise DatasetError(f"attribute={name!r} is not a CelebA attribute; {path} has: {', '.join(names)}")
    column = names.index(name) + 1
    values = {}
    for line_no, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or fields[column] not in ("1", "-1"):
            raise UnreadableFileError(
                f"{path}, line {line_no}: expected an image name and {len(names)} values of 1 or -1, got {line.strip()!r}"
            )
        values[fields[0]] = int(fields[column] == "1")
    return values


class CelebADataModule(GlowDataModule):
    """CelebA faces: ``data_dir/celeba``; train / val / test from its own partition file.

    Args:
        image_size: height and width of the images the model sees.
        crop_size: side of the central square cropped from each 178x218 image before resizing.
        n_bits: bits per colour channel (1..8); 5 as in the Glow paper's CelebA-HQ models.
        attribute: a CelebA attribute (e.g. ``Male``, ``Smiling``) whose presence (1) or absence (0)
            is the label, for class-conditional training; without one, images have no label (-1).
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, batch_size, ...);
            ``val_size`` is ignored (CelebA has its own validation split).
    """

    check_shapes = False  # every image is resized and cropped to image_size on loading

    num_channels = 3

    def __init__(
        self, *, image_size: int = 64, crop_size: int = 148, n_bits: int = 5, attribute: str | None = None, **kwargs
    ):
        super().__init__(n_bits=n_bits, **kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(crop_size, int) or not 1 <= crop_size <= 178:
            raise ValueError(
                f"crop_size must be an integer in 1..178 (the images are 178 pixels wide), got {crop_size!r}"
            )
        self.image_size, self.crop_size, self.attribute = image_size, crop_size, attribute
        self.dataset_classes = 2 if attribute else 0

    def no_labels_hint(self) -> str:
        return ": set --data.attribute (e.g. Smiling) to condition on a CelebA attribute"

    @property
    def folder(self) -> str:
        return os.path.join(self.data_dir, "celeba")

    def on_disk(self) -> bool:
        """The images and the text files this run needs are in ``folder`` and read well."""
        try:
            for split in PARTITIONS:
                self._split(split)
        except DatasetError:
            return False
        return True

    @override
    def prepare_data(self) -> None:
        if self.download and not self.on_disk():
            from torchvision.datasets import CelebA

            def fetch():  # needs gdown; Google Drive often refuses it (quota)
                CelebA(self.data_dir, split="all", target_type="attr", download=True)

            def checksums():
                return [(os.path.join(self.folder, name), md5) for _, md5, name in CelebA.file_list]

            manual = f"from {CELEBA_URL} into {self.folder}, as the README shows"
            download("CelebA", self.data_dir, fetch, manual, checksums)

    def _split(self, split: str) -> ImageFiles:
        images = os.path.join(self.folder, "img_align_celeba")
        partition_path = os.path.join(self.folder, "list_eval_partition.txt")
        for path in (images, partition_path):
            if not os.path.exists(path):
                raise DataNotFoundError(
                    f"CelebA not found: {path} does not exist. Download img_align_celeba.zip and "
                    f"list_eval_partition.txt (and list_attr_celeba.txt) from {CELEBA_URL} into {self.folder} "
                    "and unzip the images there (see the README), or pass --data.download true."
                )
        names = sorted(n for n, p in read_partition(partition_path).items() if p == PARTITIONS[split])
        if self.attribute:
            attr_path = os.path.join(self.folder, "list_attr_celeba.txt")
            if not os.path.isfile(attr_path):
                raise DataNotFoundError(
                    f"attribute={self.attribute!r} needs {attr_path}: download it from {CELEBA_URL}"
                )
            values = read_attribute(attr_path, self.attribute)
            missing = [n for n in names if n not in values]
            if missing:
                raise UnreadableFileError(f"{attr_path} has no entry for {len(missing)} images, e.g. {missing[0]}")
            labels = [values[n] for n in names]
        else:
            labels = [-1] * len(names)
        paths = [os.path.join(images, n) for n in names]
        try:
            on_disk = set(os.listdir(images))
        except OSError as err:
            raise DatasetError(f"cannot list the CelebA images in {images}: {err.strerror or err}") from err
        absent = [n for n in names if n not in on_disk]
        if absent:  # found now, not when the first batch that holds one is loaded
            listed = ", ".join(absent[:MAX_LISTED]) + (" ..." if len(absent) > MAX_LISTED else "")
            raise DataNotFoundError(
                f"{len(absent)} of the {len(names)} {split} images in {partition_path} are not in {images}: {listed}"
            )
        return ImageFiles(paths, labels, self.num_channels, self.image_size, crop=self.crop_size)

    def load_split(self, train: bool) -> ImageFiles:
        return self._split("train" if train else "test")

    def load_val_split(self) -> ImageFiles:
        return self._split("val")
