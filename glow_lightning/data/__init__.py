"""LightningDataModules: quantization, dequantization and augmentation live here."""

from .base import GlowDataModule
from .celeba import CelebADataModule
from .celebahq import CelebAHQDataModule
from .cifar import CIFAR10DataModule
from .folder import ImageFolderDataModule
from .imagenet import ImageNetDataModule
from .lsun import LSUNDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .streaming import StreamingDataModule
from .svhn import SVHNDataModule

__all__ = [
    "CIFAR10DataModule", "CelebADataModule", "CelebAHQDataModule", "FashionMNISTDataModule", "GlowDataModule",
    "ImageFolderDataModule", "ImageNetDataModule", "LSUNDataModule", "MNISTDataModule", "SVHNDataModule",
    "StreamingDataModule",
]  # fmt: skip
