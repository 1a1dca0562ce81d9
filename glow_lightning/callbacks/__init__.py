"""Lightning callbacks of glow-lightning, one file each.

- :mod:`.images`: ``SampleImages``, ``ReconstructionImages``, ``InterpolationImages`` (grids -> loggers + PNGs)
- :mod:`.checkpoint`: ``GlowCheckpoint`` (fixed directory, ``last.ckpt`` + best by ``val/bpd``, no clobbering)
- :mod:`.fid`: ``FIDMonitor`` (``val/fid`` of a few samples every k epochs; off by default)
- :mod:`.ema`: ``GlowEMA`` (exponential moving average of the weights) and ``averaged_weights``
- :mod:`.invertibility`: ``InvertibilityMonitor`` (``val/recon_error``)
- :mod:`.nonfinite`: ``NonFiniteGuard`` (skips non-finite updates; added by ``GlowModule.configure_callbacks``)
- :mod:`.progress`: ``GlowProgressBar`` (``train/bpd`` on the bar without a host sync per batch)
- :mod:`.predictions`: ``LikelihoodWriter`` (``glow predict`` -> per-image CSV)
"""

from .checkpoint import GlowCheckpoint
from .ema import GlowEMA, averaged_weights
from .fid import FIDMonitor
from .images import InterpolationImages, ReconstructionImages, SampleImages, log_image_grid
from .invertibility import InvertibilityMonitor
from .nonfinite import NonFiniteGuard, NonFiniteTrainingError
from .predictions import LikelihoodWriter
from .progress import GlowProgressBar

__all__ = [
    "FIDMonitor",
    "GlowCheckpoint",
    "GlowEMA",
    "GlowProgressBar",
    "InterpolationImages",
    "InvertibilityMonitor",
    "LikelihoodWriter",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "ReconstructionImages",
    "SampleImages",
    "averaged_weights",
    "log_image_grid",
]
