"""Data-throughput benchmark: images/s a datamodule delivers to the training step.

For each source (CIFAR-10 pickles, ImageNet 32x32 npz batches converted to a memory-mapped .npy, a
folder of PNG files, the streaming datamodule over a litdata conversion of the ImageNet data) and
each ``num_workers``, iterates the training DataLoader (batch 64) and times two figures after a few
warmup batches:

- ``loader``: raw batches out of the DataLoader (what a GPU's host feeds it);
- ``prepared``: after ``prepare_batch`` (what ``on_after_batch_transfer`` does: quantization, flips,
  dequantization noise), here on the CPU; on a GPU this step runs on the device.

The data are fixtures in the real formats, written to a temporary folder (tests/fixtures.py,
tests/large_fixtures.py), so the figures measure the loaders, not a disk:

    python benchmarks/data_throughput.py --images 20000 --seconds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from glow_lightning.data import CIFAR10DataModule, ImageFolderDataModule, ImageNetDataModule  # noqa: E402
from tests.fixtures import write_cifar10  # noqa: E402
from tests.large_fixtures import known_images, write_imagenet_downsampled  # noqa: E402


def write_png_folder(root: str, n: int) -> str:
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    for i, image in enumerate(known_images(n, 32, 7)):
        Image.fromarray(image).save(os.path.join(root, f"{i:06d}.png"))
    return root


def measure(dm, seconds: float, warmup: int = 5) -> tuple[float, float]:
    """(loader img/s, prepared img/s) over about ``seconds`` each, epochs repeated as needed."""
    dm.setup("fit")
    loader = dm.train_dataloader()

    def batches():
        while True:
            yield from loader

    results = []
    for prepare in (False, True):
        it = batches()
        for _ in range(warmup):
            next(it)
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            if prepare:
                batch = dm.prepare_batch(batch, train=True, epoch=0)
            images += len(batch["index"])
        results.append(images / (time.perf_counter() - start))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000, help="images per in-memory source")
    parser.add_argument("--folder-images", type=int, default=2000, help="PNG files in the image folder")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per figure")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="glow_data_bench_")
    per_batch = args.images // 10
    cifar = write_cifar10(os.path.join(tmp, "cifar"), per_batch=args.images // 5, test_size=10)
    imagenet = write_imagenet_downsampled(os.path.join(tmp, "imagenet32"), 32, per_batch=per_batch, val=10)
    folder = write_png_folder(os.path.join(tmp, "folder"), args.folder_images)
    common = dict(download=False, batch_size=64, val_size=64, flip=True, pin_memory=False)
    sources = {
        "CIFAR-10 (pickles, in memory)": lambda w: CIFAR10DataModule(data_dir=cifar, num_workers=w, **common),
        "ImageNet 32 (npz -> mmap .npy)": lambda w: ImageNetDataModule(
            data_dir=imagenet, version="downsampled", num_workers=w, **common
        ),
        "image folder (PNG, per-image PIL)": lambda w: ImageFolderDataModule(
            data_dir=folder, image_size=32, num_workers=w, check_files=False, **common
        ),
    }
    try:
        from glow_lightning.data import StreamingDataModule
        from glow_lightning.data.streaming import convert

        stream = os.path.join(tmp, "stream")
        convert(ImageNetDataModule(data_dir=imagenet, version="downsampled", **common, num_workers=0), stream,
                num_workers=2, start_method="fork")  # fmt: skip
        kwargs = {k: v for k, v in common.items() if k not in ("download", "val_size")}
        sources["streaming (litdata, local disk)"] = lambda w: StreamingDataModule(
            input_dir=stream, num_workers=w, **kwargs
        )
    except Exception as err:  # litdata missing: the other rows still run
        print(f"streaming skipped: {type(err).__name__}: {err}", file=sys.stderr)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    print("| source | num_workers | loader img/s | after prepare_batch (CPU) img/s |")
    print("|---|---|---|---|")
    for name, make in sources.items():
        for workers in args.workers:
            loader, prepared = measure(make(workers), args.seconds)
            print(f"| {name} | {workers} | {loader:,.0f} | {prepared:,.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
