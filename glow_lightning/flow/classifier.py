"""The classifier on the top latent of a class-conditional Glow (Kingma & Dhariwal, 2018, section 5).

As in openai/glow's ``y_logits``: the top latent is averaged over its positions and a zero-initialised
linear map gives the class logits, so training starts at the uniform prediction (cross-entropy
ln(num_classes)). Its loss, weighted by ``y_weight``, is added to the bits/dim by ``GlowModule``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import float32


class TopClassifier(nn.Module):
    """p(y | z_top): (B, C, H, W) top latent -> mean over positions (B, C) -> logits (B, num_classes)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @float32
    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C) -> (B, num_classes)
