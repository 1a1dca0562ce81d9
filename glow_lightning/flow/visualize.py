"""What a trained Glow has learned, as images: reconstructions, latent interpolations, image grids.

Pure PyTorch (plus ``torchvision.utils.make_grid``, and PIL's default font for the header rows), no Lightning. Kingma & Dhariwal (2018):
section 5 / figure 8 (samples at temperature T), figure 5 (linear interpolation in latent space
between two real images). Spherical interpolation (slerp) follows White (2016), "Sampling
Generative Networks", which argues it stays closer to the prior's typical set than a straight line.

Real images are encoded noise-free at their bin centres, ``(k + 0.5) / 2**n_bits``, so the float
error of decode(encode(x)) cannot cross a bin edge and reconstructions equal their inputs exactly
after quantization (DESIGN.md, "The flow's contract").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .glow import Glow
from .quantize import bins_to_unit, unit_to_bins, unit_to_image

Interpolation = Literal["linear", "spherical"]


def quantize(x: Tensor, n_bits: int) -> Tensor:
    """Flow floats -> the lower edge of their bin, ``k / 2**n_bits`` (what ``Glow.sample`` returns)."""
    return bins_to_unit(unit_to_bins(x, n_bits), n_bits)


@torch.no_grad()
def encode_bins(flow: Glow, bins: Tensor, labels: Tensor | None = None, standardize: bool = False) -> list[Tensor]:
    """Integer bins (B, C, H, W) -> one latent per level, encoding the noise-free bin centres
    (``standardize``: each standardized by its prior, see :meth:`Glow.encode`)."""
    latents, _ = flow.encode(bins_to_unit(bins, flow.n_bits, offset=0.5), labels, standardize)
    return latents


@torch.no_grad()
def reconstruct(flow: Glow, bins: Tensor, labels: Tensor | None = None) -> Tensor:
    """decode(encode(bin centres)), quantized: (B, C, H, W) bins -> images in [0, 1] (``k / 2**n_bits``)."""
    return quantize(flow.decode(encode_bins(flow, bins, labels)), flow.n_bits)


def lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Straight line between (B, ...) latents a and b at (S,) weights t -> (B, S, ...); t=0 is a, t=1 is b."""
    t = t.view(1, -1, *([1] * (a.dim() - 1)))  # (1, S, 1, ..)
    return (1 - t) * a[:, None] + t * b[:, None]


def slerp(a: Tensor, b: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """Great-circle interpolation between (B, ...) latents, each flattened to a vector -> (B, S, ...).

    The endpoints are exactly a and b; nearly parallel pairs fall back to :func:`lerp`.
    """
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()  # (B, N)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(eps)
    omega = torch.acos(cos.clamp(-1, 1))[:, None]  # (B, 1)
    tt = t.double()[None, :]  # (1, S)
    sin = torch.sin(omega)
    wa = torch.where(sin > eps, torch.sin((1 - tt) * omega) / sin, 1 - tt)  # (B, S)
    wb = torch.where(sin > eps, torch.sin(tt * omega) / sin, tt)
    wa = torch.where(tt == 0, 1.0, torch.where(tt == 1, 0.0, wa))  # exact endpoints
    wb = torch.where(tt == 0, 0.0, torch.where(tt == 1, 1.0, wb))
    shape = (*wa.shape, *([1] * (a.dim() - 1)))
    out = wa.view(shape) * a.double()[:, None] + wb.view(shape) * b.double()[:, None]
    return out.to(a.dtype)


def interpolate_latents(
    latents_a: list[Tensor], latents_b: list[Tensor], steps: int, method: Interpolation = "linear"
) -> list[Tensor]:
    """Interpolate every level's latents from a to b in ``steps`` points, both endpoints included.

    Each level (P, C, H, W) -> (P * steps, C, H, W), pair-major: row p of a grid with ``steps``
    columns runs from pair p's first image to its second.
    """
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (both endpoints are included), got {steps!r}")
    if method not in ("linear", "spherical"):
        raise ValueError(f"method must be 'linear' or 'spherical', got {method!r}")
    fn = lerp if method == "linear" else slerp
    out = []
    for a, b in zip(latents_a, latents_b):
        t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)
        out.append(fn(a, b, t).flatten(0, 1))  # (P, S, C, H, W) -> (P * S, C, H, W)
    return out


