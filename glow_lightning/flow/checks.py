"""Input checks of :class:`~glow_lightning.flow.Glow`: each bad input is a ValueError naming the value.

Shapes, dtypes and devices are checked on every call (no host sync). Values (finite, in [0, 1],
labels in range) need a host sync, so :func:`check_value_ranges` runs in eval mode and at initialisation
only: the training step stays sync-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_images(flow, x: Tensor) -> None:
    expected = (flow.in_channels, flow.image_size, flow.image_size)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"x must be a (B, {expected[0]}, {expected[1]}, {expected[2]}) batch of images for this Glow "
            f"(in_channels={flow.in_channels}, image_size={flow.image_size}), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"x must be floating-point images in [0, 1], got dtype {x.dtype}: convert pixels with "
            f"x.float() / 255 (8 bits) or glow_lightning.flow.quantize.bins_to_unit"
        )
    if x.device != flow.device:
        raise ValueError(f"x is on {x.device} but this Glow is on {flow.device}: move x with x.to(flow.device)")


def check_value_ranges(flow, x: Tensor, labels: Tensor | None, always: bool = False) -> None:
    """x finite in [0, 1], labels in range: in eval mode (or ``always``) only, since it syncs with the host
    and the training step stays sync-free. After :func:`check_images`."""
    if (flow.training and not always) or x.numel() == 0 or torch.compiler.is_compiling():
        return
    finite, low, high = torch.stack([torch.isfinite(x).all().to(x.dtype), x.min(), x.max()]).tolist()
    if not finite:
        raise ValueError(f"x holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"x must hold images in [0, 1], got values in [{low:g}, {high:g}] (pixels 0..255 must be divided "
            "by 255; images centred at 0 must be shifted by +0.5)"
        )
    if flow.num_classes and labels is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= flow.num_classes:
            raise ValueError(f"labels must be in 0..{flow.num_classes - 1}, got values in {lo}..{hi}")


def check_labels(flow, labels: Tensor | None, batch_size: int) -> None:
    if flow.num_classes and labels is not None:
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")


def check_latents(flow, latents: Sequence[Tensor]) -> None:
    if len(latents) != flow.levels:
        raise ValueError(f"latents must hold one tensor per level ({flow.levels}), got {len(latents)}")
    for i, (z, shape) in enumerate(zip(latents, flow.latent_shapes)):
        if not isinstance(z, Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != shape:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"latents[{i}] must have shape (B, {', '.join(map(str, shape))}), got {got}")
        if z.shape[0] != latents[0].shape[0]:
            raise ValueError(f"latents must share one batch size, got {[tuple(t.shape) for t in latents]}")


class CheckpointFileError(ValueError):
    """A file that is not a usable ``glow fit`` checkpoint: unreadable, another kind of file, or inconsistent."""


def describe_checkpoint_problem(ckpt: dict, path: str) -> str | None:
    """Why ``ckpt`` (a loaded dict) is not a ``glow fit`` checkpoint, in one line naming ``path``; None if it is one."""
    if "state_dict" in ckpt and "hyper_parameters" in ckpt:
        return None
    if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        flow_keys = any(k.startswith(("steps.", "top_prior.")) for k in ckpt)
        whose = "a Glow's" if flow_keys else "a module's" if any(k.startswith("flow.") for k in ckpt) else "a"
        return (
            f"{path} holds {whose} plain state_dict ({len(ckpt)} tensors), not a glow fit checkpoint: it has no "
            "hyperparameters to rebuild the model from; load it with flow.load_state_dict(torch.load(path)) into a "
            "Glow built with the same arguments"
        )
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    keys = ", ".join(sorted(map(str, ckpt))[:6]) or "nothing"
    return f"{path} is not a glow fit checkpoint: it lacks {' and '.join(missing)} (it holds {keys})"


def first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's errors span many lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0].split('. ')[0] if text else ''}"


def read_checkpoint(path: str, map_location="cpu", error: type[CheckpointFileError] = CheckpointFileError) -> dict:
    """``torch.load(weights_only=True)`` of a local path or fsspec URL (no code in the file runs), with errors
    that name the file: FileNotFoundError, or ``error`` for a truncated, corrupt, code-carrying or non-dict file."""
    import fsspec

    fs, target = fsspec.core.url_to_fs(str(path))
    if not fs.exists(target):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        with fs.open(target, "rb") as f:
            ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, corrupt pickle, or a pickle that would run code
        raise error(
            f"{path} is not a readable checkpoint (truncated, corrupt, or holding code, which is never run): "
            f"{first_line(err)}"
        ) from err
    if not isinstance(ckpt, dict):
        raise error(f"{path} is not a checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt
