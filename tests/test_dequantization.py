"""Variational dequantization (Flow++): q stays inside a bin, its density is right, it beats uniform noise."""

from __future__ import annotations

import math

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.flow.dequantization import VariationalDequantizer, dequantize, unit_noise
from glow_lightning.flow.quantize import unit_to_bins
from glow_lightning.module import GlowModule


def randomised(deq: VariationalDequantizer, seed: int = 0, scale: float = 0.5) -> VariationalDequantizer:
    """Move every weight off its (identity) initialisation so that q is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deq.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return deq


def test_q_starts_as_uniform_dequantization():
    deq = VariationalDequantizer(3, 8, hidden_channels=8)
    bins = torch.randint(0, 256, (2, 3, 4, 4))
    noise = torch.rand(2, 3, 4, 4)
    u, log_q = deq(bins, noise)
    torch.testing.assert_close(u, noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_q, torch.zeros(2), atol=1e-3, rtol=0)


def test_q_samples_stay_inside_their_bin():
    deq = randomised(VariationalDequantizer(3, 8, hidden_channels=8), scale=2.0)
    bins = torch.randint(0, 256, (16, 3, 8, 8))
    bins[0], bins[1] = 0, 255  # both edges of the range
    noise = torch.rand(16, 3, 8, 8)
    noise[2], noise[3] = 0.0, 1.0  # extreme base noise
    u, log_q = deq(bins, noise)
    assert (u >= 0).all() and (u < 1).all()
    assert (u - noise).abs().max() > 0.1  # q is really not uniform here
    assert torch.equal(unit_to_bins(dequantize(bins, u, 8), 8), bins)
    assert torch.isfinite(log_q).all()


def test_log_q_is_the_density_of_the_samples():
    """u = f(v) with v ~ U(0, 1)^D, so log q(u) = -log|det du/dv| (checked against autograd's Jacobian)."""
    deq = randomised(VariationalDequantizer(1, 8, hidden_channels=8), scale=0.1).double()
    bins = torch.randint(0, 256, (1, 1, 2, 2))
    noise = torch.rand(1, 1, 2, 2, dtype=torch.float64) * 0.8 + 0.1
    jac = torch.autograd.functional.jacobian(lambda v: deq(bins, v.view(1, 1, 2, 2))[0].flatten(), noise.flatten())
    _, log_q = deq(bins, noise)
    assert log_q.abs().item() > 0.1  # a non-trivial density
    torch.testing.assert_close(log_q[0].double(), -torch.linalg.slogdet(jac)[1], atol=1e-4, rtol=1e-5)


def test_unit_noise_recovers_the_datamodule_noise():
    bins = torch.randint(0, 256, (4, 3, 4, 4))
    u = torch.rand(4, 3, 4, 4)
    torch.testing.assert_close(unit_noise(dequantize(bins, u, 8), bins, 8), u, atol=2e-5, rtol=0)


def test_module_rejects_unknown_dequantization():
    with pytest.raises(ValueError, match="dequantization"):
        GlowModule(dequantization="learned")
    with pytest.raises(ValueError, match="iw_samples"):
        GlowModule(iw_samples=-1)


def _train_bound(variational: bool, steps: int = 40, n_bits: int = 3) -> float:
    """Train a tiny Glow (and q) on one fixed batch; return the bound in bits/dim on fresh noise."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 4)
    images = (ramp[None, None, :, None] * torch.rand(4, 3, 1, 1, generator=g)) / 2 + (
        ramp[None, None, None, :] * torch.rand(4, 3, 1, 1, generator=g)
    ) / 2  # smooth gradients, (4, 3, 4, 4)
    bins = (images * (2**n_bits - 1)).round().long()
    torch.manual_seed(1)
    flow = Glow(in_channels=3, image_size=4, levels=1, steps_per_level=2, hidden_channels=16, n_bits=n_bits)
    deq = VariationalDequantizer(3, n_bits, hidden_channels=16) if variational else None
    noise = torch.Generator().manual_seed(2)
    flow.initialize(dequantize(bins, torch.rand(bins.shape, generator=noise), n_bits))
    params = list(flow.parameters()) + (list(deq.parameters()) if deq else [])
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def bound(v: torch.Tensor) -> torch.Tensor:
        log_q = torch.zeros(bins.shape[0])
        u = v
        if deq is not None:
            u, log_q = deq(bins, v)
        log_prob = flow.log_prob(dequantize(bins, u, n_bits)) - log_q
        return (-log_prob / (flow.dims * math.log(2)) + n_bits).mean()

    for _ in range(steps):
        loss = bound(torch.rand(bins.shape, generator=noise))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    evaluation = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return torch.stack([bound(torch.rand(bins.shape, generator=evaluation)) for _ in range(8)]).mean().item()


@pytest.mark.slow
def test_variational_dequantization_reaches_a_lower_bound_than_uniform():
    uniform, variational = _train_bound(False), _train_bound(True)
    print(f"fixed batch, 40 steps: uniform {uniform:.4f} bits/dim, variational {variational:.4f} bits/dim")
    assert variational < uniform - 0.01
