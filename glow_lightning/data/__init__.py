"""LightningDataModules: quantization, dequantization and augmentation live here."""

from .base import GlowDataModule
from .cifar import CIFAR10DataModule

__all__ = ["CIFAR10DataModule", "GlowDataModule"]
