"""Files: checkpoints that survive a kill, live on any fsspec filesystem and never run pickled code;
image-grid PNGs; path joins that work for local paths and URLs alike.

- **Atomic writes.** A checkpoint is serialised in memory, written to a temporary file *beside* its
  target (``.<name>.<random>.part``, same directory, so the same filesystem) and renamed over it.
  A SIGKILL at any moment leaves either the old or the new file, never a truncated one. Lightning
  2.6's ``_atomic_save`` writes through an fsspec transaction whose temporary file lies in the system
  temp directory and is moved with ``shutil.move``: across filesystems that is a copy, and a kill
  during the copy truncates the target. Object stores (s3, gcs) get a single upload instead, which
  is atomic there. Temporaries of a killed writer are removed at the next fit
  (:func:`remove_stale_temporaries`).
- **Safe loading.** Every load goes through ``torch.load(weights_only=True)``: a checkpoint whose
  pickle would run code is refused (glow checkpoints hold only tensors and plain types).
- **Clear errors.** An unreadable (truncated, corrupt) checkpoint raises
  :class:`UnreadableCheckpointError` naming the file; an unwritable directory raises
  :class:`NotWritableError` naming it, before any training.
- **Grids.** :func:`save_grid` writes an image grid as a PNG to a local path or fsspec URL, optionally upscaled
  and with a header row.

Private library API used here (check on upgrades): ``lightning.fabric.utilities.cloud_io._is_object_storage``.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import uuid
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import _is_object_storage
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from .flow.checks import CheckpointFileError, describe_checkpoint_problem, first_line, read_checkpoint

TEMP_PATTERN = re.compile(r"^\..+\.ckpt\.[0-9a-f]{12}\.part$")
CHUNK = 1 << 24  # bytes per write call


class UnreadableCheckpointError(CheckpointFileError):
    """A checkpoint file that cannot be loaded (truncated, corrupt, or holding code to run) or is not a glow
    checkpoint (a plain state_dict, another program's file)."""


class NotWritableError(OSError):
    """An output directory (run or checkpoint directory) that cannot be written to."""


def require_glow_checkpoint(ckpt: dict, path: str) -> dict:
    """``ckpt`` if it is a ``glow fit`` checkpoint (weights and hyperparameters), else an
    :class:`UnreadableCheckpointError` saying what the file holds instead."""
    problem = describe_checkpoint_problem(ckpt, path)
    if problem:
        raise UnreadableCheckpointError(problem)
    return ckpt


def join(directory: str, name: str) -> str:
    """``directory/name`` for local paths and URLs alike."""
    return directory.rstrip("/") + "/" + name


def save_grid(grid: torch.Tensor, path: str, *, scale: int = 1, header: str | None = None) -> str:
    """Write a (3, H, W) grid in [0, 1] as a PNG (local path or fsspec URL); returns the path.

    ``scale``: nearest-neighbour upscaling (each pixel a ``scale`` x ``scale`` block); ``header``: a text row on
    top (:func:`glow_lightning.flow.visualize.labelled`).
    """
    from torchvision.utils import save_image

    from .flow.visualize import labelled

    grid = labelled(grid, header, scale)

    fs, fs_path = url_to_fs(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        save_image(grid, f, format="png")
    return path


def _write_chunks(f, data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        f.write(data[start : start + CHUNK])


def atomic_write(path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` (local path or fsspec URL) so that readers see all of it or none of it."""
    fs, target = url_to_fs(str(path))
    parent, name = posixpath.split(target)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_object_storage(fs):
        fs.pipe_file(target, bytes(data))  # an object appears only once its upload completes
        return
    temp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with fs.open(temp, "wb") as f:
            _write_chunks(f, memoryview(data))
            if isinstance(fs, LocalFileSystem):
                f.flush()
                os.fsync(f.fileno())
        if isinstance(fs, LocalFileSystem):
            os.replace(temp, target)  # atomic on POSIX and Windows, same directory = same filesystem
        else:
            fs.mv(temp, target)
    except BaseException:
        if fs.exists(temp):
            fs.rm(temp)
        raise


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the ``.*.ckpt.*.part`` files that a killed writer left in ``directory``; return their names."""
    fs, root = url_to_fs(str(directory))
    if not fs.isdir(root):
        return []
    stale = [p for p in fs.ls(root, detail=False) if TEMP_PATTERN.match(posixpath.basename(p))]
    for p in stale:
        fs.rm(p)
    return [posixpath.basename(p) for p in stale]


def check_writable(path: str, what: str) -> None:
    """Create ``path`` if needed and write a probe file there; raise :class:`NotWritableError` if that fails."""
    try:
        fs, root = url_to_fs(str(path))
        fs.makedirs(root, exist_ok=True)
        probe = posixpath.join(root, f".glow-write-check-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as err:
        raise NotWritableError(f"{what} {path} is not writable ({first_line(err)})") from err


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict:
    """``torch.load(weights_only=True)`` of a local path or fsspec URL, with errors that name the file."""
    return read_checkpoint(path, map_location, error=UnreadableCheckpointError)


def checkpoint_write_error(path: str, err: OSError) -> str:
    """The message for a failed checkpoint write: the directory, the reason and the checkpoint still intact.

    Writes are atomic, so the file being replaced still holds its previous version; a new file's
    directory still holds the newest earlier checkpoint.
    """
    directory = posixpath.dirname(path.rstrip("/")) or "."
    try:
        fs, target = url_to_fs(path)
        if fs.exists(target):
            return f"cannot write checkpoint {path} in {directory} ({first_line(err)}); its previous version is intact"
        kept = [p for p in fs.ls(posixpath.dirname(target), detail=True) if p["name"].endswith(".ckpt")]
    except OSError:
        kept = []
    if kept:
        newest = max(kept, key=lambda p: p.get("mtime", 0))["name"]
        intact = f"the previous checkpoint {join(directory, posixpath.basename(newest))} is intact"
    else:
        intact = "no earlier checkpoint exists there"
    return f"cannot write checkpoint {path} in {directory} ({first_line(err)}); {intact}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic writes beside the target, ``weights_only=True`` loads, any fsspec URL.

    The ``glow`` CLI's :class:`~glow_lightning.cli.subcommands.GlowTrainer` adds it when no CheckpointIO plugin is given.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write(str(path), buffer.getbuffer())
        except OSError as err:  # disk full, read-only or vanished directory: one line, not a traceback
            raise NotWritableError(checkpoint_write_error(str(path), err)) from err

    @override
    def load_checkpoint(
        self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is forced: no glow checkpoint needs pickled code, so none is ever run
        return load_checkpoint_file(str(path), map_location=map_location)
