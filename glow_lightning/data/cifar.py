"""CIFAR-10 (Krizhevsky, 2009): 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

Downloaded and checksummed by torchvision; read here straight from the standard
``cifar-10-batches-py`` pickle layout (no checksum), so small fixtures in the real format work. With
``download`` on, batch files already there that read well are used as they are (checksums are for
downloads).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import TensorDataset
from typing_extensions import override

from .base import DataNotFoundError, DatasetError, GlowDataModule, UnreadableFileError, download

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


def read_cifar_batches(folder: str, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read pickled CIFAR batches -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except FileNotFoundError as err:
            raise DataNotFoundError(
                f"CIFAR-10 batch file {path} does not exist: download {CIFAR10_URL} and extract it into data_dir, "
                "or pass --data.download true"
            ) from err
        except Exception as err:  # a pickle can fail in many ways: UnpicklingError, EOFError, KeyError, TypeError...
            raise UnreadableFileError(f"cannot read CIFAR-10 batch file {path}: {type(err).__name__}: {err}") from err
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


class CIFAR10DataModule(GlowDataModule):
    """CIFAR-10: ``data_dir/cifar-10-batches-py``; validation held out of the 50,000 training images."""

    num_channels = 3
    image_size = 32
    dataset_classes = 10

    @property
    def folder(self) -> str:
        return os.path.join(self.data_dir, "cifar-10-batches-py")

    def on_disk(self) -> bool:
        """Every batch file is in ``folder`` and reads well."""
        try:
            for train in (True, False):
                self.load_split(train)
        except DatasetError:
            return False
        return True

    @override
    def prepare_data(self) -> None:
        if self.download and not self.on_disk():
            from torchvision.datasets import CIFAR10

            def fetch():
                for train in (True, False):
                    CIFAR10(self.data_dir, train=train, download=True)

            def checksums():
                archive = [(os.path.join(self.data_dir, CIFAR10.filename), CIFAR10.tgz_md5)]
                return archive + [
                    (os.path.join(self.folder, n), md5) for n, md5 in CIFAR10.train_list + CIFAR10.test_list
                ]

            manual = f"download {CIFAR10_URL} and extract it into data_dir"
            download("CIFAR-10", self.data_dir, fetch, manual, checksums)

    def load_split(self, train: bool) -> TensorDataset:
        if not os.path.isdir(self.folder):
            raise DataNotFoundError(
                f"CIFAR-10 not found: {self.folder} does not exist. Pass --data.download true to download it "
                f"into data_dir={self.data_dir!r}, or download {CIFAR10_URL} and extract it there."
            )
        return TensorDataset(*read_cifar_batches(self.folder, TRAIN_FILES if train else TEST_FILES))
