"""glow-lightning: Glow (Kingma & Dhariwal, 2018) as a PyTorch Lightning project.

``from glow_lightning import Glow`` gives the pure-PyTorch flow; the Lightning parts
(``GlowModule``, datamodules, CLI) live in submodules and are imported on demand.
"""

from importlib.metadata import PackageNotFoundError, version

from .flow import Glow

try:
    __version__ = version("glow-lightning")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Glow", "__version__"]
