"""Datasets already on disk: used as they are with ``download: true``; a failed checksum says so; every
error a datamodule's setup raises about the user's files is a DatasetError (one ``glow: error:`` line).

The real MNIST is used only where ``GLOW_REAL_DATA`` points at a folder holding ``mnist/MNIST/raw``
(``.ci/run`` sets it when ``../shared/data`` exists); elsewhere that test is skipped.
"""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from glow_lightning.data import CelebADataModule, CIFAR10DataModule, MNISTDataModule, SVHNDataModule
from glow_lightning.data.base import DatasetError, DownloadError

from .fixtures import write_celeba, write_cifar10, write_mnist, write_svhn

FAST = dict(batch_size=4, num_workers=0, val_size=2)


def refuse_downloads(monkeypatch, *names):
    """torchvision's dataset classes raise if called: a download that should not happen fails the test."""
    import torchvision.datasets

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download a dataset that is on disk")

    for name in names:
        monkeypatch.setattr(getattr(torchvision.datasets, name), "__init__", no_download)


@pytest.mark.parametrize(
    ("cls", "write", "names"),
    [
        (MNISTDataModule, lambda root: write_mnist(root, gz=True), ["MNIST"]),  # our gzip: not torchvision's MD5
        (CIFAR10DataModule, write_cifar10, ["CIFAR10"]),
        (SVHNDataModule, write_svhn, ["SVHN"]),
        (CelebADataModule, write_celeba, ["CelebA"]),
    ],
)
def test_files_on_disk_are_used_with_download_on(tmp_path, monkeypatch, cls, write, names):
    root = write(str(tmp_path))
    refuse_downloads(monkeypatch, *names)
    dm = cls(data_dir=root, download=True, **FAST)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) > 0 and len(dm.splits["test"]) > 0


def test_a_failed_checksum_says_so_and_how_to_read_the_files_anyway(tmp_path, monkeypatch):
    import torchvision.datasets

    root = write_mnist(str(tmp_path), gz=True)
    os.remove(os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte.gz"))  # incomplete: a download is tried

    def corrupted(*args, **kwargs):  # what torchvision raises when a downloaded file fails its MD5
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", corrupted)
    with pytest.raises(DownloadError) as err:
        MNISTDataModule(data_dir=root, download=True).prepare_data()
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "failed torchvision's MD5 checksum" in message
    assert "--data.download false" in message and "\n" not in message


def test_a_download_failure_without_files_on_disk_says_where_the_data_goes(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", offline)
    with pytest.raises(DownloadError, match=r"could not download MNIST .*OSError.*MNIST/raw.*--data.download false"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()


def corrupt(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def mnist_truncated(root):
    write_mnist(root, gz=True)
    path = os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte.gz")
    corrupt(path, open(path, "rb").read()[:200])
    return MNISTDataModule(data_dir=root, download=False, **FAST), "train-images-idx3-ubyte.gz"


def mnist_wrong_count(root):
    write_mnist(root)
    from .fixtures import write_idx

    write_idx(os.path.join(root, "MNIST", "raw", "train-labels-idx1-ubyte"), np.arange(7) % 10)
    return MNISTDataModule(data_dir=root, download=False, **FAST), "train-images-idx3-ubyte"


def mnist_not_gzip(root):
    write_mnist(root)
    os.remove(os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte"))
    corrupt(os.path.join(root, "MNIST", "raw", "t10k-images-idx3-ubyte.gz"), b"an html error page" * 10)
    return MNISTDataModule(data_dir=root, download=False, **FAST), "t10k-images-idx3-ubyte.gz"


def cifar_garbage(root):
    write_cifar10(root)
    corrupt(os.path.join(root, "cifar-10-batches-py", "data_batch_3"), b"not a pickle")
    return CIFAR10DataModule(data_dir=root, download=False, **FAST), "data_batch_3"


def cifar_wrong_object(root):
    write_cifar10(root)
    corrupt(os.path.join(root, "cifar-10-batches-py", "data_batch_2"), pickle.dumps([1, 2, 3]))
    return CIFAR10DataModule(data_dir=root, download=False, **FAST), "data_batch_2"


def cifar_missing_batch(root):
    write_cifar10(root)
    os.remove(os.path.join(root, "cifar-10-batches-py", "data_batch_5"))
    return CIFAR10DataModule(data_dir=root, download=False, **FAST), "data_batch_5"


def svhn_garbage(root):
    write_svhn(root)
    corrupt(os.path.join(root, "train_32x32.mat"), b"MATLAB 5.0 MAT-file, truncated")
    return SVHNDataModule(data_dir=root, download=False, **FAST), "train_32x32.mat"


def celeba_binary_partition(root):
    write_celeba(root)
    corrupt(os.path.join(root, "celeba", "list_eval_partition.txt"), gzip.compress(b"000001.jpg 0\n"))
    return CelebADataModule(data_dir=root, download=False, **FAST), "list_eval_partition.txt"


def celeba_short_attribute_line(root):
    write_celeba(root)
    path = os.path.join(root, "celeba", "list_attr_celeba.txt")
    lines = open(path).read().splitlines()
    corrupt(path, "\n".join([*lines[:3], "000002.jpg 1", *lines[4:]]).encode())
    return CelebADataModule(data_dir=root, attribute="Young", download=False, **FAST), "list_attr_celeba.txt, line 4"


def celeba_unknown_attribute(root):
    write_celeba(root)
    return CelebADataModule(data_dir=root, attribute="Wearing_Hat", download=False, **FAST), "Wearing_Hat"


def celeba_missing_image(root):
    write_celeba(root)
    os.remove(os.path.join(root, "celeba", "img_align_celeba", "000003.jpg"))
    return CelebADataModule(data_dir=root, download=False, **FAST), "000003.jpg"


@pytest.mark.parametrize(
    "make",
    [
        mnist_truncated, mnist_wrong_count, mnist_not_gzip, cifar_garbage, cifar_wrong_object, cifar_missing_batch,
        svhn_garbage, celeba_binary_partition, celeba_short_attribute_line, celeba_unknown_attribute,
        celeba_missing_image,
    ],
)  # fmt: skip
def test_bad_files_on_disk_are_dataset_errors_naming_the_file(tmp_path, make):
    dm, named = make(str(tmp_path))
    with pytest.raises(DatasetError) as err:
        dm.setup()
    assert named in str(err.value)
    assert not dm.on_disk()  # so download: true would fetch it again


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(os.environ.get("GLOW_REAL_DATA", "/nonexistent"), "mnist", "MNIST", "raw")),
    reason="GLOW_REAL_DATA does not point at a folder holding mnist/MNIST/raw",
)
def test_the_real_mnist_on_disk_is_used_as_it_is(monkeypatch):
    """The real MNIST's .gz files (other bytes than torchvision's archives) load with download: true."""
    refuse_downloads(monkeypatch, "MNIST")
    dm = MNISTDataModule(data_dir=os.path.join(os.environ["GLOW_REAL_DATA"], "mnist"), download=True, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]
    test = dm.splits["test"].dataset.tensors
    assert torch.bincount(test[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = dm.splits["train"].dataset.tensors[0][:, :, 2:30, 2:30].double().mean() / 255
    assert abs(float(mean) - 0.1307) < 1e-3  # the training images' well-known mean pixel
