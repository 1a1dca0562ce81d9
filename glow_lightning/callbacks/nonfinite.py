"""The non-finite guard's helpers: is this update finite, and where did it go wrong?

GlowModule skips an optimizer step whose loss or gradients are not finite (on every rank alike,
as AMP's GradScaler does: one all-reduced flag, one host sync per step) and stops after
``max_consecutive_skips`` skips in a row with :class:`NonFiniteTrainingError`, which names the step
and the first layer whose output became non-finite. The diagnosis (a forward pass with hooks) runs
only then, never on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


def total_grad_norm(parameters: Iterable[nn.Parameter]) -> Tensor | None:
    """The total L2 norm of the gradients, a 0-dim tensor on the device (no host sync); None without any.

    Non-finite exactly when some gradient is: the guard's test and the logged ``train/grad_norm`` in one.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else None


def _tensors(output) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, run, prefix: str = "") -> str | None:
    """The name of the first submodule of ``model`` whose output is non-finite while ``run()`` executes.

    Forward hooks fire as modules finish, so the innermost, earliest layer is found first.
    """
    found: list[str] = []

    def hook(name: str, module: nn.Module):
        def check(_module, _inputs, output) -> None:
            if not found and any(not torch.isfinite(t).all() for t in _tensors(output)):
                found.append(f"{prefix}{name} ({type(module).__name__})")

        return check

    handles = [m.register_forward_hook(hook(n, m)) for n, m in model.named_modules() if n]
    try:
        run()
    except Exception:  # a layer may fail on non-finite input; the hooks have already seen it
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def first_nonfinite_gradient(model: nn.Module, prefix: str = "") -> str | None:
    """The name of the first parameter of ``model`` whose gradient is non-finite."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"{prefix}{name}"
    return None