@torch.no_grad()
def interpolate(
    flow: Glow,
    bins_a: Tensor,
    bins_b: Tensor,
    steps: int = 8,
    method: Interpolation = "linear",
    labels_a: Tensor | None = None,
    labels_b: Tensor | None = None,
) -> Tensor:
    """Decode ``steps`` points between the latents of P pairs of images -> (P * steps, C, H, W), pair-major.

    The paths run between standardized latents (:meth:`Glow.encode` with ``standardize=True``), where every
    level is on the scale of a standard normal, as slerp assumes (White, 2016; openai/glow's demo edits eps
    too); raw latents' scales differ between levels and images. The top prior's mean and log-scale follow
    a straight line from image a's label to image b's. The first and last image of each row are the
    reconstructions of the pair's two images.
    """
    eps_a = encode_bins(flow, bins_a, labels_a, standardize=True)
    eps_b = encode_bins(flow, bins_b, labels_b, standardize=True)
    path = interpolate_latents(eps_a, eps_b, steps, method)
    t = torch.linspace(0, 1, steps, device=eps_a[-1].device)
    (mean_a, logs_a), (mean_b, logs_b) = (flow.top_prior(len(bins_a), t.device, y) for y in (labels_a, labels_b))
    top_prior = (lerp(mean_a, mean_b, t).flatten(0, 1), lerp(logs_a, logs_b, t).flatten(0, 1))
    return quantize(flow.decode(path, standardized=True, top_prior=top_prior), flow.n_bits)


def image_grid(images: Tensor, n_bits: int, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Flow images (N, C, H, W) -> one (3, H', W') display grid in [0, 1], ``nrow`` images per row.

    H' = rows * (H + padding) + padding, W' = min(nrow, N) * (W + padding) + padding.
    """
    from torchvision.utils import make_grid

    images = unit_to_image(images, n_bits).cpu()
    if images.shape[1] == 1:  # grayscale shown as RGB
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:  # make_grid returns a lone image unpadded
        return F.pad(images[0], (padding,) * 4, value=pad_value)
    return make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)


def side_by_side(targets: Tensor, reconstructions: Tensor) -> Tensor:
    """Interleave (N, ...) targets and reconstructions: (2N, ...) as target 0, reconstruction 0, target 1, ..."""
    return torch.stack([targets, reconstructions], dim=1).flatten(0, 1)


def reconstruction_grid(flow: Glow, bins: Tensor, labels: Tensor | None = None, pairs_per_row: int = 4) -> Tensor:
    """Targets beside their reconstructions as one display grid: ``pairs_per_row`` (target, reconstruction)
    pairs per row. ``bins``: (N, C, H, W) integer bins of real images."""
    targets = bins_to_unit(bins, flow.n_bits)
    recon = reconstruct(flow, bins, labels)
    return image_grid(side_by_side(targets, recon), flow.n_bits, 2 * pairs_per_row)


def interpolation_grid(
    flow: Glow,
    bins: Tensor,
    steps: int = 8,
    method: Interpolation = "linear",
    labels: Tensor | None = None,
) -> Tensor:
    """One grid row per pair of images: image i of the 2P images ``bins`` is paired with image P + i, and each
    row holds ``steps`` images decoded along the path between their latents (endpoints: the reconstructions)."""
    pairs = bins.shape[0] // 2
    if pairs < 1:
        raise ValueError(f"interpolation needs at least 2 images, got {bins.shape[0]}")
    a, b = slice(0, pairs), slice(pairs, 2 * pairs)
    labels_a, labels_b = (labels[a], labels[b]) if labels is not None else (None, None)
    images = interpolate(flow, bins[a], bins[b], steps, method, labels_a, labels_b)
    return image_grid(images, flow.n_bits, steps)


def upscale(grid: Tensor, scale: int) -> Tensor:
    """(C, H, W) -> (C, scale * H, scale * W), nearest neighbour: each pixel becomes a scale x scale block, so the
    pixels stay exact (no smoothing between the images' pixels)."""
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2) if scale > 1 else grid


HEADER_HEIGHT = 14  # pixels: one line of PIL's default font


def with_header(grid: Tensor, text: str, height: int = HEADER_HEIGHT) -> Tensor:
    """A (3, H, W) grid with a white band of ``height`` pixels on top holding ``text`` in black (PIL's default
    font); a grid narrower than the text is padded with white on the right."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor

    width = max(grid.shape[2], int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text)) + 4)
    band = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(band).text((2, 1), text, fill="black")
    grid = F.pad(grid.cpu(), (0, width - grid.shape[2]), value=1.0)
    return torch.cat([pil_to_tensor(band).float() / 255, grid], dim=1)


def labelled(grid: Tensor, header: str | None = None, scale: int = 1) -> Tensor:
    """A display grid as written to PNG files: with a header row saying what it shows (``T=0.7``,
    ``target | reconstruction``, ...) when ``header`` is given, all upscaled ``scale`` times (the header's text
    too, so it stays in proportion)."""
    return upscale(with_header(grid, header) if header else grid, scale)
