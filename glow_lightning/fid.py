"""FID and KID of a Glow's samples against a split of real images, with torchmetrics.

- FID: Heusel et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium": the Fréchet distance between Gaussians fitted to Inception-v3 pool3 features (2048-d).
- KID: Bińkowski et al. (2018), "Demystifying MMD GANs": the squared MMD of those features under a cubic
  polynomial kernel, averaged over random subsets (mean and standard deviation).

Both are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``); nothing here computes a
distance. The default feature extractor is torchmetrics' ``NoTrainInceptionV3`` on torch-fidelity's
Inception weights (``pip install 'glow-lightning[fid]'``), converted from TensorFlow's 2015-12-05 Inception
graph that the original FID code uses, and resized to 299x299 as TensorFlow 1 did (``antialias=False``).
Any ``nn.Module`` mapping uint8 (B, 3, H, W) images to (B, d) features works instead (no torch-fidelity
needed then).

Each image passes through the extractor once: its features go to both metrics through :class:`Features`,
a pass-through ``feature`` module. The real split's features are cached on disk (:func:`real_features`),
keyed by the dataset, the split, the quantization and the extractor (its class and a hash of its weights).

Images reach the extractor as the samples are quantized: uint8 pixels ``k * 2**(8 - n_bits)``
(:func:`glow_lightning.flow.quantize.unit_to_pixels`); real images are quantized to the same ``n_bits``, so a
5-bit model is compared with 5-bit data. Grayscale is repeated to 3 channels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .flow.quantize import pixels_to_bins, unit_to_pixels
from .io import atomic_write

INCEPTION_FEATURES = (64, 192, 768, 2048)  # torch-fidelity's Inception-v3 layers; 2048 = pool3, the standard
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
PAPER_SAMPLES = 50_000  # FID-50k: the N that published FIDs use
CACHE_VERSION = 1  # bump when what is cached changes

Progress = Callable[[Iterable], Iterable]


class FeatureExtractorError(ValueError):
    """The feature extractor cannot be built: torch-fidelity missing, weights not found or not downloadable."""


class Features(nn.Module):
    """The metrics' ``feature`` module: passes features computed once by the extractor through unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of a trial forward pass

    def forward(self, features: Tensor) -> Tensor:
        return features


def inception(feature: int = 2048, weights_path: str | None = None) -> nn.Module:
    """Torchmetrics' Inception-v3 (torch-fidelity's weights) returning layer ``feature``'s features.

    ``weights_path``: a local copy of the weights (offline); None downloads them once into torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``). Raises :class:`FeatureExtractorError` naming the option when they cannot
    be found, read or downloaded.
    """
    if feature not in INCEPTION_FEATURES:
        raise FeatureExtractorError(f"--feature {feature}: Inception-v3 features are one of {INCEPTION_FEATURES}")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception is torch-fidelity's)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise FeatureExtractorError(
            f"the Inception feature extractor needs torch-fidelity: pip install 'glow-lightning[fid]' ({err})"
        ) from err
    if weights_path is not None:
        check_weights_file(weights_path)
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=weights_path,
            antialias=False,
        )
    except Exception as err:  # noqa: BLE001  (urllib / OSError / RuntimeError: all mean "no weights")
        if weights_path is not None:
            raise FeatureExtractorError(f"--feature_weights {weights_path}: not Inception-v3 weights ({err})") from err
        raise FeatureExtractorError(
            f"--feature_weights: the Inception weights could not be downloaded from {INCEPTION_URL} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download that file where "
            "there is a network and pass --feature_weights PATH"
        ) from err


def check_weights_file(path: str) -> None:
    """A readable state dict of tensors at ``path``, or :class:`FeatureExtractorError` naming it.

    torch-fidelity loads the file with ``weights_only=False``; this refuses one that would run code first.
    """
    if not os.path.isfile(path):
        raise FeatureExtractorError(f"--feature_weights {path}: no such file (Inception weights: {INCEPTION_URL})")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FeatureExtractorError(f"--feature_weights {path}: not a weights file ({first})") from err


def import_module_class(path: str) -> nn.Module:
    """``package.module.Class`` -> an instance of that ``nn.Module`` subclass, built without arguments."""
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise FeatureExtractorError(f"--feature {path}: cannot import it ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FeatureExtractorError(
            f"--feature {path}: not one of {INCEPTION_FEATURES} or the import path of an nn.Module class"
        )
    return cls()


def feature_extractor(feature: int | str | nn.Module = 2048, weights_path: str | None = None) -> nn.Module:
    """``feature``: an Inception-v3 layer (:func:`inception`), a module of one's own or its import path
    (:func:`import_module_class`); returned in eval mode, frozen."""
    if isinstance(feature, str):
        feature = int(feature) if feature.isdigit() else import_module_class(feature)
    if isinstance(feature, nn.Module):
        if weights_path is not None:
            raise FeatureExtractorError("--feature_weights applies to the Inception extractor, not to a module")
        module = feature
    elif isinstance(feature, int) and not isinstance(feature, bool):
        module = inception(feature, weights_path)
    else:
        raise FeatureExtractorError(f"--feature must be one of {INCEPTION_FEATURES} or an nn.Module, got {feature!r}")
    return module.eval().requires_grad_(False)


