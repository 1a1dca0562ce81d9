"""Pure-PyTorch Glow: layers, priors and the multi-scale flow. No Lightning import below here."""

from .classifier import TopClassifier
from .glow import Glow
from .layers import ActNorm, CouplingLayer, FlowStep, InvConv1x1, Permute, squeeze, unsqueeze
from .priors import SplitPrior, TopPrior

__all__ = [
    "ActNorm", "CouplingLayer", "FlowStep", "Glow", "InvConv1x1", "Permute", "SplitPrior", "TopClassifier", "TopPrior",
    "squeeze", "unsqueeze",
]  # fmt: skip
