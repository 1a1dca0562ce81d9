"""A training step with no host-device sync (issue 17 item 2), the non-finite guard included.

``glow fit`` with the shipped ``configs/cifar.yaml`` settings (clipping at 50 by norm, the image callbacks, the
guard, the progress bar) on a debug-sized model: every aten call that makes the host wait for the device on CUDA
(a Python number of a tensor, data-dependent shapes) and every Python number turned into a tensor outside data
loading (a blocking host-to-device copy on CUDA) is recorded per training batch under a TorchDispatchMode.
Batches whose metrics are not written to the loggers make none; the first batch (Lightning registers the logged
keys) and the last of each epoch (validation and the end-of-epoch callbacks start there) are left out.
"""

from __future__ import annotations

import traceback
from collections import defaultdict

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glow_lightning.callbacks import GlowProgressBar
from glow_lightning.callbacks.nonfinite import _MaskedUpdate
from glow_lightning.cli import main

from .conftest import config, fit_args
from .test_speed import SYNC_OPS

LOG_EVERY = 3


def host_step_counters(trainer) -> set[int]:
    """The ``step`` counters of non-capturable, non-fused optimizers: torch keeps them on the CPU even for CUDA
    parameters (so that reading them is no sync), but here, on a CPU, they look like any other tensor."""
    return {
        state["step"].data_ptr()
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        if not group.get("capturable") and not group.get("fused")
        for p in group["params"]
        for state in [optimizer.state.get(p, {})]
        if "step" in state
    }


class _Mode(TorchDispatchMode):
    def __init__(self, record, exempt: set[int]):
        super().__init__()
        self.record, self.exempt = record, exempt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS and not (name == "aten._local_scalar_dense" and args[0].data_ptr() in self.exempt):
            self.record(name)
        elif name == "aten.lift_fresh" and not any("torch/utils/data" in f.filename for f in traceback.extract_stack()):
            self.record(name)  # torch.tensor(<Python data>) outside the DataLoader
        return func(*args, **(kwargs or {}))


class SyncRecorder(L.Callback):
    """Record the syncing calls made from one training batch's start to the next one's (or the epoch's end)."""

    def __init__(self):
        self.calls: dict[tuple[int, int], list[str]] = defaultdict(list)
        self.last_batch: dict[int, int] = {}
        self._key, self._mode = None, None

    def _record(self, name: str) -> None:
        self.calls[self._key].append(name)

    def _close(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self._key = (trainer.current_epoch, batch_idx, trainer.global_step)
        self.calls[self._key]  # noqa: B018 - every batch has an entry
        self.last_batch[trainer.current_epoch] = batch_idx
        self._mode = _Mode(self._record, host_step_counters(trainer))
        self._mode.__enter__()

    def on_validation_start(self, trainer, pl_module):
        self._close()

    def on_train_epoch_end(self, trainer, pl_module):
        self._close()

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()


def _fit(cifar_dir, root, *extra):
    args = fit_args(cifar_dir, root, "--trainer.log_every_n_steps", str(LOG_EVERY), "--trainer.max_epochs", "2",
                    "--trainer.enable_progress_bar", "true", "--trainer.callbacks+", f"{__name__}.SyncRecorder",
                    *extra)  # fmt: skip
    cli = main(args)
    return cli, next(c for c in cli.trainer.callbacks if isinstance(c, SyncRecorder))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--config", config("bf16.yaml")], ["--model.optimizer", "adamax"]],
    ids=["fp32-fused-adam", "bf16-fused-adam", "adamax-masked"],
)
def test_a_training_step_makes_no_host_sync(cifar_dir, tmp_path, extra):
    cli, recorder = _fit(cifar_dir, str(tmp_path), *extra)
    trainer = cli.trainer
    assert trainer.global_step == 8 and trainer.gradient_clip_val == 50.0  # the shipped clipping is on
    assert isinstance(trainer.progress_bar_callback, GlowProgressBar)
    fused = bool(trainer.optimizers[0].defaults.get("fused"))
    assert fused == (extra[:1] != ["--model.optimizer"])  # fused Adam also under bf16-mixed
    quiet, logging = {}, {}
    for (epoch, batch_idx, step), calls in recorder.calls.items():
        if step == 0 or batch_idx == recorder.last_batch[epoch]:
            continue
        (logging if (step + 1) % LOG_EVERY == 0 else quiet)[step] = calls
    assert len(quiet) >= 3 and len(logging) >= 1
    assert quiet == {step: [] for step in quiet}
    assert all(calls.count("aten._local_scalar_dense") >= 1 for calls in logging.values())  # the recorder is live
    assert "train/bpd" in trainer.progress_bar_callback.get_metrics(trainer, cli.model)  # still on the bar


def _optimizer_tensors(optimizer):
    return [p.detach().clone() for g in optimizer.param_groups for p in g["params"]] + [
        t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]


@pytest.mark.parametrize("name", ["adam-fused", "adamax"])
def test_a_skipped_update_leaves_parameters_and_optimizer_state_untouched(name):
    """The two on-device skips: fused Adam's found_inf (GradScaler's contract) and the masked update."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    if name == "adamax":
        optimizer = torch.optim.Adamax(params, lr=0.1)
        masked = _MaskedUpdate(optimizer)
    else:
        optimizer = torch.optim.Adam(params, lr=0.1, fused=True)
    for step, skip in enumerate([1, 0, 1, 0]):  # a skip before any state exists, and one after
        for p in params:
            p.grad = torch.randn_like(p)
        if skip:
            params[1].grad[0] = float("nan")
        before = _optimizer_tensors(optimizer)
        flag = torch.tensor(float(skip))
        if name == "adamax":
            masked.arm(optimizer, flag)
        else:
            optimizer.found_inf = flag
        optimizer.step()
        after = _optimizer_tensors(optimizer)
        if skip and step == 0:  # the state the step created is back at its initial value
            assert all(torch.equal(a, b) for a, b in zip(before, after[: len(before)]))
            assert all(torch.count_nonzero(t) == 0 for t in after[len(before) :])
        elif skip:
            assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            assert all(torch.isfinite(t).all() for t in after)
            assert not torch.equal(before[0], after[0])  # a real update
