"""Tiny ImageNet (both versions), LSUN and CelebA-HQ datasets written in their real on-disk formats.

Each writer puts one known pixel at a documented position, so a reader is checked against the
format's definition, not only against what the same code wrote:

- every image i has red = i at pixel (row 0, col 0), green = 200 at (0, 0) and blue = 77 at pixel
  (row 1, col 2) (``KNOWN``); for the npz / pickle rows of C*H*W values these are ``row[0]``,
  ``row[S*S]`` and ``row[2*S*S + 1*S + 2]``.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

KNOWN_GREEN, KNOWN_BLUE = 200, 77


def known_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) random uint8 images with the known pixels set (red of image i at (0, 0) is i)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = KNOWN_GREEN
    images[:, 1, 2, 2] = KNOWN_BLUE
    return images


def write_imagenet_oord(root: str, size: int = 32, train: int = 24, valid: int = 6) -> str:
    """``root/train_SxS/*.png`` and ``root/valid_SxS/*.png`` as in van den Oord et al.'s tar files
    (names like theirs, e.g. ``0000001.png``, written out of order so the reader must sort)."""
    from PIL import Image

    for split, n, seed in (("train", train, 10), ("valid", valid, 11)):
        folder = os.path.join(root, f"{split}_{size}x{size}")
        os.makedirs(folder, exist_ok=True)
        images = known_images(n, size, seed)
        for i in reversed(range(n)):
            Image.fromarray(images[i]).save(os.path.join(folder, f"{i + 1:07d}.png"))
    return root


def write_imagenet_downsampled(root: str, size: int = 32, per_batch: int = 3, val: int = 6, npz: bool = True) -> str:
    """Chrabaszcz et al.'s files: ``Imagenet{S}_train[_npz]/train_data_batch_1..10[.npz]`` and
    ``Imagenet{S}_val[_npz]/val_data[.npz]``, each with ``data`` (N, 3*S*S) uint8 channel-major rows,
    ``labels`` in 1..1000 (image i of a batch: label i % 1000 + 1) and (train) ``mean``."""
    suffix = "_npz" if npz else ""
    batches = [(f"Imagenet{size}_train{suffix}", f"train_data_batch_{b}", per_batch, 20 + b) for b in range(1, 11)]
    batches.append((f"Imagenet{size}_val{suffix}", "val_data", val, 40))
    for folder, name, n, seed in batches:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        rows = known_images(n, size, seed).transpose(0, 3, 1, 2).reshape(n, -1)  # (N, C*H*W)
        entry = {"data": rows, "labels": [i % 1000 + 1 for i in range(n)]}
        if name != "val_data":
            entry["mean"] = rows.mean(0)
        path = os.path.join(root, folder, name)
        if npz:
            np.savez(path + ".npz", **entry)
        else:
            with open(path, "wb") as f:
                pickle.dump(entry, f)
    return root


def write_lsun(root: str, category: str = "tower", train: int = 20, val: int = 5) -> str:
    """``root/<category>_{train,val}_lmdb``: LMDBs like the official LSUN export, keys the 40-hex-digit
    image ids, values WebP bytes of images of mixed sizes (shorter side 60..90, aspect 4:3 or 3:4)."""
    import hashlib

    import lmdb
    from PIL import Image

    rng = np.random.default_rng(5)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", train), ("val", val)):
        env = lmdb.open(os.path.join(root, f"{category}_{split}_lmdb"), map_size=1 << 26)
        with env.begin(write=True) as txn:
            for i in range(n):
                h, w = (60 + i, 80 + i) if i % 2 else (100 + i, 75 + i)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "WEBP", lossless=True)
                txn.put(hashlib.sha1(f"{split}{i}".encode()).hexdigest().encode(), buf.getvalue())
        env.close()
    return root


def write_celebahq(root: str, n: int = 12, size: int = 64, jpg: bool = False) -> str:
    """CelebA-HQ as a folder: ``root/data256x256/00001.jpg ..`` (the JPEG export) or ``root/imgHQ00000.png ..``.
    Image files are written in reverse order; image i has red = i at (0, 0)."""
    from PIL import Image

    folder = os.path.join(root, "data256x256") if jpg else root
    os.makedirs(folder, exist_ok=True)
    images = known_images(n, size, 6)
    for i in reversed(range(n)):
        name = f"{i + 1:05d}.jpg" if jpg else f"imgHQ{i:05d}.png"
        Image.fromarray(images[i]).save(os.path.join(folder, name), **({"quality": 95} if jpg else {}))
    return root
