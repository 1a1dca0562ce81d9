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
