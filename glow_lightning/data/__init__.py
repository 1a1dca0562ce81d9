"""LightningDataModules: quantization, dequantization and augmentation live here."""

from .base import GlowDataModule
from .celeba import CelebADataModule
from .cifar import CIFAR10DataModule
from .folder import ImageFolderDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .svhn import SVHNDataModule

__all__ = [
    "CIFAR10DataModule", "CelebADataModule", "FashionMNISTDataModule", "GlowDataModule", "ImageFolderDataModule",
    "MNISTDataModule", "SVHNDataModule",
]  # fmt: skip
