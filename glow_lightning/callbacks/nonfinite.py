"""NonFiniteGuard: skip an optimizer step whose loss or gradients are not finite; stop after too many.

DESIGN.md rule 5: non-finite losses are detected, never silently averaged away. The guard skips such
an update on every rank alike, as AMP's GradScaler does (one all-reduced flag, one host sync per
step), counts it (``train/skipped_steps``) and stops after ``max_consecutive_skips`` skips in a row
(a GlowModule hyperparameter) with :class:`NonFiniteTrainingError`, which names the step and the
first layer whose output became non-finite. The diagnosis (a forward pass with hooks) runs only
then, never on the hot path. It also logs ``train/grad_norm``, the total gradient norm it computes
for the test anyway.

``GlowModule.configure_callbacks`` adds it, so a plain ``Trainer`` has it too. Both counters are
callback state, saved in checkpoints; checkpoints written before the guard was a callback hold the
total count as ``checkpoint["skipped_steps"]``, which is read on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override


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


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after ``max_consecutive_skips`` in a row.

    The limit is read from ``pl_module.hparams.max_consecutive_skips`` (``--model.max_consecutive_skips``).
    """

    def __init__(self):
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._loss_finite: Tensor | None = None  # on the device: no host sync before the optimizer step
        self._batch: dict | None = None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._batch = batch  # kept for the diagnosis only

    @override
    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())  # accumulated over accumulate_grad_batches
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Skip this update on every rank if its loss or any gradient is non-finite (one flag, one sync);
        log the total L2 norm of the gradients (unscaled, averaged over DDP ranks, before clipping)."""
        loss_finite = self._loss_finite if self._loss_finite is not None else torch.ones((), device=pl_module.device)
        self._loss_finite = None
        norm = total_grad_norm(pl_module.parameters())  # on the device
        flag = loss_finite.bool() if norm is None else loss_finite.bool() & torch.isfinite(norm)
        finite = bool(trainer.strategy.reduce(flag.float(), reduce_op="min"))  # the one host sync per step
        if finite:
            self.consecutive_skips = 0
            if norm is not None:
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            pl_module.skipped_steps = self.skipped_steps
            if self.consecutive_skips >= pl_module.hparams.max_consecutive_skips:
                raise NonFiniteTrainingError(self.diagnose(trainer, pl_module))
            if getattr(trainer.precision_plugin, "scaler", None) is None:  # a GradScaler skips by itself
                optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without grads alone
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def diagnose(self, trainer, pl_module) -> str:
        """The error message: the step, and where the values became non-finite."""
        batch, flow = self._batch, pl_module.flow
        if batch is not None and not torch.isfinite(batch["x"]).all():
            where = "the input batch (batch['x']) holds non-finite values"
        else:
            labels = batch["label"] if batch is not None and flow.num_classes else None
            layer = batch is not None and first_nonfinite_layer(
                flow, lambda: flow.log_prob(batch["x"], labels), prefix="flow."
            )
            grad = first_nonfinite_gradient(pl_module, prefix="")
            if layer:
                where = f"the first layer whose output became non-finite is {layer}"
            elif grad:
                where = f"the forward pass is finite; the first non-finite gradient is that of {grad}"
            else:
                where = "the forward pass of the last batch is finite again (the loss was not)"
        limit = pl_module.hparams.max_consecutive_skips
        return (
            f"training stopped at global step {trainer.global_step}: {self.consecutive_skips} optimizer steps in a "
            f"row had a non-finite loss or gradient (max_consecutive_skips={limit}); "
            f"{where}. Checkpoints saved before this step are intact: lower the learning rate or raise "
            "warmup_steps, and resume from one of them."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))

    @override
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # runs before load_state_dict; a checkpoint from before the guard was a callback has only the total
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.consecutive_skips = 0

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.skipped_steps = self.skipped_steps
