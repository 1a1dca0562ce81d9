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


@torch.no_grad()
def test_invconv_eval_cache_follows_weight_changes():
    conv = perturb(InvConv1x1(4, lu=False)).eval()
    y = torch.randn(2, 4, 3, 3)
    first, _ = conv.inverse(y)
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


@pytest.mark.parametrize("lu", [False, True])
def test_invconv_eval_cache_is_used_without_autograd_only(lu, monkeypatch):
    """DESIGN.md rule 2: W^-1 and log|det W| are computed once for fixed weights (eval, no grad); with
    autograd every call builds its own graph, so eval-mode gradients (twice in a row) equal training-mode ones."""
    conv = perturb(InvConv1x1(4, lu=lu)).eval()
    calls = []
    compute = conv._inverse_and_logdet
    monkeypatch.setattr(conv, "_inverse_and_logdet", lambda w: calls.append(1) or compute(w))
    y = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        for _ in range(3):
            conv.inverse(y)
            conv(y)
    assert len(calls) == 1
    grads = []
    for mode in (True, False, False):  # train, then eval twice
        conv.train(mode)
        conv.zero_grad()
        x, logdet = conv.inverse(y)
        (x.square().sum() + logdet.sum() + conv(y)[1].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in conv.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])


def test_invconv_cache_of_another_device_is_not_compared(monkeypatch):
    """A model moved to another device after sampling recomputes its cache (torch.equal across devices raises)."""
    conv = perturb(InvConv1x1(4, lu=False)).eval()
    y = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected, _ = conv.inverse(y)
        weight, inverse, logdet = conv._cache.entry
        conv._cache.entry = (weight.to("meta"), inverse.to("meta"), logdet.to("meta"))  # as if cached on a GPU
        again, _ = conv.inverse(y)
    torch.testing.assert_close(again, expected)


def test_plain_invconv_inverse_and_logdet_are_computed_in_float64():
    """DESIGN.md rule 2: on an ill-conditioned W (cond ~1e5) float32 inv / slogdet are off; float64 is not."""
    g = torch.Generator().manual_seed(0)
    q1, q2 = (torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0] for _ in range(2))
    weight = (q1 @ torch.diag(torch.logspace(0, -5, 48, dtype=torch.float64)) @ q2).float()
    conv = InvConv1x1(48, lu=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    w_inv, logdet = conv._inverse_and_logdet(conv.weight)
    exact_inv = torch.linalg.inv(weight.double())
    exact_logdet = torch.linalg.slogdet(weight.double())[1]
    assert (w_inv.double() - exact_inv).abs().max() / exact_inv.abs().max() < 1e-6
    assert abs(logdet.double() - exact_logdet) < 1e-4
