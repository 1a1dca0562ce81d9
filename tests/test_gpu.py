"""CUDA checks of the fast paths: skipped on a machine without a GPU (CI), run by ``benchmarks/gpu.sh``.

What they check on a GPU that the CPU suite cannot: the flow's training step makes no host-device sync
(CUDA's own sync detector, not an op list), the CUDA-graph (``reduce-overhead``) and default compiled
steps give the eager step's loss and gradients, and ``glow fit`` trains in bf16-mixed on the GPU.
"""

from __future__ import annotations

import os

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
