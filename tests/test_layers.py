"""Every flow layer: the inverse undoes the forward, and the log-determinant equals the Jacobian's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glow_lightning.flow.layers import ActNorm, CouplingLayer, FlowStep, InvConv1x1, Permute, squeeze, unsqueeze


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter off its (often zero or identity) initialisation, so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each image of x, from autograd's full Jacobian: (B,)."""
    out = []
    for xi in x:
        shape = xi.shape
        jac = torch.autograd.functional.jacobian(lambda v, s=shape: fn(v.view(1, *s))[0].flatten(), xi.flatten())
        out.append(torch.linalg.slogdet(jac.double())[1])
    return torch.stack(out).float()


def layers() -> dict[str, nn.Module]:
    return {
        "actnorm": ActNorm(4),
        "invconv": InvConv1x1(4, lu=False),
        "invconv_lu": InvConv1x1(4, lu=True),
        "reverse": Permute(4, "reverse"),
        "shuffle": Permute(4, "shuffle"),
        "affine_coupling": CouplingLayer(4, 8, "affine"),
        "additive_coupling": CouplingLayer(4, 8, "additive"),
        "flow_step": FlowStep(4, 8, "affine", "invconv_lu"),
    }


@pytest.mark.parametrize("name", list(layers()))
def test_inverse_undoes_forward(name):
    layer = perturb(layers()[name])
    x = torch.randn(3, 4, 4, 4)
    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert logdet.shape == (3,)
    assert torch.allclose(inv_logdet, -logdet, atol=1e-4)


@pytest.mark.parametrize("name", list(layers()))
def test_logdet_equals_autograd_jacobian(name):
    layer = perturb(layers()[name], scale=0.3)
    x = torch.randn(2, 4, 2, 2)
    _, logdet = layer(x)
    expected = brute_force_logdet(layer, x)
    assert torch.allclose(logdet, expected, atol=1e-4), (logdet, expected)


def test_invconv_eval_cache_follows_weight_changes():
    conv = perturb(InvConv1x1(4, lu=False)).eval()
    y = torch.randn(2, 4, 3, 3)
    first, _ = conv.inverse(y)
    with torch.no_grad():
        conv.weight.data.copy_(conv.weight.data @ torch.linalg.qr(torch.randn(4, 4))[0])  # no version bump
    second, _ = conv.inverse(y)
    x, _ = conv(second)
    assert not torch.allclose(first, second)
    assert torch.allclose(x, y, atol=1e-5)


def test_squeeze_roundtrip_and_shape():
    x = torch.randn(2, 3, 8, 8)
    s = squeeze(x)
    assert s.shape == (2, 12, 4, 4)
    assert torch.equal(unsqueeze(s), x)
    assert torch.equal(s[0, :4, 0, 0], torch.stack([x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]))


def test_actnorm_initialize_whitens_and_is_saved():
    norm = ActNorm(3)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + 4.0
    assert not bool(norm.initialized)
    norm.init_mode = True
    y, _ = norm(x)
    norm.init_mode = False
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    state = norm.state_dict()
    assert bool(state["initialized"])
    # forward outside init mode never re-initialises
    y2, _ = norm(x * 10)
    assert not torch.allclose(y2.std(), torch.tensor(1.0), atol=0.1)


def test_affine_coupling_starts_with_sigmoid_two_scale():
    layer = CouplingLayer(4, 8, "affine")
    x = torch.randn(2, 4, 3, 3)
    y, logdet = layer(x)
    scale = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(y[:, 2:], x[:, 2:] * scale, atol=1e-6)
    assert torch.equal(y[:, :2], x[:, :2])
    assert torch.allclose(logdet, torch.full((2,), 2 * 9 * torch.log(scale).item()), atol=1e-5)
