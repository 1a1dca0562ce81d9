"""Reversible backprop (``memory_saving="invert"``): the plain backward's loss and gradients, with only each
level's output kept for backward (O(1) in depth), under bf16 autocast, DDP, compile and the non-finite guard."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.flow import glow as glow_module
from glow_lightning.flow.layers import squeeze
from glow_lightning.flow.reversible import ReversibleSteps, step_backward

from .conftest import fit_args
from .reliability_helpers import NanInput
from .test_speed import SYNC_OPS, TINY, loss_and_grads, perturbed_flow, twin

# float32 tolerance of the gradients: the rebuilt step inputs differ from the stored ones by float32 rounding
# (~1e-6 relative through K=32 steps, BENCHMARKS.md), which moves each gradient by about as much
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
# under bf16 autocast, against the plain bf16 backward (measured ~4e-7 apart here); the tolerance leaves room for a
# bf16 rounding that a 1e-7 rebuild error flips on another CPU (bf16's own 1-ulp conditioning: ~1e-3, BENCHMARKS.md)
BF16_RTOL, BF16_ATOL = 1e-3, 1e-5


def loss_grads_and_input_grad(flow: Glow, x: Tensor, autocast: bool = False):
    x = x.clone().requires_grad_()
    flow.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = flow.bits_per_dim(x).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in flow.named_parameters()}, x.grad


ARCHS = pytest.mark.parametrize(
    "arch", [{}, dict(coupling="additive", permutation="reverse"), dict(permutation="invconv")],
    ids=["affine-lu", "additive-reverse", "affine-plain-invconv"],
)  # fmt: skip
NORMS = pytest.mark.parametrize("coupling_norm", ["actnorm", "none"])


def trained_flow(coupling_norm: str, arch: dict, steps: int = 20) -> tuple[Glow, Tensor]:
    """A tiny K=4 Glow moved off its initialisation by a few Adam steps, as a run's weights are, and a batch."""
    torch.manual_seed(0)
    flow = Glow(**{**TINY, "steps_per_level": 4, "coupling_norm": coupling_norm}, **arch)
    x = torch.rand(4, 3, 8, 8)
    flow.initialize(x)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = flow.bits_per_dim(torch.rand(4, 3, 8, 8)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return flow, x


def assert_same_loss_and_gradients(flow: Glow, invert: Glow, x: Tensor, rtol: float, atol: float) -> None:
    loss, grads, x_grad = loss_grads_and_input_grad(flow, x)
    inv_loss, inv_grads, inv_x_grad = loss_grads_and_input_grad(invert, x)
    assert torch.equal(inv_loss, loss)  # the same forward, logdets added in the same order
    assert inv_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(inv_grads[name], grad, rtol=rtol, atol=atol, msg=name)
    assert x_grad.abs().sum() > 0
    torch.testing.assert_close(inv_x_grad, x_grad, rtol=rtol, atol=atol)


@ARCHS
@NORMS
def test_invert_gives_the_plain_loss_and_gradients(arch, coupling_norm):
    flow, x = trained_flow(coupling_norm, arch)
    assert_same_loss_and_gradients(flow, twin(flow, memory_saving="invert"), x, GRAD_RTOL, GRAD_ATOL)


@ARCHS
@NORMS
def test_invert_is_exact_in_float64(arch, coupling_norm):
    """In float64 the rebuilt inputs are exact to ~1e-12, so invert's gradients are the plain ones to that: what
    float32 shows is rounding amplified by the flow's conditioning, not a wrong backward. Weights perturbed at
    random (nothing at its zero init) give an ill-conditioned flow (coupling scales down to ~0.004 with actnorm
    nets), where float32 gradients differ by percents (measured) and float64 ones still agree."""
    torch.manual_seed(0)
    flow = Glow(**{**TINY, "steps_per_level": 4, "coupling_norm": coupling_norm}, **arch).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    flow.initialize(x)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    invert = Glow(**{**flow.config, "memory_saving": "invert"}).double()
    invert.load_state_dict(flow.state_dict())
    # float64 rounding: |difference| up to ~1.4e-11 on gradients of size ~4 (torch 2.6; ~8e-12 on 2.14)
    assert_same_loss_and_gradients(flow, invert, x, rtol=1e-9, atol=1e-10)


def saved_bytes(flow: Glow, x: Tensor) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes autograd saves for backward (parameters and shared storages counted once), and the saved shapes."""
    storages, shapes = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow.bits_per_dim(x).mean()
    params = {p.untyped_storage().data_ptr() for p in flow.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params), shapes


def test_invert_keeps_only_level_outputs_so_memory_does_not_grow_with_depth():
    x = torch.rand(2, 3, 8, 8)
    saved = {}
    for k in (2, 6):
        for mode in (False, "recompute", "invert"):
            torch.manual_seed(0)
            flow = Glow(**{**TINY, "steps_per_level": k}, memory_saving=mode)
            flow.initialize(x)
            saved[k, mode] = saved_bytes(flow, x)
    assert saved[2, "invert"][0] == saved[6, "invert"][0]  # O(1) in K
    assert saved[6, False][0] > saved[2, False][0] and saved[6, "recompute"][0] > saved[2, "recompute"][0]
    assert saved[6, "invert"][0] < saved[6, "recompute"][0] / 3
    # what the count sees: each level's output (12 channels at 4x4, then 24 at 2x2) is among the saved tensors
    assert {(2, 12, 4, 4), (2, 24, 2, 2)} <= set(saved[6, "invert"][1])


def test_the_reversible_function_keeps_no_tensor_outside_save_for_backward(reference):
    flow, x = reference
    flow = twin(flow, memory_saving="invert")
    _, logdet, _ = flow._encode(x)
    nodes, seen, stack = [], set(), [logdet.grad_fn]
    while stack:  # every ReversibleSteps node of the graph
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node) if type(node).__name__ == "ReversibleStepsBackward" else None
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert len(nodes) == TINY["levels"]

    def tensors_in(value) -> bool:
        if isinstance(value, Tensor):
            return True
        if isinstance(value, (tuple, list)):
            return any(tensors_in(v) for v in value)
        return False

    for node in nodes:
        assert not [k for k, v in vars(node).items() if tensors_in(v)]  # ctx attributes: modules and flags only
        assert len(node.saved_tensors) == 1  # the level's output


@pytest.fixture
def reference() -> tuple[Glow, Tensor]:
    return perturbed_flow()


def rebuilt_level_inputs_error(flow: Glow, x: Tensor) -> float:
    """Largest |rebuilt - true| over the levels' inputs, rebuilt by the backward's own code (step_backward)."""
    worst = 0.0
    with torch.no_grad():
        h = x - 0.5
        for level, steps in enumerate(flow.steps):
            h = squeeze(h)
            level_input = h
            for step in steps:
                h, _ = step(h)
            y = h
            with torch.enable_grad():
                for step in reversed(steps):
                    y, _, _ = step_backward(step, y, torch.zeros_like(y), y.new_zeros(y.shape[0]))
            worst = max(worst, (y - level_input).abs().max().item())
            if level < flow.levels - 1:
                h = h[:, : flow.kept_channels[level]]
    return worst


def test_under_bf16_autocast_the_inverse_still_reconstructs(reference):
    """DESIGN.md rule 3: the backward re-enters the forward's autocast, so the bf16 NN it evaluates is the
    forward's, and the rebuilt inputs are the forward's to float32 rounding (a float32 NN would rebuild other inputs)."""
    flow, x = reference
    flow.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        error = rebuilt_level_inputs_error(flow, x)
    assert error < 1e-4, error
    invert = twin(flow, memory_saving="invert")
    loss, grads, x_grad = loss_grads_and_input_grad(flow, x, autocast=True)
    inv_loss, inv_grads, inv_x_grad = loss_grads_and_input_grad(invert, x, autocast=True)
    assert torch.equal(inv_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(inv_grads[name], grad, rtol=BF16_RTOL, atol=BF16_ATOL, msg=name)
    torch.testing.assert_close(inv_x_grad, x_grad, rtol=BF16_RTOL, atol=BF16_ATOL)


def test_the_backward_without_its_autocast_would_not_reconstruct(reference, monkeypatch):
    """The bf16 test can fail: a backward that ran the NN in float32 rebuilds other inputs, and its gradients
    miss the bf16 test's tolerance."""
    flow, x = reference
    flow = twin(flow, memory_saving="invert").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = flow.bits_per_dim(x).mean()
    forward = ReversibleSteps.forward

    def forward_forgetting_autocast(ctx, *args):
        out = forward(ctx, *args)
        ctx.autocast = ("cpu", False, torch.bfloat16)
        return out

    _, grads, _ = loss_grads_and_input_grad(twin(flow), x, autocast=True)
    monkeypatch.setattr(ReversibleSteps, "forward", staticmethod(forward_forgetting_autocast))
    flow.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow.bits_per_dim(x).mean()
    loss.backward()  # outside autocast, as training does: the backward's autocast comes only from the forward's
    assert torch.isfinite(bf16)
    with pytest.raises(AssertionError):
        for name, p in flow.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=BF16_RTOL, atol=BF16_ATOL, msg=name)


