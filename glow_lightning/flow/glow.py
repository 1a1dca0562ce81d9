"""The multi-scale Glow (Kingma & Dhariwal, 2018, figure 2b), in pure PyTorch.

``levels`` (L) levels of ``steps_per_level`` (K) flow steps. Each level squeezes, runs its K steps
and, except the last, factors out half of the channels under a Gaussian conditioned on the kept half.
Images are floats in [0, 1] (``n_bits`` per channel, see :mod:`.quantize`); the flow shifts them
by -0.5 inside, which leaves the density unchanged. Paper figures: CIFAR-10 3.35 bits/dim with
L=3, K=32, width 512, affine coupling, 1x1 convolutions (table 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .checks import (
    CheckpointFileError,
    check_images,
    check_labels,
    check_latents,
    check_value_ranges,
    describe_checkpoint_problem,
    first_line,
    positive_int,
    read_checkpoint,
)
from .classifier import TopClassifier
from .layers import (
    COUPLING_NORMS,
    ActNorm,
    Coupling,
    CouplingLayer,
    CouplingNorm,
    FlowStep,
    Permutation,
    squeeze,
    unsqueeze,
)
from .priors import SplitPrior, TopPrior, gaussian_log_prob, gaussian_sample
from .quantize import bins_to_unit, check_n_bits, unit_to_bins
from .reversible import reversible_steps

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv", "invconv_lu", "reverse", "shuffle")
ARCH_KEYS = (
    "in_channels", "image_size", "levels", "steps_per_level", "hidden_channels",
    "coupling", "permutation", "learn_top", "n_bits", "num_classes", "coupling_norm",
)  # fmt: skip
# Architecture keys added later, with the value that reproduces the network of a checkpoint written without them.
ARCH_BEFORE_KEY = {"coupling_norm": "none"}


def checkpoint_arch(hparams: dict) -> dict:
    """A checkpoint's architecture hyperparameters, with :data:`ARCH_BEFORE_KEY` for keys it predates."""
    return {k: hparams.get(k, ARCH_BEFORE_KEY.get(k)) for k in ARCH_KEYS if k in hparams or k in ARCH_BEFORE_KEY}


CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
MemorySaving = Literal["recompute", "invert"]


def _run_step(step: FlowStep, h: Tensor) -> tuple[Tensor, Tensor]:
    return step(h)


_compiled_steps: dict[str, object] = {}


def _compiled_step(mode: str):
    """One torch.compile'd flow step per mode, shared by every FlowStep of every Glow (regional compilation).

    Parameters are graph inputs (dynamo inlines nn.Modules), so steps of the same shape share one graph:
    compile time grows with the number of levels (shapes), not with K.
    """
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_run_step, mode=None if mode == "default" else mode, dynamic=False)
    return _compiled_steps[mode]


def _allow_graphs(count: int) -> None:
    """Let dynamo keep ``count`` graphs of the shared flow step: one per level shape plus the first step (whose
    input needs no gradient), times batch sizes and options (memory_saving). Past its limit (8 by default)
    dynamo would silently run new shapes eager."""
    name = dynamo_limit_name()
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), count))


