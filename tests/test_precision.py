"""Mixed precision (DESIGN.md rule 3): under bf16 autocast the coupling networks run in bf16, while
ActNorm, the 1x1 conv, the log-determinants, the priors and the loss stay float32, so bits/dim barely
moves and decode(encode(x)) still reconstructs. Plus ``configs/bf16.yaml`` trains end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.flow.layers import InvConv1x1, ZeroConv2d

from .conftest import config, fit_args


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def trained_like_flow() -> tuple[Glow, torch.Tensor]:
    """A small Glow whose zero-initialised convolutions and priors are moved off zero, and a batch."""
    torch.manual_seed(0)
    flow = Glow(in_channels=3, image_size=16, levels=2, steps_per_level=2, hidden_channels=32, n_bits=8)
    x = (torch.randint(0, 256, (8, 3, 16, 16)).float() + torch.rand(8, 3, 16, 16)) / 256
    flow.initialize(x)
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, ZeroConv2d):
                m.conv.weight.normal_(0, 0.05)
                m.conv.bias.normal_(0, 0.05)
                m.logs.normal_(0, 0.05)
        flow.top_prior.learned.normal_(0, 0.1)
    return flow.eval(), x


def test_bf16_autocast_bits_per_dim_within_0_02_of_float32(trained_like_flow):
    flow, x = trained_like_flow
    with torch.no_grad():
        full = flow.bits_per_dim(x).mean().item()
        with autocast():
            mixed_bpd = flow.bits_per_dim(x)
            prior_terms, logdet = flow.log_prob_terms(x)
    assert mixed_bpd.dtype == logdet.dtype == torch.float32  # loss and log-dets in float32
    assert all(t.dtype == torch.float32 for t in prior_terms)
    assert math.isfinite(full)
    assert abs(mixed_bpd.mean().item() - full) < 0.02  # that bf16 did run: next-but-one test


def test_bf16_autocast_still_inverts(trained_like_flow):
    flow, x = trained_like_flow
    with torch.no_grad(), autocast():
        latents, _ = flow.encode(x)
        x_again = flow.decode(latents)
    assert all(z.dtype == torch.float32 for z in latents)
    assert (x_again.float() - x).abs().max().item() < 5e-3


def test_coupling_networks_do_run_in_bf16_under_autocast(trained_like_flow):
    flow, x = trained_like_flow
    seen = []
    net = flow.steps[0][0].coupling.net[0]  # the first conv of a coupling network
    handle = net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.no_grad(), autocast():
            flow.log_prob(x)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16]


def test_invconv_and_prior_layers_compute_in_float32_under_autocast(trained_like_flow):
    """Rule 3 layer by layer: the 1x1 conv and the priors' own convolutions / linear maps, which autocast
    would run in bf16, compute in float32 (a bf16 product times a float32 scale would only look float32)."""
    torch.manual_seed(0)
    conditional = Glow(in_channels=3, image_size=8, levels=2, steps_per_level=1, hidden_channels=8, num_classes=3)
    flow, x = trained_like_flow
    layers = {
        f"{name}.{sub}": module
        for model, name in ((flow, "flow"), (conditional, "conditional"))
        for sub, module in model.named_modules()
        if isinstance(module, InvConv1x1)
        or (sub.startswith(("split_priors", "top_prior", "classifier")) and isinstance(module, (nn.Conv2d, nn.Linear)))
    }
    assert any(".class_proj" in n for n in layers) and any(".split_priors.0.conv.conv" in n for n in layers)
    seen: dict[str, set] = {}

    def record(name: str):
        return lambda module, inputs, output: seen.setdefault(name, set()).update(
            t.dtype for t in (output if isinstance(output, tuple) else (output,))
        )

    hooks = [module.register_forward_hook(record(name)) for name, module in layers.items()]
    labels = torch.tensor([0, 2])
    try:
        with torch.no_grad(), autocast():
            flow.log_prob(x)
            flow.sample(2)
            conditional.log_prob_terms_and_logits(x[:2, :, :8, :8], labels)
    finally:
        for h in hooks:
            h.remove()
    assert seen.keys() == layers.keys()  # every one ran
    assert {n: d for n, d in seen.items() if d != {torch.float32}} == {}


@pytest.mark.slow
def test_bf16_overlay_trains_with_finite_bits_per_dim(cifar_dir, tmp_path):
    cli = main(fit_args(cifar_dir, str(tmp_path), "--config", config("bf16.yaml"), "--trainer.max_epochs", "1"))
    assert cli.trainer.precision == "bf16-mixed"
    metrics = cli.trainer.callback_metrics
    for key in ("train/bpd", "val/bpd", "train/grad_norm"):
        assert math.isfinite(metrics[key].item()), key
    assert 0 < metrics["val/bpd"].item() < 16
