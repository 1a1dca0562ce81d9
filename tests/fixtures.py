"""Small datasets written in the real on-disk formats, for tests that must never touch the network."""

from __future__ import annotations

import os
import pickle

import numpy as np


def write_cifar10(root: str, per_batch: int = 8, test_size: int = 10, seed: int = 0) -> str:
    """Write ``root/cifar-10-batches-py`` like the real archive: 5 training batches and a test batch.

    Each file is a pickled dict with ``data`` (uint8, N x 3072, channel-major) and ``labels``.
    Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(
            {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]},
            f,
        )
    return root


def write_idx(path: str, array: np.ndarray, gz: bool = False) -> None:
    """An idx file of unsigned bytes (MNIST's format): magic 0x0000 0x08 ndim, big-endian sizes, data."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    opener = gzip.open if gz else open
    with opener(path + (".gz" if gz else ""), "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: str, name: str = "MNIST", train_size: int = 30, test_size: int = 10, gz: bool = False) -> str:
    """``root/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` as torchvision stores them."""
    rng = np.random.default_rng(1)
    folder = os.path.join(root, name, "raw")
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", train_size), ("t10k", test_size)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), rng.integers(1, 256, (n, 28, 28)), gz)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), np.arange(n) % 10, gz)
    return root


def write_svhn(root: str, train_size: int = 30, test_size: int = 10) -> str:
    """``root/{train,test}_32x32.mat`` like the real files: X (32, 32, 3, N) uint8, y (N, 1) in 1..10."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", train_size), ("test", test_size)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # the digit 0 is stored as 10
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x, "y": y})
    return root


CELEBA_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Smiling", "Young"]


def write_celeba(root: str, partition: tuple[int, int, int] = (12, 4, 5)) -> str:
    """``root/celeba``: img_align_celeba/*.jpg (178x218), list_eval_partition.txt, list_attr_celeba.txt,
    identity_CelebA.txt, as in the real download (fewer attributes). Image i is Smiling iff i is even."""
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = os.path.join(root, "celeba")
    os.makedirs(os.path.join(folder, "img_align_celeba"), exist_ok=True)
    names, parts = [], []
    for part, n in enumerate(partition):
        parts += [part] * n
    for i, _ in enumerate(parts, 1):
        name = f"{i:06d}.jpg"
        names.append(name)
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(
            os.path.join(folder, "img_align_celeba", name), quality=90
        )
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{n} {p}\n" for n, p in zip(names, parts))
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{len(names)}\n" + " ".join(CELEBA_ATTRS) + " \n")
        for i, n in enumerate(names, 1):
            values = [1 if (a == "Smiling" and i % 2 == 0) or a == "Young" else -1 for a in CELEBA_ATTRS]
            f.write(n + "".join(f" {v:2d}" for v in values) + "\n")
    with open(os.path.join(folder, "identity_CelebA.txt"), "w") as f:
        f.writelines(f"{n} {i % 7 + 1}\n" for i, n in enumerate(names))
    return root


def write_image_folder(root: str, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 6) -> str:
    """PNGs and JPEGs of mixed sizes, modes and aspect ratios in one subfolder per class (or loose when
    ``classes`` is empty), plus a non-image file that must be skipped."""
    from PIL import Image

    rng = np.random.default_rng(4)
    sizes = [(40, 30), (25, 60), (64, 64), (100, 47)]
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(classes or ("",)):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(i + c) % len(sizes)]
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            mode = modes[i % len(modes)]
            img = img.convert(mode) if mode != "P" else img.quantize(16)
            ext = ".jpg" if mode in ("RGB", "L") else ".png"
            img.save(os.path.join(folder, f"img{i}{ext}"))
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not an image\n")
    return root


def write_png16(path: str, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16) written by hand: Pillow cannot write 16-bit RGB.

    PNG specification (W3C, 2003): signature, IHDR (bit depth 16, colour type 0 or 2), one zlib IDAT of
    filter-0 scanlines in big-endian samples, IEND.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = np.ascontiguousarray(pixels, dtype=">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_jpegs(folder: str, count: int, size: int = 64, seed: int = 5) -> list[str]:
    """``count`` random ``size`` x ``size`` RGB JPEGs (smooth enough to compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        img.save(paths[-1], quality=90)
    return paths