def dynamo_limit_name() -> str:
    """Dynamo's per-code-object graph limit: ``recompile_limit``, called ``cache_size_limit`` before torch 2.7."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


class Glow(nn.Module):
    """Glow: L levels x K steps of (actnorm, invertible 1x1 conv, coupling), with multi-scale priors.

    Args:
        in_channels: image channels (3 for RGB, 1 for grayscale).
        image_size: image height and width in pixels; must be divisible by 2**levels.
        levels: number of levels L (each squeezes the image by 2).
        steps_per_level: flow steps K per level.
        hidden_channels: width of each coupling network.
        coupling: ``affine`` (scale and shift) or ``additive`` (shift only).
        permutation: ``invconv_lu`` (LU-decomposed 1x1 conv), ``invconv`` (plain 1x1 conv),
            ``reverse`` or ``shuffle`` (the paper's fixed-permutation ablations).
        learn_top: learn the top prior's per-position mean and log-scale.
        n_bits: bits per colour channel of the data (1..8); sets the bits/dim offset and sampling.
        num_classes: 0 for an unconditional model; > 0 conditions the top prior on the label and adds
            a classifier on the top latent (paper section 5).
        coupling_norm: the coupling networks' hidden layers: ``actnorm`` (openai/glow's network: no biases, a
            data-initialised ActNorm after each hidden convolution) or ``none`` (biases, no normalisation).
        compile: ``torch.compile`` each flow step in training (regional: one graph per level shape, reused
            by all K steps); ``True`` or a mode: ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune``.
            Evaluation and sampling stay eager.
        memory_saving: in training with gradients, ``false``: keep every activation; ``recompute`` (or ``true``):
            keep none of the coupling networks' activations (96% of a step's) and recompute each network in the
            backward pass (torch.utils.checkpoint), ~1/10 of the activation memory at the paper config for ~1.3x
            the step time; ``invert``: keep only each level's output and rebuild every step's input from its
            output with the step's inverse in the backward pass (reversible backprop, :mod:`.reversible`),
            activation memory O(1) in K (~1/40 of plain at the paper config) for ~1.05-1.1x ``recompute``'s step time
            (BENCHMARKS.md).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        levels: int = 3,
        steps_per_level: int = 32,
        hidden_channels: int = 512,
        coupling: Coupling = "affine",
        permutation: Permutation = "invconv_lu",
        learn_top: bool = True,
        n_bits: int = 8,
        num_classes: int = 0,
        coupling_norm: CouplingNorm = "actnorm",
        compile: bool | CompileMode = False,
        memory_saving: bool | MemorySaving = False,
    ):
        args = dict(locals())
        super().__init__()
        for name in ("in_channels", "image_size", "levels", "steps_per_level", "hidden_channels"):
            positive_int(name, args[name])
        if image_size % 2**levels:
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**levels={2**levels}: "
                f"use fewer levels (at most {int(math.log2(image_size & -image_size))}) or another image size"
            )
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
        if coupling_norm not in COUPLING_NORMS:
            raise ValueError(f"coupling_norm must be one of {COUPLING_NORMS}, got {coupling_norm!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.in_channels, self.image_size, self.levels = in_channels, image_size, levels
        self.n_bits = check_n_bits(n_bits)
        self.num_classes = num_classes
        if compile is True:
            compile = "default"
        if compile is not False and compile not in CompileMode.__args__:
            raise ValueError(f"compile must be a bool or one of {CompileMode.__args__}, got {compile!r}")
        if not isinstance(learn_top, bool):
            raise ValueError(f"learn_top must be a bool, got {learn_top!r}")
        if memory_saving is True:
            memory_saving = "recompute"
        if memory_saving is not False and memory_saving not in MemorySaving.__args__:
            raise ValueError(f"memory_saving must be false, true, 'recompute' or 'invert', got {memory_saving!r}")
        self.compile_mode: str | None = compile or None
        if self.compile_mode:
            _allow_graphs(4 * (levels + 1))
        self.memory_saving = memory_saving
        self._initializing = False
        self.config = {k: args[k] for k in ARCH_KEYS}

        self.steps = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        channels, size = in_channels, image_size
        self.latent_shapes: list[tuple[int, int, int]] = []
        self.kept_channels: list[int] = []  # channels each split keeps (levels 1..L-1)
        for level in range(levels):
            channels, size = 4 * channels, size // 2  # squeeze
            self.steps.append(
                nn.ModuleList(
                    FlowStep(channels, hidden_channels, coupling, permutation, coupling_norm)
                    for _ in range(steps_per_level)
                )
            )
            if level < levels - 1:
                kept = channels // 2
                self.kept_channels.append(kept)
                self.split_priors.append(SplitPrior(kept, channels - kept))
                self.latent_shapes.append((channels - kept, size, size))
                channels = kept
        self.latent_shapes.append((channels, size, size))
        self.top_prior = TopPrior(channels, size, learn_top, num_classes)
        self.classifier = TopClassifier(channels, num_classes) if num_classes else None
        for module in self.modules():  # memory saving: the coupling NNs recompute their activations in backward
            if isinstance(module, CouplingLayer):
                module.recompute_net = memory_saving == "recompute"

    # ----------------------------------------------------------------- checks
    @property
    def dims(self) -> int:
        """D = C * H * W, the number of dimensions per image."""
        return self.in_channels * self.image_size**2

    # ------------------------------------------------------------- data init
    @property
    def is_initialized(self) -> bool:
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    @torch.no_grad()
    def initialize(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Data-dependent ActNorm initialisation from a batch of (dequantized) training images.

        Call once before training (``GlowModule`` does it at the start of fit); under
        torch.distributed every rank must call it, and the statistics are all-reduced.
        """
        actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]
        for m in actnorms:
            m.init_mode = True
        self._initializing = True
        try:
            self._encode(x, labels, check_values=True)
        finally:
            self._initializing = False
            for m in actnorms:
                m.init_mode = False

    # ----------------------------------------------------------------- encode
    def _step(self, step: FlowStep, h: Tensor) -> tuple[Tensor, Tensor]:
        """One flow step in the training direction: eager, compiled and/or checkpointed."""
        if not self.training or self._initializing:
            return step(h)
        run = _compiled_step(self.compile_mode) if self.compile_mode else _run_step
        return run(step, h)

    def _inverts(self) -> bool:
        """memory_saving="invert" applies: training with gradients (ActNorm's init runs without)."""
        return self.memory_saving == "invert" and self.training and torch.is_grad_enabled() and not self._initializing

    def _step_runner(self):
        """How the reversible forward runs each step (without autograd): compiled or eager."""
        return _compiled_step(self.compile_mode) if self.compile_mode else _run_step

    def _encode(
        self, x: Tensor, labels: Tensor | None = None, check_values: bool = False, priors: list | None = None
    ) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """x -> (latents, logdet, per-level prior log-probs), all in one pass; ``check_values``: the values of x
        and labels too (eval mode or initialisation only, see :func:`.checks.check_value_ranges`); ``priors``:
        a list that receives each level's prior (mean, logs)."""
        check_images(self, x)
        check_labels(self, labels, x.shape[0])
        if check_values:
            check_value_ranges(self, x, labels, always=self._initializing)
        h = x - 0.5
        logdet = torch.zeros(x.shape[0], device=x.device)
        latents, prior_terms = [], []
        for level, steps in enumerate(self.steps):
            h = squeeze(h)  # (B, C, H, W) -> (B, 4C, H/2, W/2)
            if self._inverts():  # memory_saving="invert": only the level's output is kept for backward
                h, logdet = reversible_steps(steps, h, logdet, self._step_runner())
            else:
                for step in steps:
                    h, ld = self._step(step, h)
                    logdet = logdet + ld
            if level < self.levels - 1:
                kept = self.kept_channels[level]
                h, z = h[:, :kept], h[:, kept:]  # (B, 4C, ..) -> kept (B, 2C, ..), factored out (B, 2C, ..)
                mean, logs = self.split_priors[level](h)
            else:
                z = h
                mean, logs = self.top_prior(h.shape[0], h.device, labels)
            latents.append(z)
            if priors is not None:
                priors.append((mean, logs))
            prior_terms.append(gaussian_log_prob(z, mean, logs))
        return latents, logdet, prior_terms

    def encode(self, x: Tensor, labels: Tensor | None = None, standardize: bool = False) -> tuple[list[Tensor], Tensor]:
        """Images (B, C, H, W) in [0, 1] -> (one latent per level, log|det dlatents/dx| of shape (B,)).

        ``standardize``: return each level's latent standardized by its prior, eps = (z - mean) / exp(logs)
        (openai/glow's ``eps``; the split priors' mean and scale depend on the kept half, the top prior's on
        the label). Invert with ``decode(eps, labels, standardized=True)``. The log-determinant stays that of
        the raw latents.
        """
        priors: list[tuple[Tensor, Tensor]] = []
        latents, logdet, _ = self._encode(x, labels, check_values=True, priors=priors if standardize else None)
        if standardize:
            latents = [(z - mean) * torch.exp(-logs) for z, (mean, logs) in zip(latents, priors)]
        return latents, logdet

    def log_prob_terms(self, x: Tensor, labels: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Per-level prior log-probs (finest level first) and the log-determinant, each (B,), in nats.

        In eval mode, ``x`` is checked to be finite and in [0, 1] (and labels in range) first.
        """
        _, logdet, prior_terms = self._encode(x, labels, check_values=True)
        return prior_terms, logdet

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x) in nats per image, shape (B,): no noise added, no discretization term.

        bits/dim = -log_prob(x) / (D ln 2) + n_bits, with D = C * H * W (see :meth:`bits_per_dim`).
        """
        prior_terms, logdet = self.log_prob_terms(x, labels)
        return torch.stack(prior_terms).sum(0) + logdet

    def log_prob_terms_and_logits(
        self, x: Tensor, labels: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """In one pass: :meth:`log_prob_terms` and the top-latent classifier's logits (B, num_classes),
        ``None`` for an unconditional model."""
        latents, logdet, prior_terms = self._encode(x, labels)
        logits = self.classifier(latents[-1]) if self.classifier is not None else None
        return prior_terms, logdet, logits

    def bits_per_dim(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-image bits/dim of the dequantized images x, shape (B,)."""
        return -self.log_prob(x, labels) / (self.dims * math.log(2)) + self.n_bits

    # ----------------------------------------------------------------- decode
    def _decode(self, top: Tensor, latent_for_level, temperature: float = 1.0) -> Tensor:
        h = top
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                z = latent_for_level(level, h)
                h = torch.cat([h, z], dim=1)  # kept (B, 2C, ..) + factored out (B, 2C, ..) -> (B, 4C, ..)
            for step in reversed(self.steps[level]):
                h, _ = step.inverse(h)
            h = unsqueeze(h)  # (B, 4C, H/2, W/2) -> (B, C, H, W)
        return h + 0.5

    def decode(
        self,
        latents: Sequence[Tensor],
        labels: Tensor | None = None,
        standardized: bool = False,
        top_prior: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The exact inverse of :meth:`encode`: one latent per level -> images (B, C, H, W).

        ``standardized``: the latents are :meth:`encode`'s ``standardize=True`` eps; each level's
        z = mean + exp(logs) * eps is rebuilt top-down, since each split prior depends on the levels above.
        The top prior is that of ``labels`` or, if given, ``top_prior`` = (mean, logs), each (B, C, H, W).
        """
        check_latents(self, latents)
        if not standardized:
            return self._decode(latents[-1], lambda level, h: latents[level])
        if top_prior is None:
            check_labels(self, labels, latents[-1].shape[0])
            top_prior = self.top_prior(latents[-1].shape[0], latents[-1].device, labels)
        mean, logs = top_prior
        top = mean + torch.exp(logs) * latents[-1]

        def rebuild(level: int, h: Tensor) -> Tensor:
            mean, logs = self.split_priors[level](h)
            return mean + torch.exp(logs) * latents[level]

        return self._decode(top, rebuild)

    # ------------------------------------------------------ attribute manipulation
    @torch.no_grad()
    def attribute_direction(
        self,
        x_with: Tensor,
        x_without: Tensor,
        labels_with: Tensor | None = None,
        labels_without: Tensor | None = None,
        batch_size: int = 256,
        progress=None,
    ) -> list[Tensor]:
        """Mean standardized latent of images with an attribute minus that of images without, one (C, H, W)
        tensor per level (Kingma & Dhariwal, 2018, section 5 / figure 5; openai/glow ``demo/get_manipulators.py``).

        Images in [0, 1] are encoded noise-free at their bin centres, in batches of ``batch_size``;
        ``progress`` optionally wraps the iterable of batches (e.g. ``tqdm``).
        """
        if len(x_with) < 1 or len(x_without) < 1:
            raise ValueError(f"attribute_direction needs images on both sides, got {len(x_with)} and {len(x_without)}")
        jobs = [(0, x_with, labels_with), (1, x_without, labels_without)]
        batches = [
            (side, x[i : i + batch_size], None if y is None else y[i : i + batch_size])
            for side, x, y in jobs
            for i in range(0, len(x), batch_size)
        ]
        sums = [
            [torch.zeros(shape, dtype=torch.float64, device=self.device) for shape in self.latent_shapes] for _ in jobs
        ]
        for side, x, y in progress(batches) if progress is not None else batches:
            eps, _ = self.encode(self._bin_centres(x.to(self.device)), y if y is None else y.to(self.device), True)
            for total, e in zip(sums[side], eps):
                total += e.double().sum(0)
        return [(a / len(x_with) - b / len(x_without)).float() for a, b in zip(*sums)]

    @torch.no_grad()
    def manipulate(
        self, x: Tensor, direction: Sequence[Tensor], strengths: Sequence[float], labels: Tensor | None = None
    ) -> Tensor:
        """Decode eps(x) + s * direction for each strength s: (N, C, H, W) -> (N * S, C, H, W), image-major
        (row n of a grid with S columns holds image n's edits), quantized like :meth:`sample`.

        Images are encoded noise-free at their bin centres, so strength 0 is the exact reconstruction.
        """
        check_latents(self, [d[None] for d in direction])
        x = x.to(self.device)
        s = torch.as_tensor(list(strengths), dtype=torch.float32, device=x.device)
        if s.dim() != 1 or len(s) < 1 or not torch.isfinite(s).all():
            raise ValueError(f"strengths must be a non-empty list of finite numbers, got {list(strengths)!r}")
        eps, _ = self.encode(self._bin_centres(x), None if labels is None else labels.to(self.device), True)
        edited = [  # (N, C, H, W) -> (N, S, C, H, W) -> (N * S, C, H, W)
            (e[:, None] + s.view(1, -1, 1, 1, 1) * d.to(e)[None, None]).flatten(0, 1) for e, d in zip(eps, direction)
        ]
        labels = None if labels is None else labels.to(self.device).repeat_interleave(len(s))
        images = self.decode(edited, labels, standardized=True)
        return bins_to_unit(unit_to_bins(images, self.n_bits), self.n_bits)

    def _bin_centres(self, x: Tensor) -> Tensor:
        """Images in [0, 1] -> the centres of their n_bits bins, (k + 0.5) / 2**n_bits."""
        return bins_to_unit(unit_to_bins(x, self.n_bits), self.n_bits, offset=0.5)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        temperature: float = 0.7,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw images (num_samples, C, H, W) in [0, 1], quantized to n_bits (bin value k / 2**n_bits).

        ``temperature`` scales every prior's standard deviation (paper section 5, figure 8);
        0 decodes the prior means.
        """
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if temperature == math.inf:
            raise ValueError(f"temperature must be finite, got {temperature!r}")
        if self.num_classes and labels is None:
            raise ValueError("this Glow is class-conditional (num_classes > 0): pass `labels`")
        if labels is not None and self.num_classes:
            labels = labels.to(self.device)
            if labels.shape != (num_samples,):
                raise ValueError(f"labels must have shape ({num_samples},), got {tuple(labels.shape)}")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        mean, logs = self.top_prior(num_samples, self.device, labels)
        top = gaussian_sample(mean, logs, temperature, generator)

        def draw(level: int, h: Tensor) -> Tensor:
            return gaussian_sample(*self.split_priors[level](h), temperature, generator)

        x = self._decode(top, draw)
        return bins_to_unit(unit_to_bins(x, self.n_bits), self.n_bits)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------- checkpoint
    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> Glow:
        """Load the pure flow, with its weights, from a ``glow fit`` (Lightning) checkpoint.

        Uses ``torch.load(weights_only=True)``: no code in the file is run. Works without Lightning.
        """
        ckpt = read_checkpoint(path, map_location)
        problem = describe_checkpoint_problem(ckpt, path)
        if problem:
            raise CheckpointFileError(problem)
        hparams = ckpt["hyper_parameters"]
        flow = cls(**checkpoint_arch(hparams))
        state = {k[len("flow.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("flow.")}
        try:
            flow.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointFileError(
                f"{path}: its weights do not fit its hyperparameters ({first_line(err)})"
            ) from err
        return flow.eval()
