"""Files/s of the image folders' pre-check (glow_lightning/data/imagecheck.py) on generated JPEGs.

    PYTHONPATH=$PWD python benchmarks/image_check.py --files 3000 --size 64

Writes ``--files`` random ``--size`` x ``--size`` JPEGs (quality 90) to a temporary folder, then times:
the header-only open the check used before (for comparison), the full decode cold (empty cache) with
1 thread and with the default thread count, and the same check again with the cache filled.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from PIL import Image  # noqa: E402

from glow_lightning.data import imagecheck  # noqa: E402
from glow_lightning.data.folder import check_image, find_images  # noqa: E402
from tests.fixtures import write_jpegs  # noqa: E402


def header_only(path: str) -> None:
    with Image.open(path) as img:
        img.size  # noqa: B018


def timed(label: str, n: int, run) -> float:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:7.2f} s  {n / seconds:9,.0f} files/s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        write_jpegs(folder, args.files, size=args.size)
        paths = find_images(folder)
        check = functools.partial(check_image, channels=3)
        workers = imagecheck.check_workers()
        print(f"{len(paths)} JPEGs of {args.size}x{args.size}, {os.path.getsize(paths[0])} bytes each; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        timed("header only (the old check), 1 thread", len(paths), lambda: [header_only(p) for p in paths])
        for threads in sorted({1, workers}):
            os.environ["GLOW_CACHE_DIR"] = os.path.join(tmp, f"cache{threads}")
            timed(
                f"full decode, cold, {threads} thread(s)",
                len(paths),
                lambda t=threads: imagecheck.find_unreadable(paths, check, workers=t),
            )
        timed(f"full decode, cached, {workers} thread(s)", len(paths), lambda: imagecheck.find_unreadable(paths, check))


if __name__ == "__main__":
    main()
