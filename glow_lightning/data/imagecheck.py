"""The image folders' pre-check: decode every file once, in parallel, before training starts.

A file that only fails when it is decoded (a truncated JPEG: "image file is truncated") would
otherwise stop training mid-epoch. The check runs in a thread pool: Pillow's decoders release the
GIL, so threads decode in parallel without pickling paths and results between processes.

Results are cached by (path, size, mtime) in one small JSON file per folder under the user's cache
directory (``$GLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/glow-lightning``, else
``~/.cache/glow-lightning``), not in the data folder: data folders are often read-only (shared
datasets, mounted volumes) or shared between users, and a user's photo folder should not gain files.
A cache that cannot be read or written is ignored: the check then decodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import PIL

CACHE_VERSION = 1  # bump when the check changes what it accepts
PROGRESS_MIN_FILES = 200  # smaller folders are checked without a progress bar


def cache_dir() -> str:
    """Where the pre-check's results are cached (see the module docstring)."""
    if os.environ.get("GLOW_CACHE_DIR"):
        return os.environ["GLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glow-lightning")


def cache_path(paths: list[str]) -> str:
    """One cache file per folder: named by a hash of the folder that holds the listed files."""
    folder = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
    digest = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir(), f"image-check-{digest}.json")


def file_key(path: str) -> list[int] | None:
    """(size, mtime in ns) of ``path``; ``None`` if it cannot be stat'ed (the check reports it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict) or cache.get("version") != [CACHE_VERSION, PIL.__version__]:
        return {}
    files = cache.get("files")
    return files if isinstance(files, dict) else {}


def write_cache(path: str, files: dict) -> None:
    """Write atomically (DDP ranks may write the same file); give up silently where it cannot be written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": [CACHE_VERSION, PIL.__version__], "files": files}, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def check_workers() -> int:
    """Threads of the check: the CPUs this process may use (at most 16)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def find_unreadable(
    paths: list[str], check: Callable[[str], str | None], cache: bool = True, workers: int | None = None
) -> list[tuple[str, str]]:
    """``(path, reason)`` of every file that ``check`` rejects, in the order of ``paths``.

    Files whose (path, size, mtime) is in the cache are not decoded again.
    """
    from tqdm.auto import tqdm  # a dependency of Lightning

    where = cache_path(paths) if cache else None
    cached = read_cache(where) if where else {}
    keys = {p: file_key(p) for p in paths}
    results: dict[str, str | None] = {}
    todo = []
    for p in paths:
        entry = cached.get(os.path.abspath(p))
        if keys[p] is not None and isinstance(entry, list) and len(entry) == 3 and entry[:2] == keys[p]:
            results[p] = entry[2]
        else:
            todo.append(p)
    if todo:
        quiet = len(todo) < PROGRESS_MIN_FILES or None  # None: a bar only on a terminal
        bar = tqdm(total=len(todo), desc="checking image files", unit="file", leave=False, disable=quiet)
        with ThreadPoolExecutor(max_workers=workers or check_workers()) as pool:
            for p, reason in zip(todo, pool.map(check, todo)):
                results[p] = reason
                bar.update()
        bar.close()
        if where:
            write_cache(where, {os.path.abspath(p): [*keys[p], results[p]] for p in paths if keys[p] is not None})
    return [(p, results[p]) for p in paths if results[p] is not None]
