"""The fast paths change nothing but speed and memory: compiled and memory-saving steps match eager."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.flow import glow as glow_module

from .conftest import fit_args

TINY = dict(in_channels=3, image_size=8, levels=2, steps_per_level=2, hidden_channels=16)


def loss_and_grads(flow: Glow, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    flow.zero_grad(set_to_none=True)
    loss = flow.bits_per_dim(x).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in flow.named_parameters()}


def twin(reference: Glow, **options) -> Glow:
    """The same weights (ActNorm initialised from data and perturbed, so nothing is at its zero init)."""
    flow = Glow(**{**reference.config, **options})
    flow.load_state_dict(reference.state_dict())
    return flow


def perturbed_flow(device: str = "cpu") -> tuple[Glow, torch.Tensor]:
    """A tiny Glow initialised from a batch, its weights perturbed (nothing at its zero init), and the batch."""
    torch.manual_seed(0)
    flow = Glow(**TINY).to(device)
    x = torch.rand(4, 3, 8, 8, device=device)
    flow.initialize(x)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow, x


@pytest.fixture
def reference() -> tuple[Glow, torch.Tensor]:
    return perturbed_flow()


def assert_same_step(reference: Glow, fast: Glow, x: torch.Tensor, atol: float) -> None:
    loss, grads = loss_and_grads(reference, x)
    fast_loss, fast_grads = loss_and_grads(fast, x)
    assert loss.item() > 0  # a real loss (bits/dim), not a degenerate one
    assert torch.allclose(fast_loss, loss, atol=atol, rtol=0), (fast_loss, loss)
    assert fast_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name  # every parameter gets a real gradient
        assert torch.allclose(fast_grads[name], grad, atol=atol, rtol=1e-4), name


def test_memory_saving_step_matches_eager(reference):
    flow, x = reference
    saving = twin(flow, memory_saving=True)
    assert_same_step(flow, saving, x, atol=1e-6)


def test_memory_saving_stores_less_for_backward(reference):
    flow, x = reference
    saving = twin(flow, memory_saving=True)

    def saved_numel(model: Glow) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model.bits_per_dim(x).mean()
        return sum(sizes)

    assert saved_numel(saving) < saved_numel(flow) / 2


def test_eval_mode_ignores_the_fast_paths(reference):
    flow, x = reference
    saving = twin(flow, memory_saving=True, compile=True).eval()
    with torch.no_grad():
        assert torch.allclose(saving.log_prob(x), flow.eval().log_prob(x), atol=1e-5)


@pytest.mark.slow
def test_compiled_step_matches_eager_without_graph_breaks(reference):
    flow, x = reference
    explanation = torch._dynamo.explain(glow_module._run_step)(flow.steps[0][0], torch.randn(4, 12, 4, 4))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    compiled = twin(flow, compile=True)
    assert_same_step(flow, compiled, x, atol=1e-5)
    assert_same_step(flow, twin(flow, compile=True, memory_saving=True), x, atol=1e-5)


@pytest.mark.slow
def test_compiled_graphs_do_not_grow_with_steps_per_level():
    """Regional compilation: one graph per level shape (plus the very first step, whose input needs no
    gradient), the same number for K=2 and K=4."""
    counts = {}
    for k in (2, 4):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        flow = Glow(**{**TINY, "steps_per_level": k}, compile=True)
        x = torch.rand(2, 3, 8, 8)
        flow.initialize(x)
        flow.bits_per_dim(x)  # dynamo compiles (and counts) the graphs in the forward
        counts[k] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert counts[2] == counts[4] == TINY["levels"] + 1, counts


def test_compile_raises_dynamo_recompile_limit_for_deep_flows():
    """L+1 graphs per batch size: a deep flow would pass dynamo's default limit of 8 and run eager."""
    from glow_lightning.flow.glow import dynamo_limit_name

    name = dynamo_limit_name()  # recompile_limit; cache_size_limit before torch 2.7
    before = getattr(torch._dynamo.config, name)
    try:
        Glow(in_channels=3, image_size=64, levels=5, steps_per_level=1, hidden_channels=4, compile=True)
        assert getattr(torch._dynamo.config, name) >= 4 * 6
    finally:
        setattr(torch._dynamo.config, name, before)


# aten ops that make the host wait for the device on CUDA (a Python bool/float of a tensor, data-dependent shapes)
SYNC_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
            "aten.unique", "aten._unique2", "aten.repeat_interleave")  # fmt: skip


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{}, dict(memory_saving=True)], ids=["eager", "memory_saving"])
def test_training_step_of_the_flow_has_no_host_sync(reference, options):
    """Forward to bits/dim and backward run without a single host-device sync (CUDA-graph friendly); the
    recorder does see one when there is one."""
    flow, x = reference
    flow = twin(flow, **options).train()
    with RecordSyncs() as recorder:
        flow.bits_per_dim(x).mean().backward()
    assert recorder.syncs == []
    with RecordSyncs() as recorder:
        assert flow.is_initialized  # bool() of the ActNorm buffers: a sync, kept out of the step
    assert recorder.syncs


@pytest.mark.parametrize("bad", [dict(compile="fast"), dict(memory_saving="yes")])
def test_bad_speed_option_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        Glow(**TINY, **bad)


def test_cli_flags_reach_the_flow(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path), "--model.compile", "reduce-overhead",
                      "--model.memory_saving", "true", "--print_config"))  # fmt: skip
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "compile: reduce-overhead" in out and "memory_saving: true" in out
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path), "--model.compile", "fastest"))
    assert exc.value.code == 2


def test_fused_adam_is_used_on_cpu_and_updates_like_default_adam(reference):
    """GlowModule's optimizer is torch's fused Adam where supported (CPU here); one step equals the default
    (foreach) Adam's to float tolerance, and Adamax is left alone."""
    from glow_lightning.module import make_optimizer

    flow, x = reference
    fused_flow, plain_flow = twin(flow), twin(flow)
    fused = make_optimizer("adam", fused_flow.parameters(), lr=1e-2, weight_decay=1e-4)
    plain = torch.optim.Adam(plain_flow.parameters(), lr=1e-2, weight_decay=1e-4)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for model, optimizer in ((fused_flow, fused), (plain_flow, plain)):
        for _ in range(2):
            loss_and_grads(model, x)
            optimizer.step()
    for (name, a), b in zip(fused_flow.named_parameters(), plain_flow.parameters()):
        assert not torch.equal(a, flow.state_dict()[name]), name  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not make_optimizer("adamax", plain_flow.parameters(), lr=1e-3).defaults.get("fused")


def test_glow_fit_trains_with_the_fused_adam(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True
