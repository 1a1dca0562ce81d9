"""Callbacks and datamodules for the reliability tests, importable by class path from ``glow`` configs."""

from __future__ import annotations

import errno
import os
import signal
import time

import lightning as L
import torch
from torch.utils.data import TensorDataset

from glow_lightning.data import GlowDataModule


class LrRecorder(L.Callback):
    """Record (global_step, learning rate) before every optimizer step, and the step a fit starts at."""

    def __init__(self):
        self.lrs: list[tuple[int, float]] = []
        self.start_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


class StopAfterEpoch(L.Callback):
    """Stop a fit at the end of epoch ``epoch`` (as if it were interrupted there), keeping its config."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class StopAtStep(L.Callback):
    """Ask the trainer to stop after optimizer step ``step``, as Lightning's Timer and EarlyStopping do
    (so a validation runs at the stop, mid-epoch)."""

    def __init__(self, step: int = 6):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class InterruptAtStep(L.Callback):
    """Ctrl-C (a real SIGINT) at optimizer step ``step``, in the middle of an epoch: the fit stops after that step and
    writes last.ckpt on the exception it raises. Keeps the trainer for the test to read."""

    last_trainer = None

    def __init__(self, step: int = 6):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        InterruptAtStep.last_trainer = trainer
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


class NanInput(L.Callback):
    """Put a NaN into the batch of optimizer step ``step``; remember the parameters around it."""

    def __init__(self, step: int = 5):
        self.step = step
        self.before: dict[int, torch.Tensor] = {}

    def _params(self, pl_module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._params(pl_module)
        if trainer.global_step == self.step:
            batch["x"][0, 0, 0, 0] = float("nan")


class NanLayer(L.Callback):
    """From epoch ``epoch`` on, the coupling of the first step of level 1 outputs NaN on every batch."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            pl_module.flow.steps[1][0].coupling.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), out[1]))


class WrongSizeData(GlowDataModule):
    """Declares 3x32x32 images but holds 1x28x28 ones (like a mis-configured dataset)."""

    def load_split(self, train: bool) -> TensorDataset:
        n = 16 if train else 4
        return TensorDataset(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))


class IndexRecorder(L.Callback):
    """Record the image indices of every training batch."""

    def __init__(self):
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].tolist())


class BatchRecorder(L.Callback):
    """Record (epoch, batch index) of every training batch, and (description, count, total) of the progress bar."""

    def __init__(self):
        self.batches: list[tuple[int, int]] = []
        self.bar: list[tuple[str, int, int | None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx))
        bar = getattr(trainer.progress_bar_callback, "train_progress_bar", None)
        if bar is not None:
            self.bar.append((bar.desc, bar.n, bar.total))


class MarkerThenWait(L.Callback):
    """Fault injection for the signal tests: after optimizer step ``step``, print a marker and wait for a signal."""

    MARKER = "GLOW-TEST-READY-FOR-SIGNAL"

    def __init__(self, step: int = 3, timeout: float = 120.0):
        self.step = step
        self.timeout = timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        print(self.MARKER, flush=True)
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class FailingWrites(L.Callback):
    """From optimizer step ``step`` on, every checkpoint write fails as on a full disk (ENOSPC)."""

    def __init__(self, step: int = 6):
        self.step = step
        self._original = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self._original is None:
            import glow_lightning.io as gio

            def full(f, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            self._original, gio._write_chunks = gio._write_chunks, full

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown hooks after an exception

    def teardown(self, trainer, pl_module, stage):
        if self._original is not None:
            import glow_lightning.io as gio

            gio._write_chunks, self._original = self._original, None


class LastCkptProbe(L.Callback):
    """Record (global_step, the global step last.ckpt holds, or None) at every training batch start."""

    def __init__(self):
        self.seen: list[tuple[int, int | None]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = trainer.checkpoint_callback.last_path
        step = None
        if path and os.path.exists(path):
            step = int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        self.seen.append((trainer.global_step, step))