def extractor_id(module: nn.Module) -> str:
    """The extractor's identity in the cache key: its class and a hash of its parameters and buffers."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    resize = getattr(module, "use_antialias", None)
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}:{digest.hexdigest()[:16]}" + (
        f":antialias={resize}" if resize is not None else ""
    )


def to_extractor_input(pixels: Tensor) -> Tensor:
    """uint8 (B, C, H, W) with C in (1, 3) -> uint8 (B, 3, H, W); grayscale repeated to 3 channels."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (B, 1 or 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def features_of(extractor: nn.Module, pixels: Tensor) -> Tensor:
    """(B, d) float32 features of uint8 (B, C, H, W) images, on the CPU."""
    out = extractor(to_extractor_input(pixels))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(out.shape[0], -1).float().cpu()


@torch.no_grad()
def sample_features(
    flow,
    extractor: nn.Module,
    num_samples: int,
    *,
    temperature: float = 1.0,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Features (num_samples, d) of ``num_samples`` samples drawn at ``temperature`` in batches.

    A class-conditional flow's labels are drawn uniformly over its classes (from ``generator``, like the noise).
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"--num_samples must be an integer >= 2 (FID needs a covariance), got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be an integer >= 1, got {batch_size!r}")
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    out = []
    for size in progress(sizes) if progress else sizes:
        labels = None
        if flow.num_classes:
            labels = torch.randint(flow.num_classes, (size,), generator=generator, device=flow.device)
        images = flow.sample(size, temperature=temperature, labels=labels, generator=generator)
        out.append(features_of(extractor, unit_to_pixels(images, flow.n_bits)))
    return torch.cat(out)


def split_key(datamodule, split: str, n_bits: int, extractor: nn.Module) -> dict:
    """What the real features of ``split`` depend on: dataset, its folder, the split's images, n_bits, extractor."""
    dataset = datamodule.split(split)
    first = dataset[0]["pixels"] if len(dataset) else torch.zeros(0)
    last = dataset[len(dataset) - 1]["pixels"] if len(dataset) else torch.zeros(0)
    fingerprint = hashlib.sha1(first.numpy().tobytes() + last.numpy().tobytes()).hexdigest()[:16]
    folder = getattr(datamodule, "data_dir", None) or getattr(datamodule, "input_dir", None)
    return {
        "version": CACHE_VERSION,
        "dataset": type(datamodule).__name__,
        "data_dir": os.path.abspath(folder) if folder and "://" not in str(folder) else folder,
        "split": split,
        "images": len(dataset),
        "image_shape": list(getattr(datamodule, "image_shape", ())),
        "val_size": getattr(datamodule, "val_size", None),
        "seed": getattr(datamodule, "seed", None),
        "n_bits": n_bits,
        "first_and_last_image": fingerprint,
        "extractor": extractor_id(extractor),
    }


def cache_file(cache_dir: str, key: dict) -> str:
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"fid-{key['dataset']}-{key['split']}-{name}.pt")


@torch.no_grad()
def real_features(
    datamodule,
    split: str,
    extractor: nn.Module,
    n_bits: int,
    *,
    cache_dir: str | None,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[Tensor, str | None, bool]:
    """Features (N, d) of every image of the datamodule's ``split``, quantized to ``n_bits``.

    Read from ``<cache_dir>/fid-<dataset>-<split>-<hash>.pt`` when a file with the same key is there (see
    :func:`split_key`), else computed and written there (``cache_dir=None``: no cache).
    Returns (features, the cache file or None, whether it was read from the cache).
    """
    from torch.utils.data import DataLoader

    from .data.base import collate

    if len(datamodule.split(split)) < 2:
        raise ValueError(
            f"--split {split}: FID needs at least 2 real images, the split has {len(datamodule.split(split))}"
        )
    key = split_key(datamodule, split, n_bits, extractor)
    path = cache_file(cache_dir, key) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached["features"], path, True
        except Exception:  # noqa: BLE001  (an unreadable cache is computed again and replaced)
            pass
    loader = DataLoader(
        datamodule.split(split),
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=getattr(datamodule, "num_workers", 0),
    )
    out = []
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: the samples after are the same, cached or not
        for batch in progress(loader) if progress else loader:
            pixels = pixels_to_bins(batch["pixels"], n_bits).to(torch.uint8) << (8 - n_bits)  # as the samples are
            out.append(features_of(extractor, pixels.to(device)))
    features = torch.cat(out)
    if path:
        buffer = io.BytesIO()
        torch.save({"key": key, "features": features}, buffer)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write(path, buffer.getbuffer())
        except OSError as err:
            warnings.warn(f"the real features could not be cached in {path} ({err})", stacklevel=2)
            path = None
    return features, path, False


def fid_score(real: Tensor, fake: Tensor) -> float:
    """torchmetrics' FID between two feature sets (N, d), in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Features(real.shape[1])).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_score(
    real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over ``subsets`` random subsets of ``subset_size``) of two feature sets.

    ``subset_size`` must be <= both set sizes (torchmetrics' rule); the caller clamps it. The subsets are
    drawn from ``seed`` (the same features give the same KID; the global random state is left as it was).
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features": features are what we pass
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=Features(real.shape[1]), subsets=subsets, subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def small_n_note(num_samples: int, num_features: int) -> str | None:
    """One line on the bias of FID at this N, or None at N >= 50,000."""
    if num_samples >= PAPER_SAMPLES:
        return None
    note = (
        f"FID at N={num_samples} is biased upward (it falls as N grows): compare FIDs at the same N; "
        f"published FIDs use N={PAPER_SAMPLES:,}"
    )
    if num_samples < num_features:
        note += f"; with N < {num_features} features the sample covariance is singular"
    return note
