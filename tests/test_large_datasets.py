"""ImageNet 32/64 (both versions), LSUN and CelebA-HQ datamodules, each on a fixture in its real format,
each reader checked against known pixels at documented positions (see tests/large_fixtures.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from glow_lightning.cli import main
from glow_lightning.data import CelebAHQDataModule, ImageNetDataModule, LSUNDataModule
from glow_lightning.data.base import DatasetError, DownloadError
from glow_lightning.data.lsun import crop_images

from .conftest import config
from .large_fixtures import (
    KNOWN_BLUE,
    KNOWN_GREEN,
    write_celebahq,
    write_imagenet_downsampled,
    write_imagenet_oord,
    write_lsun,
)

FAST = dict(batch_size=4, num_workers=0)


def check_known_pixels(pixels: torch.Tensor, red: int) -> None:
    assert pixels.dtype == torch.uint8
    assert (int(pixels[0, 0, 0]), int(pixels[1, 0, 0]), int(pixels[2, 1, 2])) == (red, KNOWN_GREEN, KNOWN_BLUE)


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_oord_reads_sorted_pngs_into_a_memory_map(tmp_path, size):
    root = write_imagenet_oord(str(tmp_path), size, train=24, valid=6)
    dm = ImageNetDataModule(data_dir=root, version="oord", image_size=size, val_size=4, **FAST)
    dm.prepare_data()
    assert os.path.isfile(os.path.join(root, f"train_{size}x{size}.npy"))
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [20, 4, 6]
    test = dm.splits["test"]
    for i in range(6):  # file 000000{i+1}.png is image i; red of its pixel (0, 0) is i
        check_known_pixels(test[i]["pixels"], red=i)
        assert test[i]["pixels"].shape == (3, size, size) and int(test[i]["label"]) == -1
    assert isinstance(test.dataset._arrays()[0], np.memmap)  # mapped, not loaded
    # the batched fetch (one fancy index of the map per batch) gives what per-image reads give
    batch = next(iter(dm._loader("train")))
    per_image = torch.stack([dm.splits["train"][i]["pixels"] for i in range(4)])
    assert (
        torch.equal(batch["pixels"], per_image) and batch["index"].tolist() == dm.splits["train"].indices[:4].tolist()
    )
    with pytest.raises(ValueError, match="unlabelled"):
        ImageNetDataModule(data_dir=root, class_conditional=True).num_classes  # noqa: B018


@pytest.mark.parametrize(("size", "npz"), [(32, True), (64, False)])
def test_imagenet_downsampled_reads_channel_major_rows_and_labels(tmp_path, size, npz):
    root = write_imagenet_downsampled(str(tmp_path), size, per_batch=3, val=6, npz=npz)
    dm = ImageNetDataModule(data_dir=root, version="downsampled", image_size=size, val_size=5, **FAST)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [25, 5, 6] and dm.dataset_classes == 1000
    # the raw rows, read without our code: red of pixel (0, 0) is row[0], green row[S*S], and red of
    # pixel (0, 1) is row[1], of pixel (1, 0) row[S]
    name = os.path.join(root, f"Imagenet{size}_val{'_npz' if npz else ''}", "val_data" + (".npz" if npz else ""))
    if npz:
        rows = np.load(name)["data"]
    else:
        import pickle

        with open(name, "rb") as f:
            rows = pickle.load(f)["data"]
    test = dm.splits["test"]
    for i in range(6):
        pixels, row = test[i]["pixels"], rows[i]
        check_known_pixels(pixels, red=i)
        assert (pixels[0, 0, 0], pixels[1, 0, 0], pixels[0, 0, 1], pixels[0, 1, 0]) == (
            row[0],
            row[size * size],
            row[1],
            row[size],
        )
        assert int(test[i]["label"]) == i  # stored 1..1000, read 0..999
    full = dm.splits["train"].dataset  # train_data_batch_1 first, then 2, ...: image 3 is batch 2's first
    check_known_pixels(full[3][0], red=0)


def test_imagenet_missing_data_says_where_to_get_which_files(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot be downloaded automatically: download train_32x32.tar"):
        ImageNetDataModule(data_dir=str(tmp_path), download=True).prepare_data()
    with pytest.raises(DatasetError, match=r"train_data_batch_1.*Imagenet64_train_part1.zip"):
        ImageNetDataModule(data_dir=str(tmp_path), version="downsampled", image_size=64).setup()


def test_lsun_reads_the_lmdb_and_crops_96_to_64(tmp_path):
    pytest.importorskip("lmdb")
    root = write_lsun(str(tmp_path), "tower", train=20, val=5)
    dm = LSUNDataModule(data_dir=root, category="tower", val_size=4, **FAST)
    dm.prepare_data()
    assert os.path.isfile(os.path.join(root, "tower_train_lmdb_keys.pkl"))  # beside the LMDB, not in the cwd
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [16, 4, 5]
    raw = next(iter(dm._loader("test")))
    assert raw["pixels"].shape == (4, 3, 96, 96)
    evaluation = dm.prepare_batch(raw, train=False)
    assert torch.equal(evaluation["bins"], raw["pixels"][:, :, 16:80, 16:80].long())  # central 64x64
    epoch0, again = dm.prepare_batch(raw, train=True, epoch=0), dm.prepare_batch(raw, train=True, epoch=0)
    epoch1 = dm.prepare_batch(raw, train=True, epoch=1)
    assert epoch0["x"].shape == (4, 3, 64, 64) and torch.equal(epoch0["x"], again["x"])
    assert not torch.equal(epoch0["bins"], epoch1["bins"])
    with pytest.raises(DatasetError, match="bedroom_train_lmdb does not exist"):
        LSUNDataModule(data_dir=root, category="bedroom").setup()


def test_random_crop_takes_the_window_at_its_offsets():
    pixels = torch.arange(2 * 1 * 5 * 6).view(2, 1, 5, 6)
    keys = torch.tensor([0, 12345])
    crops = crop_images(pixels, 3, keys)
    for b in range(2):  # each crop is a contiguous 3x3 window of its own image
        top, left = divmod(int(crops[b, 0, 0, 0] - pixels[b, 0, 0, 0]), 6)
        assert torch.equal(crops[b], pixels[b, :, top : top + 3, left : left + 3])


@pytest.mark.parametrize("jpg", [False, True])
def test_celebahq_split_is_the_last_tenth_by_sorted_name(tmp_path, jpg):
    root = write_celebahq(str(tmp_path), n=12, size=64, jpg=jpg)
    dm = CelebAHQDataModule(data_dir=root, image_size=64, val_size=2, **FAST)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]  # ceil(12 / 10) = 2 test images
    test = dm.splits["test"]
    assert [os.path.basename(p) for p in test.dataset.paths] == (
        ["00011.jpg", "00012.jpg"] if jpg else ["imgHQ00010.png", "imgHQ00011.png"]
    )
    if not jpg:  # lossless: the known pixels survive (red of image i at (0, 0) is i)
        check_known_pixels(test[0]["pixels"], red=10)
    assert dm.n_bits == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "write", "extra"),
    [
        ("imagenet32", lambda d: write_imagenet_oord(d, 32), []),
        ("imagenet64", lambda d: write_imagenet_downsampled(d, 64), ["--data.version", "downsampled"]),
        ("lsun64", lambda d: write_lsun(d, "tower"), ["--data.category", "tower"]),
        ("celebahq256", lambda d: write_celebahq(d, 20, 256), []),
    ],
)
def test_paper_dataset_configs_fit_end_to_end(tmp_path, name, write, extra):
    if name == "lsun64":
        pytest.importorskip("lmdb")
    data = write(str(tmp_path / "data"))
    cli = main(
        ["fit", "--config", config(f"{name}.yaml"), "--config", config("debug.yaml"), "--data.data_dir", data,
         "--data.val_size", "4", "--trainer.default_root_dir", str(tmp_path / "run"),
         "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1", *extra]
    )  # fmt: skip
    assert cli.trainer.global_step >= 1 and torch.isfinite(cli.trainer.callback_metrics["val/bpd"])
    assert cli.model.hparams.image_size == {"imagenet32": 32, "imagenet64": 64, "lsun64": 64}.get(name, 256)
