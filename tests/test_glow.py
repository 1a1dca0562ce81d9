"""The Glow API: encode / decode / log_prob / sample, its errors, and learning at all."""

from __future__ import annotations

import math

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.flow.quantize import bins_to_unit

from .test_layers import brute_force_logdet, perturb

COUPLINGS = ["affine", "additive"]
PERMUTATIONS = ["invconv", "invconv_lu", "reverse", "shuffle"]


def tiny(**kwargs) -> Glow:
    args = dict(in_channels=3, image_size=8, levels=2, steps_per_level=2, hidden_channels=16)
    return Glow(**{**args, **kwargs})


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("permutation", PERMUTATIONS)
def test_decode_inverts_encode(coupling, permutation):
    torch.manual_seed(0)
    flow = tiny(coupling=coupling, permutation=permutation)
    x = torch.rand(4, 3, 8, 8)
    flow.initialize(x)
    perturb(flow, scale=0.05)
    latents, logdet = flow.encode(x)
    assert [tuple(z.shape) for z in latents] == [(4, 6, 4, 4), (4, 24, 2, 2)]
    assert logdet.shape == (4,)
    assert (flow.decode(latents) - x).abs().max() < 1e-5


def test_glow_logdet_equals_autograd_jacobian():
    torch.manual_seed(0)
    flow = Glow(in_channels=1, image_size=4, levels=2, steps_per_level=2, hidden_channels=8)
    x = torch.rand(2, 1, 4, 4)
    flow.initialize(x)
    perturb(flow, scale=0.1)

    def flat_latents(v):
        latents, _ = flow.encode(v)
        return (torch.cat([z.flatten(1) for z in latents], dim=1),)

    _, logdet = flow.encode(x)
    assert torch.allclose(logdet, brute_force_logdet(flat_latents, x), atol=1e-4)


def test_log_prob_is_prior_plus_logdet_and_bits_per_dim_formula():
    torch.manual_seed(0)
    flow = tiny()
    x = torch.rand(3, 3, 8, 8)
    flow.initialize(x)
    perturb(flow, scale=0.05)
    terms, logdet = flow.log_prob_terms(x)
    log_prob = flow.log_prob(x)
    assert len(terms) == 2
    assert torch.allclose(log_prob, sum(terms) + logdet)
    assert torch.allclose(flow.bits_per_dim(x), -log_prob / (3 * 64 * math.log(2)) + 8)


def test_bits_per_dim_after_init_on_uniform_noise_is_near_whitening_bound():
    """8 + 0.5 * log2(2 pi e / 12) = 8.255 for a perfectly whitening model."""
    torch.manual_seed(0)
    flow = Glow(image_size=32, levels=3, steps_per_level=4, hidden_channels=32)
    pixels = torch.randint(0, 256, (128, 3, 32, 32))
    x = bins_to_unit(pixels, 8) + torch.rand(pixels.shape) / 256
    flow.initialize(x[:64])
    with torch.no_grad():
        bpd = flow.bits_per_dim(x[64:]).mean().item()
    assert 8.25 <= bpd <= 8.30, bpd


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    flow = Glow(image_size=8, levels=2, steps_per_level=2, hidden_channels=32)
    pixels = torch.randint(0, 256, (16, 3, 8, 8))
    # structured images (smooth gradients plus a little noise) that a flow can learn
    base = torch.linspace(0, 1, 8)
    x = (base.view(1, 1, 1, 8) * base.view(1, 1, 8, 1) * 0.8 + 0.1).expand(16, 3, 8, 8) + pixels / 256 * 0.05
    flow.initialize(x)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    curve = []
    for _ in range(200):
        loss = flow.bits_per_dim(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    print(f"overfit curve: first {curve[0]:.3f}, last {curve[-1]:.3f}")
    assert curve[0] - curve[-1] >= 1.0, (curve[0], curve[-1])


def test_sample_is_quantized_in_range_and_temperature_zero_is_deterministic():
    torch.manual_seed(0)
    flow = tiny(n_bits=5)
    flow.initialize(torch.rand(8, 3, 8, 8))
    perturb(flow, scale=0.05)
    flow.eval()
    x = flow.sample(6, temperature=0.7)
    assert x.shape == (6, 3, 8, 8)
    assert x.min() >= 0 and x.max() < 1
    assert torch.equal(x * 32, torch.round(x * 32))
    assert torch.equal(flow.sample(2, temperature=0.0), flow.sample(2, temperature=0.0))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 12, "levels": 3}, "image_size"),
        ({"levels": 0}, "levels"),
        ({"n_bits": 9}, "n_bits"),
        ({"n_bits": 0}, "n_bits"),
        ({"coupling": "spline"}, "coupling"),
        ({"permutation": "random"}, "permutation"),
        ({"hidden_channels": -1}, "hidden_channels"),
    ],
)
def test_impossible_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny(**kwargs)


def test_wrong_image_shape_names_the_input():
    flow = tiny()
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, 8, 8\)"):
        flow.log_prob(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_samples"):
        flow.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, temperature=-1.0)


def test_class_conditional_prior_uses_labels():
    torch.manual_seed(0)
    flow = tiny(num_classes=3)
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    flow.initialize(x, labels)
    perturb(flow, scale=0.01)  # larger moves of the ActNorm-amplified coupling nets overflow an untrained flow
    a = flow.log_prob(x, labels)
    b = flow.log_prob(x, torch.tensor([1, 2, 0, 1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="labels"):
        flow.sample(2)
