"""NonFiniteGuard: skip an optimizer step whose loss or gradients are not finite; stop after too many.

DESIGN.md rule 5: non-finite losses are detected, never silently averaged away. The guard skips such
an update on every rank alike, as AMP's GradScaler does, and decides it on the device, so a training step
makes no host-device sync (issue 17 item 2):

- The flag (loss or total gradient norm not finite) is a 0-dim tensor, all-reduced (max) as a tensor under DDP.
- Fused Adam (GlowModule's default on CPU and CUDA) gets it as ``optimizer.found_inf``, the contract torch's
  GradScaler uses: with it set, the fused kernel leaves parameters and moments unchanged and rolls ``step`` back.
  Other optimizers (Adamax, Adam where no fused kernel exists) get a masked update: parameters and optimizer
  state are copied before the step and put back with ``torch.where`` after it. Under a GradScaler (16-mixed)
  the scaler skips by itself.
- The host learns the flag one step late (:class:`_HostFlag`): the counts (``train/skipped_steps``, logged
  from a device counter) and the stop rule are settled at the next optimizer step, at validation start, at the
  end of the epoch and when a checkpoint is written. After ``max_consecutive_skips`` skips in a row (a
  GlowModule hyperparameter) training stops within one step, with :class:`NonFiniteTrainingError` naming the
  step and the first layer whose output became non-finite. The diagnosis (a forward pass with hooks on the
  batch of that step) runs only then, never on the hot path. It also logs ``train/grad_norm``, the total
  gradient norm it computes for the test anyway (non-finite on a skipped step), on the steps that log
  (:func:`~glow_lightning.metrics.logs_at`), and clips with that norm (:meth:`NonFiniteGuard.clip`, which
  ``GlowModule.configure_gradient_clipping`` calls; for fused Adam the scaling happens in the optimizer's kernel).

``GlowModule.configure_callbacks`` adds it, so a plain ``Trainer`` has it too. Both counters are
callback state, saved in checkpoints; checkpoints written before the guard was a callback hold the
total count as ``checkpoint["skipped_steps"]``, which is read on resume.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from ..metrics import logs_at


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter of the optimizer's groups, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def has_grad_scaler(trainer) -> bool:
    """Whether the trainer's precision plugin has a GradScaler (16-mixed), which scales, unscales and skips itself."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


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


