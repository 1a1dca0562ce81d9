"""Invertible layers of Glow.

Kingma & Dhariwal (2018), "Glow: Generative Flow with Invertible 1x1 Convolutions", section 3 and
table 1: actnorm (3.1), invertible 1x1 convolution with its LU parameterisation (3.2), affine
coupling (3.3); the reverse / shuffle permutations are the paper's ablations (section 5.1).

Every layer maps ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, logdet)`` where ``logdet``
(shape ``(B,)``) is log|det| of the Jacobian of the direction that was run (the inverse returns the
negative of the forward's). Precision-sensitive maths runs through :func:`float32`.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Permutation = Literal["invconv", "invconv_lu", "reverse", "shuffle"]
Coupling = Literal["affine", "additive"]
CouplingNorm = Literal["none", "actnorm"]
COUPLING_NORMS = ("none", "actnorm")


_HALF = (torch.float16, torch.bfloat16)


def float32(fn):
    """Run ``fn`` in float32 with autocast off (DESIGN.md rule 3): log-dets, 1x1 conv, priors, loss.

    Half-precision tensors (bf16, fp16) are raised to float32; float64 stays float64, so a ``flow.double()``
    runs wholly in float64 (the exactness checks of reversible backprop use it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = "cpu"
        for a in args:  # a plain loop: torch 2.6's dynamo breaks the graph on next() over a generator
            if isinstance(a, Tensor):
                device_type = a.device.type
                break
        with torch.autocast(device_type, enabled=False):
            args = [a.float() if isinstance(a, Tensor) and a.dtype in _HALF else a for a in args]
            return fn(*args, **kwargs)

    return wrapper


def squeeze(x: Tensor) -> Tensor:
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Depth-to-space: (B, 4C, H/2, W/2) -> (B, C, H, W); the exact inverse of :func:`squeeze`."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(logs)`` (paper section 3.1).

    Initialised from data once, explicitly, by :meth:`Glow.initialize` (never lazily in ``forward``):
    the first batch's per-channel mean and standard deviation make the output zero-mean, unit-variance.
    Under torch.distributed the statistics are all-reduced, so every rank gets the same parameters.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.init_mode = False  # set only inside Glow.initialize()

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        x = x.detach().double()
        stats = torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))])  # (2, C)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(count)
        mean = stats[0] / count
        std = (stats[1] / count - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-torch.log(std + 1e-6).view_as(self.logs))
        self.initialized.fill_(True)

    @float32
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.init_mode:
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        return y, (x.shape[2] * x.shape[3] * self.logs.sum()).expand(x.shape[0])

    @float32
    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y * torch.exp(-self.logs) - self.bias
        return x, (-y.shape[2] * y.shape[3] * self.logs.sum()).expand(y.shape[0])


