"""Image sets as memory-mapped uint8 ``.npy`` arrays: convert once, then share one copy per machine.

A dataset at ImageNet scale does not fit one copy per process (ImageNet 64x64 is 1,281,149 x 12,288
bytes = 15.7 GB). Its images are converted once into a ``(N, C, H, W)`` uint8 ``.npy`` file beside the
data (NumPy's format, version 1.0: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html)
and read with ``np.load(mmap_mode="r")``: every process and DataLoader worker maps the same file, the
operating system's page cache holds it once, and a batch is one fancy-indexing copy of its rows
(:meth:`NpyImages.get_batch`, used by the batched fetch of ``IndexedDataset``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import DatasetError

HEADER_BYTES = 256  # reserved for the .npy header (written last, when the row count is known)


class NpyWriter:
    """Append uint8 rows of ``row_shape`` to ``path`` (a ``.npy`` file) without holding them in memory.

    Written to ``path + ".partial"`` and renamed on success, so an interrupted conversion never
    leaves a truncated array that looks complete.
    """

    def __init__(self, path: str, row_shape: tuple[int, ...]):
        self.path, self.row_shape, self.rows = path, tuple(row_shape), 0
        self.partial = path + ".partial"
        self.file = open(self.partial, "wb")
        self.file.write(b"\0" * HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        if rows.shape[1:] != self.row_shape:
            raise DatasetError(f"rows of shape {rows.shape[1:]} appended to {self.path} of rows {self.row_shape}")
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        shape = (self.rows, *self.row_shape)
        header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
        header = header.ljust(HEADER_BYTES - 10 - 1) + "\n"  # magic (6) + version (2) + length (2)
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1"))
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.partial):
            os.remove(self.partial)

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close() if kind is None else self.abort()


def npy_shape(path: str) -> tuple[int, ...]:
    """The array shape in a ``.npy`` file's header (without reading the data)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    return tuple(header[0])


class NpyImages(Dataset):
    """Images of a ``(N, C, H, W)`` uint8 ``.npy`` file (and int64 labels of an ``(N,)`` one, or -1),
    memory-mapped on first access in each process (so pickling it to a worker copies two paths)."""

    def __init__(self, pixels_path: str, labels_path: str | None = None):
        self.pixels_path, self.labels_path = pixels_path, labels_path
        self.length = npy_shape(pixels_path)[0]
        self._pixels = self._labels = None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None, "_labels": None}

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
            if self.labels_path is not None:
                self._labels = np.load(self.labels_path, mmap_mode="r")
        return self._pixels, self._labels

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        pixels, labels = self._arrays()
        return torch.from_numpy(np.array(pixels[i])), int(labels[i]) if labels is not None else -1

    def get_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(uint8 (B, C, H, W), int64 (B,)) of the images ``index``: one copy of B rows of the map."""
        pixels, labels = self._arrays()
        rows = index.numpy()
        label = torch.from_numpy(labels[rows].astype(np.int64)) if labels is not None else torch.full_like(index, -1)
        return torch.from_numpy(pixels[rows]), label