class _HostFlag:
    """A step's skip flag, copied to host memory without a host-device sync, read one step later.

    On CUDA the copy goes to pinned memory with ``non_blocking=True`` and an event marks it; the read waits on
    that event only (the device has usually passed it, and the next step's work stays queued), never on the
    whole stream. The value is read through a NumPy view of the host buffer: host memory, no tensor op.
    """

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.buffer = torch.zeros(1, pin_memory=cuda)
        self.view = self.buffer.numpy()
        self.event = torch.cuda.Event() if cuda else None

    def put(self, flag: Tensor) -> None:
        self.buffer.copy_(flag.detach().reshape(1), non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()

    def get(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.view[0])


class _MaskedUpdate:
    """Undo an optimizer step on the device when ``skip`` is set: for optimizers without ``found_inf`` support.

    Before the step every parameter and optimizer-state tensor is copied; after it (an optimizer step post hook)
    each is set to ``torch.where(skip, copy, new)``. State that the step created (the first step) goes back to
    zeros, its initial value in Adam and Adamax. Tensors held on another device than the flag (the ``step``
    counters that torch keeps on the CPU for non-capturable optimizers of CUDA parameters, so that reading them
    is no sync) are put back on the host when the guard reads the flag, one step late but before the next step
    reads them (:meth:`settle`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.saved: list[tuple[Tensor, Tensor]] | None = None
        self.skip: Tensor | None = None
        self.host: list[tuple[Tensor, Tensor]] = []  # (tensor, value to put back if the step was skipped)
        self.handle = optimizer.register_step_post_hook(self.restore)

    @torch.no_grad()
    def arm(self, optimizer, skip: Tensor) -> None:
        self.skip = skip.bool()
        saved = []
        for p in optimizer_params(optimizer):
            saved.append((p, p.detach().clone()))
            saved += [(t, t.clone()) for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
        self.saved = saved

    @torch.no_grad()
    def restore(self, optimizer, args, kwargs) -> None:
        if self.saved is None:
            return
        kept = {id(t) for t, _ in self.saved}
        created = [
            (t, torch.zeros_like(t))
            for p in optimizer_params(optimizer)
            for t in optimizer.state.get(p, {}).values()
            if isinstance(t, Tensor) and id(t) not in kept
        ]
        self.host = []
        for t, old in self.saved + created:
            if t.device == self.skip.device:
                t.copy_(torch.where(self.skip, old, t))
            else:
                self.host.append((t, old))
        self.saved = self.skip = None

    @torch.no_grad()
    def settle(self, skipped: bool) -> None:
        """The host has read the flag of the last step: put its host-side tensors back if it was skipped."""
        if skipped:
            for t, old in self.host:
                t.copy_(old)
        self.host = []


def _all_ranks_max(flag: Tensor) -> Tensor:
    """``flag`` max-reduced over DDP ranks, as a tensor (``Strategy.reduce`` adds a barrier: a host sync)."""
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


class NonFiniteGuard(L.Callback):
    """Skip optimizer steps with a non-finite loss or gradient; stop after ``max_consecutive_skips`` in a row.

    The limit is read from ``pl_module.hparams.max_consecutive_skips`` (``--model.max_consecutive_skips``).
    The skip is decided on the device; the counts and the stop rule are read one step late (see the module doc).
    """

    def __init__(self):
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._loss_finite: Tensor | None = None  # on the device: no host sync before the optimizer step
        self._batch: dict | None = None
        self._skipped_on_device: Tensor | None = None  # the total, logged as train/skipped_steps
        self._host: _HostFlag | None = None
        self._pending: tuple[int, dict | None] | None = None  # (global step, batch) whose flag the host has not read
        self._stop: tuple[int, dict | None] | None = None  # the step that reached the limit, the batch it trained on
        self._limit: int | None = None  # max_consecutive_skips of the module being trained
        self._masked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _MaskedUpdate
        self._hooked: weakref.WeakSet = weakref.WeakSet()  # optimizers that drop found_inf, grad_scale after a step
        # (global step, total gradient norm before clipping) of the step being taken: GlowModule's clipping reuses it
        self.grad_norm: tuple[int, Tensor] | None = None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.skipped_steps = self.skipped_steps
        self._limit = pl_module.hparams.max_consecutive_skips
        self._skipped_on_device = torch.tensor(float(self.skipped_steps), device=pl_module.device)
        self._host = _HostFlag(pl_module.device)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._batch = batch  # kept for the diagnosis only

    @override
    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach())  # accumulated over accumulate_grad_batches
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Settle the previous step (counts, stop rule); decide this one's skip on the device (one flag for all
        ranks); log the total L2 norm of the gradients (unscaled, averaged over DDP ranks, before clipping)."""
        self._settle(trainer, pl_module)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        norm = total_grad_norm(optimizer_params(optimizer))  # on the device
        self.grad_norm = (trainer.global_step, norm) if norm is not None else None
        finite = torch.isfinite(norm) if norm is not None else None
        if self._loss_finite is not None:
            finite = self._loss_finite if finite is None else finite & self._loss_finite
        self._loss_finite = None
        bad = ~finite if finite is not None else torch.zeros((), dtype=torch.bool, device=pl_module.device)
        skip = _all_ranks_max(bad.float())  # 1.0: skip this update (on every rank alike)
        if not has_grad_scaler(trainer):  # a GradScaler skips by itself
            self._apply(optimizer, skip)
        if self._skipped_on_device is None:  # a fit without on_train_start (called by hand)
            self.on_train_start(trainer, pl_module)
        self._skipped_on_device += skip
        self._host.put(skip)
        self._pending = (trainer.global_step, self._batch)
        if logs_at(trainer, trainer.global_step):  # the steps whose metrics Lightning writes (~1 ms per log call)
            if norm is not None:
                pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            pl_module.log("train/skipped_steps", self._skipped_on_device, on_step=True, on_epoch=False)

    def clip(self, trainer, optimizer, max_norm: float) -> bool:
        """Clip this step's gradients to total L2 norm ``max_norm`` with the norm computed for the skip test; False
        (nothing done) when there is none for this step.

        For fused Adam without a GradScaler the scaling goes into the step itself: ``optimizer.grad_scale`` =
        max(1, norm / max_norm), GradScaler's contract (the fused kernel divides each gradient by it and stores the
        result), which saves a pass over every gradient; otherwise one foreach pass (``clip_grads_with_norm_``).
        """
        if self.grad_norm is None or self.grad_norm[0] != trainer.global_step:
            return False
        norm = self.grad_norm[1]
        self.grad_norm = None  # used once: the clipped gradients have another norm
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if (
            optimizer in self._hooked  # fused, given found_inf this fit; the post hook drops grad_scale too
            and not has_grad_scaler(trainer)
            and getattr(optimizer, "grad_scale", None) is None
        ):
            optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # as clip_grads_with_norm_'s
        else:
            params = [p for p in optimizer_params(optimizer) if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return True

    def _apply(self, optimizer, skip: Tensor) -> None:
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused Adam: GradScaler's contract
            optimizer.found_inf = skip
            if optimizer not in self._hooked:
                optimizer.register_step_post_hook(_forget_found_inf)
                self._hooked.add(optimizer)
        else:
            masked = self._masked.get(optimizer)
            if masked is None:
                masked = self._masked[optimizer] = _MaskedUpdate(optimizer)
            masked.arm(optimizer, skip)

    def _count(self) -> None:
        """Read the pending step's flag (one step late) into the counters."""
        if self._pending is None or self._host is None:
            return
        step, batch = self._pending
        self._pending = None
        skipped = self._host.get()
        for masked in self._masked.values():
            masked.settle(skipped)
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self._stop is None and self._limit is not None and self.consecutive_skips >= self._limit:
                self._stop = (step, batch)
        else:
            self.consecutive_skips = 0

    def _settle(self, trainer, pl_module) -> None:
        """Count the pending step; raise if it reached the limit (within one step of it)."""
        self._limit = pl_module.hparams.max_consecutive_skips
        self._count()
        pl_module.skipped_steps = self.skipped_steps
        if self._stop is not None:
            step, batch = self._stop
            self._stop = None
            raise NonFiniteTrainingError(self.diagnose(trainer, pl_module, step, batch))

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._settle(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._settle(trainer, pl_module)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._settle(trainer, pl_module)

    def diagnose(self, trainer, pl_module, step: int | None = None, batch: dict | None = None) -> str:
        """The error message: the step, and where the values became non-finite (on that step's batch)."""
        step = trainer.global_step if step is None else step
        batch, flow = self._batch if batch is None else batch, pl_module.flow
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
            f"training stopped at global step {step}: {self.consecutive_skips} optimizer steps in a "
            f"row had a non-finite loss or gradient (max_consecutive_skips={limit}); "
            f"{where}. Checkpoints saved before this step are intact: lower the learning rate or raise "
            "warmup_steps, and resume from one of them."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        self._count()  # a checkpoint holds exact counts (the stop, if due, is raised at the next hook)
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


def _forget_found_inf(optimizer, args, kwargs) -> None:
    """After the step: drop the flag and the clipping's scale, as GradScaler does, so a later step by hand is
    neither skipped nor scaled."""
    optimizer.__dict__.pop("found_inf", None)
    optimizer.__dict__.pop("grad_scale", None)
