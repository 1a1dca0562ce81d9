"""SVHN (Netzer et al., 2011), cropped digits: 73,257 training, 26,032 test and 531,131 "extra"
images, 32x32 RGB, 10 classes.

Downloaded and checksummed by torchvision into ``data_dir/{train,test,extra}_32x32.mat``; read here
straight from those MATLAB files with ``scipy.io.loadmat`` (no checksum; ``pip install
glow-lightning[svhn]``). With ``download`` on, files already there that read well are used as they
are (checksums are for downloads). As in torchvision, the digit 0 (stored as label 10) gets label 0.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset
from typing_extensions import override

from .base import DataNotFoundError, GlowDataModule, UnreadableFileError, download

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn_mat(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An SVHN ``*_32x32.mat`` file -> (uint8 images (N, 3, 32, 32), int64 labels (N,) in 0..9)."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install 'glow-lightning[svhn]'") from err
    try:
        mat = loadmat(path)
        images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)  # (32, 32, 3, N) -> (N, 3, 32, 32)
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # 10 means the digit 0
    except Exception as err:  # loadmat: MatReadError, ValueError, TypeError...; a missing X or y: KeyError
        raise UnreadableFileError(f"cannot read SVHN file {path}: {type(err).__name__}: {err}") from err
    if len(images) != len(labels):
        raise UnreadableFileError(f"{path}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


class SVHNDataModule(GlowDataModule):
    """SVHN: ``data_dir/train_32x32.mat`` and ``test_32x32.mat``; validation held out of the training set.

    Args:
        extra: add the 531,131 "extra" images (``extra_32x32.mat``) to the training set.
        flip: random horizontal flips of training images (off: mirrored digits are not digits).
        **kwargs: the shared options of :class:`GlowDataModule` (data_dir, n_bits, batch_size, ...).
    """

    num_channels = 3
    image_size = 32
    dataset_classes = 10

    def __init__(self, *, extra: bool = False, flip: bool = False, **kwargs):
        super().__init__(flip=flip, **kwargs)
        self.extra = extra

    def _splits(self, train: bool) -> list[str]:
        return (["train"] + (["extra"] if self.extra else [])) if train else ["test"]

    def on_disk(self) -> bool:
        """Every needed ``*_32x32.mat`` file is in ``data_dir`` and its header reads well (the data is read at setup)."""
        try:
            from scipy.io import whosmat

            for split in self._splits(True) + self._splits(False):
                whosmat(os.path.join(self.data_dir, f"{split}_32x32.mat"))
        except Exception:
            return False
        return True

    @override
    def prepare_data(self) -> None:
        if self.download and not self.on_disk():
            from torchvision.datasets import SVHN

            def fetch():
                for split in self._splits(True) + self._splits(False):
                    SVHN(self.data_dir, split=split, download=True)

            def checksums():
                return [(os.path.join(self.data_dir, name), md5) for _, name, md5 in SVHN.split_list.values()]

            manual = f"download the *_32x32.mat files from {SVHN_URL} into data_dir"
            download("SVHN", self.data_dir, fetch, manual, checksums)

    def load_split(self, train: bool) -> TensorDataset:
        parts = []
        for split in self._splits(train):
            path = os.path.join(self.data_dir, f"{split}_32x32.mat")
            if not os.path.isfile(path):
                raise DataNotFoundError(
                    f"SVHN not found: {path} does not exist. Pass --data.download true to download it into "
                    f"data_dir={self.data_dir!r}, or download {SVHN_URL}{split}_32x32.mat there."
                )
            parts.append(read_svhn_mat(path))
        return TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