class _WeightCache:
    """Holds (weight, inverse, logdet) computed in eval mode; valid while the weight is unchanged.

    Checked by value, not by tensor version: weight swaps such as EMA use ``.data.copy_``, which does
    not bump versions (DESIGN.md, Lightning rules). Used only without autograd: a cached result would
    carry one call's graph into the next (a second backward fails).
    """

    def __init__(self):
        self.entry = None

    def get(self, weight: Tensor, compute):
        cached = self.entry
        if cached is not None and cached[0].device == weight.device and torch.equal(cached[0], weight):
            return cached[1:]
        inverse, logdet = compute(weight)
        self.entry = (weight.detach().clone(), inverse, logdet)
        return inverse, logdet


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution (paper section 3.2), plain or LU-decomposed (``lu=True``).

    Initialised to a random rotation. The plain form computes log|det W| and W^-1 in float64; the
    LU form ``W = P L (U + diag(sign * exp(log_s)))`` gets log|det W| = sum(log_s) for free.
    In eval mode without autograd W^-1 and log|det W| are cached (sampling decodes many batches with fixed weights).
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.lu = lu
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            p, lower, upper = torch.linalg.lu(q)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p.float())
            self.register_buffer("sign_s", torch.sign(s).float())
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
            self.register_buffer("eye", torch.eye(channels))
            self.lower = nn.Parameter(lower.float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(s.abs()).float())
        else:
            self.weight = nn.Parameter(q.float())
        self._cache = _WeightCache()

    def _weight(self) -> Tensor:
        if not self.lu:
            return self.weight
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def _logdet_per_pixel(self, weight: Tensor) -> Tensor:
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(weight.double())[1].to(weight.dtype)

    def _inverse_and_logdet(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        # inv_ex: no error check, which would sync with the device (the reversible backward inverts every step)
        return torch.linalg.inv_ex(weight.double()).inverse.to(weight.dtype), self._logdet_per_pixel(weight)

    @float32
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight = self._weight()
        if self.training or torch.is_grad_enabled():  # no cache: autograd needs this call's graph
            logdet = self._logdet_per_pixel(weight)
        else:
            logdet = self._cache.get(weight, self._inverse_and_logdet)[1]
        y = F.conv2d(x, weight[:, :, None, None])
        return y, (x.shape[2] * x.shape[3] * logdet).expand(x.shape[0])

    @float32
    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        weight = self._weight()
        if self.training or torch.is_grad_enabled():  # no cache: autograd needs this call's graph
            w_inv, logdet = self._inverse_and_logdet(weight)
        else:
            w_inv, logdet = self._cache.get(weight, self._inverse_and_logdet)
        x = F.conv2d(y, w_inv[:, :, None, None])
        return x, (-y.shape[2] * y.shape[3] * logdet).expand(y.shape[0])


class Permute(nn.Module):
    """A fixed channel permutation: ``reverse`` (RealNVP-style) or a random ``shuffle``. logdet 0."""

    def __init__(self, channels: int, mode: Literal["reverse", "shuffle"] = "reverse"):
        super().__init__()
        perm = torch.arange(channels - 1, -1, -1) if mode == "reverse" else torch.randperm(channels)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[:, self.inv_perm], y.new_zeros(y.shape[0])


class ZeroConv2d(nn.Module):
    """3x3 convolution that starts at zero, output scaled by ``exp(3 * logs)`` (paper section 3.3)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(3 * self.logs)


class NetActNorm(ActNorm):
    """ActNorm inside a coupling network (openai/glow's ``conv2d`` with ``do_actnorm``): the same per-channel
    affine, initialised from data by :meth:`Glow.initialize` like every ActNorm, but only the output is
    returned (no log-determinant: it is not a flow layer) and it runs in the network's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if self.init_mode:
            self._initialize(x)
        return (x + self.bias.to(x.dtype)) * torch.exp(self.logs).to(x.dtype)


def coupling_net(
    in_channels: int, hidden_channels: int, out_channels: int, norm: CouplingNorm = "none"
) -> nn.Sequential:
    """The coupling's NN(): conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3.

    ``norm="actnorm"`` is openai/glow's network: the two hidden convolutions have no bias and are each
    followed by a data-initialised ActNorm (:class:`NetActNorm`), their weights drawn from N(0, 0.05) as in
    openai/glow's ``tfops.conv2d`` (its extra "edge" padding channel is left out). ``"none"``: biases and
    PyTorch's default initialisation (the network of checkpoints written before the option existed).

    It runs in ``channels_last``, convolution weights included: stored that way, the 3x3 kernels are not
    converted on every call (measured faster, BENCHMARKS.md). ``.to(device)`` and ``load_state_dict`` keep it.
    Only the convolutions are converted: ZeroConv2d's ``logs`` (1, C, 1, 1) stays contiguous like its gradient,
    or DDP warns "Grad strides do not match bucket view strides" (issue 17).
    """
    if norm not in COUPLING_NORMS:
        raise ValueError(f"coupling_norm must be one of {COUPLING_NORMS}, got {norm!r}")
    normed = norm == "actnorm"
    hidden: list[nn.Module] = []
    for conv in (
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=not normed),
        nn.Conv2d(hidden_channels, hidden_channels, 1, bias=not normed),
    ):
        if normed:
            nn.init.normal_(conv.weight, 0.0, 0.05)
        # ReLU in place on the conv's (or ActNorm's) temporary output: no extra buffer (measured faster, BENCHMARKS.md)
        hidden += (
            [conv, NetActNorm(hidden_channels), nn.ReLU(inplace=True)] if normed else [conv, nn.ReLU(inplace=True)]
        )
    net = nn.Sequential(*hidden, ZeroConv2d(hidden_channels, out_channels))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return net


class CouplingLayer(nn.Module):
    """Affine or additive coupling (paper section 3.3).

    ``x_a, x_b = split(x)``; affine: ``y_b = (x_b + shift) * sigmoid(raw + 2)``, additive:
    ``y_b = x_b + shift``, with ``(shift, raw) = NN(x_a)``; ``y_a = x_a``.
    """

    def __init__(self, channels: int, hidden_channels: int, coupling: Coupling = "affine", norm: CouplingNorm = "none"):
        super().__init__()
        self.affine = coupling == "affine"
        self.split = channels // 2
        out = 2 * (channels - self.split) if self.affine else channels - self.split
        self.net = coupling_net(self.split, hidden_channels, out, norm)
        self.recompute_net = False  # memory saving: keep no NN activations, recompute them in backward

    def _shift_and_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor | None]:
        # channels_last convolutions are ~20% faster on CPU (oneDNN), see BENCHMARKS.md; back to NCHW after
        x_a = x_a.contiguous(memory_format=torch.channels_last)
        if self.recompute_net and self.training and torch.is_grad_enabled():
            h = checkpoint(self.net, x_a, use_reentrant=False).contiguous()
        else:
            h = self.net(x_a).contiguous()
        if not self.affine:
            return h, None
        shift, raw = h.chunk(2, dim=1)
        return shift, self._scale(raw)

    @staticmethod
    @float32
    def _scale(raw: Tensor) -> Tensor:
        return torch.sigmoid(raw + 2.0)

    @staticmethod
    @float32
    def _logdet(scale: Tensor | None, like: Tensor) -> Tensor:
        if scale is None:
            return like.new_zeros(like.shape[0], dtype=torch.promote_types(like.dtype, torch.float32))
        return torch.log(scale).flatten(1).sum(1)

    @staticmethod
    def _couple(x_b: Tensor, shift: Tensor, scale: Tensor | None) -> Tensor:
        return (x_b + shift) * scale if scale is not None else x_b + shift

    @staticmethod
    def _uncouple(y_b: Tensor, shift: Tensor, scale: Tensor | None) -> Tensor:
        return y_b / scale - shift if scale is not None else y_b - shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, scale = self._shift_and_scale(x_a)
        return torch.cat([x_a, self._couple(x_b, shift, scale)], dim=1), self._logdet(scale, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, scale = self._shift_and_scale(y_a)
        return torch.cat([y_a, self._uncouple(y_b, shift, scale)], dim=1), -self._logdet(scale, y)


class FlowStep(nn.Module):
    """One step of flow (paper figure 2a): actnorm -> permutation -> coupling."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        coupling: Coupling = "affine",
        permutation: Permutation = "invconv_lu",
        coupling_norm: CouplingNorm = "none",
    ):
        super().__init__()
        self.actnorm = ActNorm(channels)
        if permutation in ("invconv", "invconv_lu"):
            self.permute = InvConv1x1(channels, lu=permutation == "invconv_lu")
        else:
            self.permute = Permute(channels, permutation)
        self.coupling = CouplingLayer(channels, hidden_channels, coupling, coupling_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, ld0 = self.actnorm(x)
        x, ld1 = self.permute(x)
        x, ld2 = self.coupling(x)
        return x, ld0 + ld1 + ld2

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y, ld2 = self.coupling.inverse(y)
        y, ld1 = self.permute.inverse(y)
        y, ld0 = self.actnorm.inverse(y)
        return y, ld0 + ld1 + ld2
