"""Reconstructions, interpolations, temperature-0 samples and image grids (pure PyTorch, no Lightning)."""

from __future__ import annotations

import math

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.flow.quantize import bins_to_unit, unit_to_bins
from glow_lightning.flow.visualize import (
    encode_bins,
    image_grid,
    interpolate,
    interpolate_latents,
    lerp,
    quantize,
    reconstruct,
    side_by_side,
    slerp,
)

from .test_layers import perturb


def trained_like(n_bits: int = 8, channels: int = 3, **kwargs) -> Glow:
    """A tiny Glow moved off its initialisation (non-zero priors, non-identity layers), in eval mode."""
    torch.manual_seed(0)
    args = dict(in_channels=channels, image_size=8, levels=2, steps_per_level=2, hidden_channels=16, n_bits=n_bits)
    flow = Glow(**{**args, **kwargs})
    flow.initialize(torch.rand(16, channels, 8, 8))
    return perturb(flow, scale=0.05).eval()


def random_bins(n: int, n_bits: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**n_bits, (n, channels, 8, 8), generator=g)


@pytest.mark.parametrize("n_bits", [8, 5, 1])
def test_reconstructions_equal_inputs_after_quantization(n_bits):
    flow = trained_like(n_bits)
    bins = random_bins(6, n_bits)
    recon = reconstruct(flow, bins)
    assert torch.equal(unit_to_bins(recon, n_bits), bins)
    assert torch.equal(recon, bins_to_unit(bins, n_bits))  # lower bin edge, like Glow.sample
    # the round trip is not trivially the identity: latents differ from the images
    assert not torch.allclose(
        encode_bins(flow, bins)[0].flatten(1)[:, :10], bins_to_unit(bins, n_bits).flatten(1)[:, :10]
    )


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_endpoints_are_the_reconstructions_of_the_pair(method):
    flow = trained_like(8)
    a, b = random_bins(3, 8, seed=1), random_bins(3, 8, seed=2)
    images = interpolate(flow, a, b, steps=5, method=method)
    assert images.shape == (15, 3, 8, 8)
    rows = images.view(3, 5, 3, 8, 8)  # pair-major: one row per pair
    assert torch.equal(rows[:, 0], reconstruct(flow, a))
    assert torch.equal(rows[:, -1], reconstruct(flow, b))
    assert torch.equal(unit_to_bins(rows[:, 0], 8), a) and torch.equal(unit_to_bins(rows[:, -1], 8), b)
    assert not torch.equal(rows[:, 2], rows[:, 0]) and not torch.equal(rows[:, 2], rows[:, -1])


def test_linear_interpolation_of_every_level_is_the_straight_line():
    flow = trained_like(8)
    za, zb = encode_bins(flow, random_bins(2, 8, seed=1)), encode_bins(flow, random_bins(2, 8, seed=2))
    path = interpolate_latents(za, zb, steps=3)
    assert len(path) == flow.levels
    for level in range(flow.levels):
        middle = path[level].view(2, 3, *za[level].shape[1:])[:, 1]
        assert torch.allclose(middle, (za[level] + zb[level]) / 2, atol=1e-6)


def test_slerp_follows_the_great_circle():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 0.0]])
    t = torch.tensor([0.0, 0.5, 1.0])
    out = slerp(a, b, t)[0]
    assert torch.equal(out[0], a[0]) and torch.equal(out[2], b[0])
    # the angle is split in half; the norm goes along a sine-weighted path, not the chord
    assert torch.allclose(out[1], torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5), 0.0]), atol=1e-6)
    assert torch.allclose(lerp(a, b, t)[0, 1], torch.tensor([0.5, 1.0, 0.0]))
    # (nearly) parallel vectors fall back to the straight line instead of dividing by sin(0)
    assert torch.allclose(slerp(a, 3 * a, t)[0, 1], 2 * a[0])


def test_interpolation_rejects_bad_steps_and_methods():
    flow = trained_like(8)
    a = random_bins(1, 8)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        interpolate(flow, a, a, steps=1)
    with pytest.raises(ValueError, match="'cubic'"):
        interpolate(flow, a, a, steps=3, method="cubic")


def test_temperature_zero_decodes_the_prior_means():
    flow = trained_like(8)
    s1 = flow.sample(3, temperature=0.0, generator=torch.Generator().manual_seed(1))
    s2 = flow.sample(3, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1, s2)
    assert torch.equal(s1[0], s1[1])  # no noise anywhere: every sample is the same image
    with torch.no_grad():
        top_mean, _ = flow.top_prior(1, flow.device)
        means = flow._decode(top_mean, lambda level, h: flow.split_priors[level](h)[0])
    assert torch.equal(s1[:1], quantize(means, flow.n_bits))
    assert not torch.equal(s1, flow.sample(3, temperature=1.0, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    ("n", "nrow", "padding", "rows"), [(10, 4, 2, 3), (8, 8, 2, 1), (6, 3, 0, 2), (3, 8, 1, 1), (1, 8, 2, 1)]
)
def test_grid_size_is_rows_by_columns_of_padded_images(n, nrow, padding, rows):
    images = bins_to_unit(random_bins(n, 5), 5)
    grid = image_grid(images, n_bits=5, nrow=nrow, padding=padding)
    cols = min(n, nrow)
    assert grid.shape == (3, rows * (8 + padding) + padding, cols * (8 + padding) + padding)


def test_grid_holds_display_values_and_white_padding():
    bins = random_bins(4, 5)
    grid = image_grid(bins_to_unit(bins, 5), n_bits=5, nrow=2, padding=2)
    assert torch.equal(grid[:, 2:10, 2:10], bins[0].float() / 31)  # bin k -> k / (2**n_bits - 1)
    assert torch.equal(grid[:, 12:20, 12:20], bins[3].float() / 31)
    assert (grid[:, :2] == 1).all() and (grid[:, :, 10:12] == 1).all()
    for n, shape in ((2, (3, 12, 22)), (1, (3, 12, 12))):
        gray = image_grid(bins_to_unit(random_bins(n, 8, channels=1), 8), n_bits=8, nrow=2)
        assert gray.shape == shape and torch.equal(gray[0], gray[2])  # grayscale shown as RGB
    lone = image_grid(bins_to_unit(bins[:1], 5), n_bits=5, padding=2)
    assert torch.equal(lone[:, 2:10, 2:10], bins[0].float() / 31) and (lone[:, :2] == 1).all()


def test_side_by_side_interleaves_targets_and_reconstructions():
    t, r = torch.arange(3.0).view(3, 1), 10 + torch.arange(3.0).view(3, 1)
    assert side_by_side(t, r).flatten().tolist() == [0, 10, 1, 11, 2, 12]