class BitsPerDim(torch.nn.Module):
    def __init__(self, flow: Glow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.bits_per_dim(x)


def test_invert_under_ddp_reduces_gradients_as_usual(reference):
    """One-process gloo DDP with ddp.yaml's settings (gradient_as_bucket_view, every parameter used): the
    Function's parameter gradients reach DDP's reducer like autograd's own (it would raise on the second
    iteration if one had not), and equal the plain backward's."""
    flow, x = reference
    plain = loss_and_grads(flow, x)[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(
            BitsPerDim(twin(flow, memory_saving="invert")), find_unused_parameters=False, gradient_as_bucket_view=True
        )
        for _ in range(2):
            ddp.zero_grad(set_to_none=False)
            ddp(x).mean().backward()
        grads = {n: p.grad for n, p in ddp.module.flow.named_parameters()}
    finally:
        dist.destroy_process_group()
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_invert_composes_with_compile(reference, monkeypatch):
    """compile=True: the reversible forward runs each step through the compiled step (dynamo-traced, without
    autograd); the backward runs eager (it calls torch.autograd.grad, which dynamo does not trace). Dynamo's
    "eager" backend keeps the test fast; inductor's numerics are those of tests/test_speed.py's compiled steps."""
    flow, x = reference
    loss, grads = loss_and_grads(flow, x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setitem(glow_module._compiled_steps, "default",
                        torch.compile(glow_module._run_step, backend=backend, dynamic=False))  # fmt: skip
    inv_loss, inv_grads = loss_and_grads(twin(flow, memory_saving="invert", compile=True), x)
    # dynamo really ran the steps: one graph per level shape, plus one for the first step of each later level
    # (its input, a slice of the split, has other strides)
    assert len(graphs) == 2 * TINY["levels"] - 1
    assert torch.equal(inv_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(inv_grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


@pytest.mark.slow
def test_a_nan_batch_is_still_skipped_with_invert(cifar_dir, tmp_path):
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.num_sanity_val_steps", "0", "--model.memory_saving",
                        "invert", "--trainer.callbacks+", "tests.reliability_helpers.NanInput"))  # fmt: skip
    assert cli.model.flow.memory_saving == "invert"
    nan = next(c for c in cli.trainer.callbacks if isinstance(c, NanInput))
    assert cli.trainer.global_step == 8 and cli.trainer.lightning_module.skipped_steps == 1
    assert torch.equal(nan.before[5], nan.before[6])  # step 5 (NaN input) left the weights alone
    assert not torch.equal(nan.before[4], nan.before[5]) and not torch.equal(nan.before[6], nan.before[7])


def test_the_invert_training_step_has_no_host_sync(reference):
    """Forward and the reversible backward (every step's inverse included) make no host-device sync; the
    matrix inverse's error check (aten._linalg_check_errors) would be one per step on CUDA."""
    flow, x = reference
    flow = twin(flow, memory_saving="invert").train()
    with RecordSyncs() as recorder:
        flow.bits_per_dim(x).mean().backward()
    assert recorder.syncs == []
    with RecordSyncs() as recorder:
        torch.linalg.inv(torch.eye(3))
    assert recorder.syncs  # the recorder sees the error check


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in (*SYNC_OPS, "aten._linalg_check_errors"):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_memory_saving_true_still_means_recompute_and_bad_values_are_named():
    assert Glow(**TINY, memory_saving=True).memory_saving == "recompute"
    assert Glow(**TINY, memory_saving="invert").memory_saving == "invert"
    with pytest.raises(ValueError, match="'reverse'"):
        Glow(**TINY, memory_saving="reverse")
