"""CUDA checks of the fast paths: skipped on a machine without a GPU (CI), run by ``benchmarks/gpu.sh``.

What they check on a GPU that the CPU suite cannot: the flow's training step, and `glow fit`'s quiet training
batches (guard, clipping, logging and progress bar included), make no host-device sync
(CUDA's own sync detector, not an op list), the CUDA-graph (``reduce-overhead``) and default compiled
steps give the eager step's loss and gradients, and ``glow fit`` trains in bf16-mixed on the GPU.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from glow_lightning.cli import main

from .conftest import fit_args
from .test_speed import assert_same_step, perturbed_flow, twin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_reference():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # exact float32 convolutions: eager and compiled compared to 1e-5
    torch.backends.cuda.matmul.allow_tf32 = False
    yield perturbed_flow("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("options", [{}, dict(memory_saving=True), dict(memory_saving="invert")],
                         ids=["eager", "memory_saving", "invert"])  # fmt: skip
def test_training_step_has_no_host_sync_on_cuda(cuda_reference, options):
    flow, x = cuda_reference
    flow = twin(flow, **options).cuda().train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        flow.bits_per_dim(x).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(RuntimeError):  # the detector is live: an .item() is caught
        torch.cuda.set_sync_debug_mode("error")
        try:
            flow.bits_per_dim(x).mean().item()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_matches_eager_on_cuda(cuda_reference, mode):
    flow, x = cuda_reference
    compiled = twin(flow, compile=mode).cuda()
    for _ in range(3):  # CUDA graphs: warm-up, record, replay
        assert_same_step(flow, compiled, x, atol=1e-5)


def test_glow_fit_bf16_mixed_on_gpu(cifar_dir, tmp_path):
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                        "--trainer.precision", "bf16-mixed", "--model.compile", "true"))  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["val/bpd"])
    assert os.path.exists(os.path.join(str(tmp_path), "checkpoints", "last.ckpt"))


class SyncDebugWindows(L.Callback):
    """CUDA's sync detector set to "error" from the start of each quiet training batch (not the first, not one that
    logs, not the epoch's last) to the next batch's start: the batch, its hooks and the loop between batches."""

    def __init__(self):
        self.checked = 0

    def _off(self):
        torch.cuda.set_sync_debug_mode("default")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._off()
        step = trainer.global_step
        quiet = step > 0 and (step + 1) % trainer.log_every_n_steps and batch_idx < trainer.num_training_batches - 1
        if quiet:
            self.checked += 1
            torch.cuda.set_sync_debug_mode("error")

    def on_validation_start(self, trainer, pl_module):
        self._off()

    def on_train_epoch_end(self, trainer, pl_module):
        self._off()

    def on_exception(self, trainer, pl_module, exception):
        self._off()


@pytest.mark.parametrize("extra", [[], ["--trainer.precision", "bf16-mixed"], ["--model.optimizer", "adamax"]],
                         ids=["fp32", "bf16", "adamax"])  # fmt: skip
def test_glow_fit_training_batches_make_no_sync_on_cuda(cifar_dir, tmp_path, extra):
    """issue 17 item 2 on the GPU: cifar.yaml's settings (clipping, guard, callbacks, progress bar), debug model."""
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                        "--trainer.log_every_n_steps", "3", "--trainer.enable_progress_bar", "true",
                        "--trainer.callbacks+", "tests.test_gpu.SyncDebugWindows", *extra))  # fmt: skip
    windows = next(c for c in cli.trainer.callbacks if isinstance(c, SyncDebugWindows))
    assert windows.checked >= 3 and cli.trainer.global_step == 8
