"""MNIST, Fashion-MNIST, SVHN, CelebA and image-folder datamodules, each on a fixture in its real format."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from glow_lightning.cli import main
from glow_lightning.data import (
    CelebADataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

from .conftest import config
from .fixtures import write_celeba, write_image_folder, write_mnist, write_svhn

FAST = dict(download=False, batch_size=4, num_workers=0)


def sizes(dm) -> list[int]:
    dm.setup()
    return [len(dm.splits[s]) for s in ("train", "val", "test")]


def check_prepared(dm, split: str, channels: int, size: int) -> None:
    """A prepared batch has the model's shape, lies in [0, 1) and keeps the raw pixels' bins."""
    raw = next(iter(dm._loader(split)))
    batch = dm.prepare_batch(raw, train=False)
    assert batch["x"].shape == (len(raw["index"]), channels, size, size)
    assert (batch["x"] >= 0).all() and (batch["x"] < 1).all()
    assert torch.equal(batch["bins"], raw["pixels"].long() >> (8 - dm.n_bits))


@pytest.mark.parametrize(
    ("cls", "name", "gz"), [(MNISTDataModule, "MNIST", False), (FashionMNISTDataModule, "FashionMNIST", True)]
)
def test_mnist_reads_idx_files_and_pads_to_32(tmp_path, cls, name, gz):
    root = write_mnist(str(tmp_path), name, train_size=30, test_size=10, gz=gz)
    dm = cls(data_dir=root, val_size=5, **FAST)
    assert sizes(dm) == [25, 5, 10]
    assert (dm.num_channels, dm.image_size, dm.dataset_classes, dm.num_classes, dm.flip) == (1, 32, 10, 0, False)
    test = dm.splits["test"]
    image = test[3]["pixels"]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert image[:, 2:30, 2:30].min() >= 1  # the fixture's pixels are 1..255: the digit sits in the middle
    assert image[:, :2].sum() == image[:, 30:].sum() == image[:, :, :2].sum() == image[:, :, 30:].sum() == 0
    assert [int(test[i]["label"]) for i in range(10)] == list(range(10))
    check_prepared(dm, "train", 1, 32)


def test_mnist_padding_is_configurable(tmp_path):
    root = write_mnist(str(tmp_path))
    dm = MNISTDataModule(data_dir=root, image_size=28, val_size=5, **FAST)
    dm.setup("fit")
    assert dm.splits["train"][0]["pixels"].shape == (1, 28, 28)
    with pytest.raises(ValueError, match="image_size.*27"):
        MNISTDataModule(image_size=27)


def test_svhn_reads_mat_files(tmp_path):
    from scipy.io import loadmat

    root = write_svhn(str(tmp_path), train_size=30, test_size=10)
    dm = SVHNDataModule(data_dir=root, val_size=5, **FAST)
    assert sizes(dm) == [25, 5, 10]
    test = dm.splits["test"]
    x = loadmat(os.path.join(root, "test_32x32.mat"))["X"]
    assert torch.equal(test[4]["pixels"], torch.from_numpy(x[:, :, :, 4].transpose(2, 0, 1).copy()))
    assert [int(test[i]["label"]) for i in range(10)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # stored 10 -> 0
    check_prepared(dm, "val", 3, 32)


def test_celeba_uses_its_partition_file_and_crops_to_64(tmp_path):
    root = write_celeba(str(tmp_path), partition=(12, 4, 5))
    dm = CelebADataModule(data_dir=root, val_size=10_000, **FAST)  # val_size is ignored: CelebA has a val split
    assert sizes(dm) == [12, 4, 5]
    assert (dm.n_bits, dm.image_size, dm.num_classes) == (5, 64, 0)
    val = dm.splits["val"]
    assert os.path.basename(val.dataset.paths[0]) == "000013.jpg"  # the first image of partition 1
    assert val[0]["pixels"].shape == (3, 64, 64) and int(val[0]["label"]) == -1
    check_prepared(dm, "test", 3, 64)
    small = CelebADataModule(data_dir=root, image_size=32, crop_size=100, **FAST)
    small.setup("fit")
    assert small.splits["train"][0]["pixels"].shape == (3, 32, 32)


def test_celeba_attribute_gives_binary_labels(tmp_path):
    root = write_celeba(str(tmp_path))
    dm = CelebADataModule(data_dir=root, attribute="Smiling", class_conditional=True, **FAST)
    dm.setup("fit")
    assert dm.num_classes == 2
    assert [int(dm.splits["train"][i]["label"]) for i in range(6)] == [0, 1, 0, 1, 0, 1]  # even images smile
    with pytest.raises(ValueError, match="Wearing_Hat.*Male"):
        CelebADataModule(data_dir=root, attribute="Wearing_Hat", **FAST).setup("fit")
    with pytest.raises(ValueError, match="attribute"):
        CelebADataModule(data_dir=root, class_conditional=True, **FAST).num_classes  # noqa: B018


def test_image_folder_with_class_subfolders(tmp_path):
    root = write_image_folder(str(tmp_path / "pets"), classes=("cats", "dogs"), per_class=6)
    dm = ImageFolderDataModule(data_dir=root, class_conditional=True, **FAST)
    assert dm.classes == ["cats", "dogs"] and dm.num_classes == 2
    assert sizes(dm) == [9, 1, 2]  # 12 images: test ceil(10%) = 2, val ceil(5% of 10) = 1
    every = [p for s in ("train", "val", "test") for p in dm.splits[s].dataset.paths]
    assert len(set(every)) == 12 and not any(p.endswith(".txt") for p in every)
    assert {os.path.splitext(p)[1] for p in every} == {".png", ".jpg"}
    for item in dm.splits["train"]:
        path = dm.splits["train"].dataset.paths[item["index"]]
        assert item["label"] == ["cats", "dogs"].index(os.path.basename(os.path.dirname(path)))
        assert item["pixels"].shape == (3, 64, 64) and item["pixels"].dtype == torch.uint8
    check_prepared(dm, "train", 3, 64)


def test_image_folder_flat_grayscale_without_labels(tmp_path):
    root = write_image_folder(str(tmp_path / "flat"), classes=(), per_class=8)
    dm = ImageFolderDataModule(data_dir=root, channels=1, image_size=16, val_size=2, test_fraction=0.25, **FAST)
    assert sizes(dm) == [4, 2, 2]
    assert dm.classes == [] and dm.num_classes == 0
    assert {int(item["label"]) for item in dm.splits["train"]} == {-1}
    check_prepared(dm, "val", 1, 16)
    with pytest.raises(ValueError, match="class_conditional.*subfolder"):
        ImageFolderDataModule(data_dir=root, class_conditional=True).num_classes  # noqa: B018


def test_image_folder_resizes_the_shorter_side_and_centre_crops(tmp_path):
    from PIL import Image

    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # a white centre third: all that survives a centre crop to a square
    os.makedirs(tmp_path / "train")
    Image.fromarray(wide).save(tmp_path / "train" / "wide.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=8, val_size=0, **FAST)
    dm.setup("fit")
    pixels = dm.splits["train"][0]["pixels"]
    assert pixels.shape == (3, 8, 8) and pixels.min() >= 200  # no black: not squashed, not off-centre


def test_image_folder_with_train_val_test_folders(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        write_image_folder(str(tmp_path / split), classes=("a", "b"), per_class=n)
    dm = ImageFolderDataModule(data_dir=str(tmp_path), val_size=0.5, **FAST)
    assert sizes(dm) == [10, 4, 6]  # the folders as given, val_size unused
    assert [int(dm.splits["val"][i]["label"]) for i in range(4)] == [0, 0, 1, 1]
    write_image_folder(str(tmp_path / "val"), classes=("c",), per_class=1)
    with pytest.raises(ValueError, match=r"val has classes that .*train lacks: \['c'\]"):
        ImageFolderDataModule(data_dir=str(tmp_path), class_conditional=True, **FAST).setup("fit")


def test_unreadable_image_files_are_reported_with_their_paths(tmp_path):
    root = write_image_folder(str(tmp_path / "imgs"), classes=(), per_class=4)
    for name in ("broken.jpg", "empty.png"):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg" if name.endswith("jpg") else b"")
    with pytest.raises(RuntimeError, match=r"2 of 6 image files cannot be read:(.|\n)*broken\.jpg(.|\n)*empty\.png"):
        ImageFolderDataModule(data_dir=root, **FAST).setup("fit")
    dm = ImageFolderDataModule(data_dir=root, check_files=False, test_fraction=0.5, val_size=1, **FAST)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"cannot read image file .*(broken\.jpg|empty\.png)"):
        for split in ("train", "val", "test"):
            for item in dm.splits[split]:
                assert item["pixels"].shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (MNISTDataModule, {}, r"MNIST not found: .*nowhere/MNIST/raw/train-images-idx3-ubyte.*--data.download true"),
        (FashionMNISTDataModule, {}, r"FashionMNIST/raw/train-images-idx3-ubyte"),
        (SVHNDataModule, {}, r"SVHN not found: .*nowhere/train_32x32.mat"),
        (CelebADataModule, {}, r"CelebA not found: .*nowhere/celeba/img_align_celeba.*README"),
        (ImageFolderDataModule, {}, r"image folder not found: .*nowhere"),
    ],
)
def test_missing_data_names_the_path_and_how_to_get_it(tmp_path, cls, kwargs, expected):
    dm = cls(data_dir=str(tmp_path / "nowhere"), download=False, **kwargs)
    with pytest.raises(FileNotFoundError, match=expected):
        dm.setup("fit")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "svhn", "celeba64", "imagefolder"])
def test_every_dataset_config_stacks_with_debug(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config(f"{name}.yaml"), "--config", config("debug.yaml"), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "batch_size: 8" in out and "num_workers: 0" in out and "hidden_channels: 16" in out


@pytest.mark.slow
def test_glow_fit_on_an_image_folder_end_to_end(tmp_path):
    root = write_image_folder(str(tmp_path / "photos"), classes=(), per_class=14)
    run = str(tmp_path / "run")
    cli = main(
        ["fit", "--config", config("imagefolder.yaml"), "--config", config("debug.yaml"), "--data.data_dir", root,
         "--trainer.default_root_dir", run, "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert cli.model.hparams.num_classes == 0 and cli.model.hparams.image_size == 64
    assert cli.trainer.global_step == 2  # 11 training images, batch 8, drop_last: 1 step per epoch, 2 epochs
    assert finite_bpd(cli.trainer.callback_metrics["val/bpd"])
    assert os.path.isfile(os.path.join(run, "checkpoints", "last.ckpt"))


def finite_bpd(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value)) and 0 < float(value) < 100
