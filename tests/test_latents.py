"""Standardized latents, interpolation between them, and attribute manipulation on the pure flow.

Kingma & Dhariwal (2018), section 5 / figures 5-6 and openai/glow ``demo/``: latent edits work on
eps = (z - mean) / scale, each level standardized by its prior. The manipulation fixture has a
synthetic, visible attribute (a bright mark in the top-left corner) after a short fit.
"""

from __future__ import annotations

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.flow.quantize import bins_to_unit, unit_to_bins
from glow_lightning.flow.visualize import interpolate, reconstruct

from .test_layers import perturb
from .test_visualize import random_bins, trained_like

N_BITS = 5
MARK = (slice(0, 3), slice(0, 3))  # rows, columns of the attribute's corner mark


def marked_images(n: int, mark: bool, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) bins: a horizontal gradient of random brightness, plus (``mark``) a bright 3x3 corner."""
    g = torch.Generator().manual_seed(seed)
    base = 0.15 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
    x = base + 0.2 * torch.linspace(0, 1, 8).view(1, 1, 1, 8) + 0.03 * torch.randn(n, 1, 8, 8, generator=g)
    if mark:
        x[..., MARK[0], MARK[1]] = 0.9 + 0.05 * torch.rand(n, 1, 3, 3, generator=g)
    return unit_to_bins(x.clamp(0, 1), N_BITS)


def mark_effect(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean of the corner minus mean of the rest."""
    corner = images[..., MARK[0], MARK[1]].flatten(1).mean(1)
    return corner - (images.flatten(1).sum(1) - images[..., MARK[0], MARK[1]].flatten(1).sum(1)) / (64 - 9)


@pytest.fixture(scope="module")
def fitted():
    """A tiny Glow fitted for 120 steps on half marked, half unmarked images."""
    torch.manual_seed(0)
    bins = torch.cat([marked_images(256, True, 1), marked_images(256, False, 2)])
    flow = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=2, hidden_channels=16, n_bits=N_BITS)
    flow.initialize(bins_to_unit(bins[torch.randperm(len(bins))[:128]], N_BITS, offset=0.5))
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    for _ in range(120):
        batch = bins[torch.randint(0, len(bins), (32,))]
        x = bins_to_unit(batch, N_BITS) + torch.rand(batch.shape) / 2**N_BITS
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval(), bins


@pytest.mark.parametrize("num_classes", [0, 3])
def test_standardized_latents_round_trip_exactly(num_classes):
    if num_classes:
        torch.manual_seed(0)
        flow = Glow(in_channels=3, image_size=8, levels=2, steps_per_level=2, hidden_channels=16, num_classes=3)
        flow.initialize(torch.rand(16, 3, 8, 8), torch.arange(16) % 3)
        flow = perturb(flow, scale=0.05).eval()
        torch.nn.init.normal_(flow.top_prior.class_proj.weight, std=0.3)
    else:
        flow = trained_like(8)
    labels = torch.tensor([0, 1, 2, 1]) if num_classes else None
    x = bins_to_unit(random_bins(4, 8), 8, offset=0.5)
    with torch.no_grad():
        eps, logdet = flow.encode(x, labels, standardize=True)
        z, raw_logdet = flow.encode(x, labels)
        back = flow.decode(eps, labels, standardized=True)
    assert torch.allclose(back, x, atol=1e-5)
    assert torch.equal(unit_to_bins(back, 8), unit_to_bins(x, 8))
    assert torch.equal(logdet, raw_logdet)
    # standardization is not the identity: the priors are off their zero initialisation
    assert not any(torch.allclose(e, r, atol=1e-3) for e, r in zip(eps, z))
    mean, logs = flow.top_prior(4, flow.device, labels)
    assert torch.allclose(eps[-1], (z[-1] - mean) / logs.exp(), atol=1e-6)
    with torch.no_grad():  # the finest level's prior depends on the kept half, i.e. on the levels above
        other = [eps[0], torch.randn_like(eps[1])]
        assert not torch.allclose(flow.decode(other, labels, standardized=True), back, atol=1e-3)


def test_spherical_interpolation_stays_in_the_data_brightness_range(fitted):
    flow, bins = fitted
    brightness = bins_to_unit(bins, N_BITS).flatten(1).mean(1)
    a, b = bins[:6], bins[256:262]  # marked -> unmarked
    images = interpolate(flow, a, b, steps=7, method="spherical").view(6, 7, 1, 8, 8)
    middle = images[:, 1:-1].flatten(2).mean(2)
    assert middle.min() >= brightness.min() - 0.02 and middle.max() <= brightness.max() + 0.02, middle
    assert torch.equal(images[:, 0], reconstruct(flow, a))


def test_manipulation_moves_the_attribute_monotonically_and_more_than_a_random_direction(fitted):
    flow, bins = fitted
    x_with = bins_to_unit(marked_images(200, True, 3), N_BITS)
    x_without = bins_to_unit(marked_images(200, False, 4), N_BITS)
    direction = flow.attribute_direction(x_with, x_without, batch_size=128)
    assert [tuple(d.shape) for d in direction] == flow.latent_shapes
    g = torch.Generator().manual_seed(0)
    norm = torch.cat([d.flatten() for d in direction]).norm()
    noise = [torch.randn(d.shape, generator=g) for d in direction]
    scale = norm / torch.cat([r.flatten() for r in noise]).norm()
    random_direction = [r * scale for r in noise]
    strengths = [-1.0, -0.5, 0.0, 0.5, 1.0]
    test = marked_images(8, False, 5)
    images = flow.manipulate(bins_to_unit(test, N_BITS), direction, strengths).view(8, 5, 1, 8, 8)
    random_images = flow.manipulate(bins_to_unit(test, N_BITS), random_direction, strengths).view(8, 5, 1, 8, 8)
    assert torch.equal(images[:, 2], reconstruct(flow, test))  # strength 0 is the exact reconstruction
    assert torch.equal(random_images[:, 2], images[:, 2])
    effect = torch.stack([mark_effect(images[:, i]).mean() for i in range(5)])
    random_effect = torch.stack([mark_effect(random_images[:, i]).mean() for i in range(5)])
    print("effect per strength", effect.tolist(), "random direction", random_effect.tolist())
    assert (effect.diff() > 0).all(), effect
    assert (effect[-1] - effect[0]) > 3 * (random_effect[-1] - random_effect[0]).abs(), (effect, random_effect)


def test_manipulate_rejects_bad_strengths_and_directions():
    flow = trained_like(8)
    x = bins_to_unit(random_bins(2, 8), 8)
    direction = [torch.zeros(s) for s in flow.latent_shapes]
    with pytest.raises(ValueError, match="strengths must be a non-empty list"):
        flow.manipulate(x, direction, [])
    with pytest.raises(ValueError, match=r"latents\[0\] must have shape"):
        flow.manipulate(x, direction[::-1], [0.0])
    with pytest.raises(ValueError, match="needs images on both sides"):
        flow.attribute_direction(x, x[:0])
