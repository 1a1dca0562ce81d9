"""MNIST (LeCun et al., 1998) and Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test
images, 28x28 grayscale, 10 classes.

Downloaded and checksummed by torchvision into ``data_dir/MNIST/raw`` (``data_dir/FashionMNIST/raw``);
read here straight from the idx files (raw or ``.gz``, no checksum). With ``download`` on, files already
there that read well are used as they are: a recompressed ``.gz`` (other bytes than torchvision's MD5,
the same images) is not downloaded again. The images are zero-padded to
``image_size`` (32 by default) so that the multi-scale flow's squeezes divide evenly.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from typing_extensions import override

from .base import DataNotFoundError, DatasetError, GlowDataModule, UnreadableFileError, download

IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """Read an idx file of unsigned bytes (``path`` or ``path.gz``) -> uint8 array of its shape."""
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            break
    else:
        raise FileNotFoundError(path)
    opener = gzip.open if candidate.endswith(".gz") else open
    try:
        with opener(candidate, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
            raise ValueError("not an idx file of unsigned bytes (bad magic number)")
        ndim = raw[3]
        shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"header says shape {shape} but the file holds {data.size} values")
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise UnreadableFileError(f"cannot read idx file {candidate}: {err}") from err
    return data.reshape(shape)


class MNISTDataModule(GlowDataModule):
    """MNIST: ``data_dir/MNIST/raw``; validation held out of the 60,000 training images.

    Args:
        image_size: height and width after zero-padding the 28x28 digits (centred); at least 28.
        flip: random horizontal flips of training images (off: mirrored digits are not digits).
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...).
    """

    num_channels = 1
    dataset_classes = 10
    folder_name = "MNIST"
    url = "http://yann.lecun.com/exdb/mnist/"

    def __init__(self, *, image_size: int = 32, flip: bool = False, **kwargs):
        super().__init__(flip=flip, **kwargs)
        if not isinstance(image_size, int) or image_size < 28:
            raise ValueError(f"image_size must be an integer >= 28 (the images are padded), got {image_size!r}")
        self.image_size = image_size

    @property
    def folder(self) -> str:
        return os.path.join(self.data_dir, self.folder_name, "raw")

    def on_disk(self) -> bool:
        """All four idx files are in ``folder`` (raw or .gz) and read well."""
        try:
            for train in (True, False):
                self.load_split(train)
        except DatasetError:
            return False
        return True

    @override
    def prepare_data(self) -> None:
        if self.download and not self.on_disk():
            from torchvision import datasets

            dataset = getattr(datasets, self.folder_name)

            def fetch():
                for train in (True, False):
                    dataset(self.data_dir, train=train, download=True)

            manual = f"put the four idx files (raw or .gz) into {self.folder}"

            def checksums():
                return [(os.path.join(self.folder, name), md5) for name, md5 in dataset.resources]

            download(self.folder_name, self.data_dir, fetch, manual, checksums)

    def load_split(self, train: bool) -> TensorDataset:
        prefix = "train" if train else "t10k"
        images_path = os.path.join(self.folder, f"{prefix}-images-idx3-ubyte")
        try:
            images, labels = read_idx(images_path), read_idx(os.path.join(self.folder, f"{prefix}-labels-idx1-ubyte"))
        except FileNotFoundError as err:
            raise DataNotFoundError(
                f"{self.folder_name} not found: {err} (or .gz) does not exist. Pass --data.download true to "
                f"download it into data_dir={self.data_dir!r}, or put the idx files from {self.url} in {self.folder}."
            ) from None
        if images.ndim != 3 or len(images) != len(labels):
            raise UnreadableFileError(f"{images_path}: {images.shape} images do not match {labels.shape} labels")
        pixels = torch.from_numpy(images.copy())[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
        pad = self.image_size - pixels.shape[-1]
        pixels = F.pad(pixels, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))  # -> (N, 1, S, S), zeros
        return TensorDataset(pixels, torch.from_numpy(labels.astype(np.int64)))


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: ``data_dir/FashionMNIST/raw``; same layout and options as MNIST.

    Args:
        image_size: height and width after zero-padding the 28x28 images (centred); at least 28.
        flip: random horizontal flips of training images.
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...).
    """

    folder_name = "FashionMNIST"
    url = "https://github.com/zalandoresearch/fashion-mnist"
