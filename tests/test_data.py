"""CIFAR10DataModule on a fixture in the real ``cifar-10-batches-py`` format."""

from __future__ import annotations

import pytest
import torch

from glow_lightning.data import CIFAR10DataModule
from glow_lightning.data.noise import EVAL_STREAM


def datamodule(cifar_dir, **kwargs) -> CIFAR10DataModule:
    args = dict(data_dir=cifar_dir, download=False, val_size=8, batch_size=5, num_workers=0)
    return CIFAR10DataModule(**{**args, **kwargs})


def test_splits_shapes_and_labels(cifar_dir):
    dm = datamodule(cifar_dir)
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [32, 8, 10]
    item = dm.splits["train"][0]
    assert item["pixels"].shape == (3, 32, 32) and item["pixels"].dtype == torch.uint8
    assert 0 <= int(item["label"]) < 10
    train_idx = set(dm.splits["train"].indices.tolist())
    assert not train_idx & set(dm.splits["val"].indices.tolist())


def test_split_is_seeded(cifar_dir):
    a, b, c = datamodule(cifar_dir), datamodule(cifar_dir), datamodule(cifar_dir, seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.splits["val"].indices, b.splits["val"].indices)
    assert not torch.equal(a.splits["val"].indices, c.splits["val"].indices)


@pytest.mark.parametrize("n_bits", [8, 5, 1])
def test_dequantized_values_stay_in_their_bin(cifar_dir, n_bits):
    dm = datamodule(cifar_dir, n_bits=n_bits)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    batch = dm.prepare_batch(raw, train=False)
    x, bins = batch["x"], batch["bins"]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(bins, raw["pixels"].long() >> (8 - n_bits))
    assert (x >= 0).all() and (x < 1).all()
    lower = bins.float() / 2**n_bits
    assert (x > lower).all() and (x < lower + 1 / 2**n_bits).all()
    noise = (x - lower) * 2**n_bits
    assert 0.3 < noise.mean() < 0.7


def test_eval_noise_is_a_function_of_seed_and_index(cifar_dir):
    dm = datamodule(cifar_dir)
    bins = torch.randint(0, 256, (4, 3, 32, 32))
    index = torch.tensor([3, 7, 11, 20])
    a = dm.dequantize(bins, index)
    assert torch.equal(a, dm.dequantize(bins, index))  # same run or another: same noise
    assert torch.equal(a[1:3], dm.dequantize(bins[1:3], index[1:3]))  # independent of batching
    assert not torch.equal(a, dm.dequantize(bins, index, stream=0))  # training streams differ
    other = datamodule(cifar_dir, seed=5)
    assert not torch.equal(a, other.dequantize(bins, index, EVAL_STREAM))


def test_training_noise_and_flips_change_with_epoch(cifar_dir):
    dm = datamodule(cifar_dir)
    dm.setup("fit")
    raw = next(iter(dm.val_dataloader()))
    e0, e0_again, e1 = (dm.prepare_batch(raw, train=True, epoch=e) for e in (0, 0, 1))
    assert torch.equal(e0["x"], e0_again["x"])
    assert not torch.equal(e0["x"], e1["x"])
    flipped = [not torch.equal(b, r) for b, r in zip(e0["bins"], raw["pixels"].long())]
    assert any(flipped) or any(not torch.equal(b, r) for b, r in zip(e1["bins"], raw["pixels"].long()))
    no_flip = datamodule(cifar_dir, flip=False).prepare_batch(raw, train=True)
    assert torch.equal(no_flip["bins"], raw["pixels"].long())


def test_missing_dataset_without_download_says_where_and_how(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cifar-10-batches-py.*--data.download true"):
        dm.setup("fit")


@pytest.mark.parametrize(("kwargs", "name"), [({"n_bits": 9}, "n_bits"), ({"batch_size": 0}, "batch_size")])
def test_bad_datamodule_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CIFAR10DataModule(**kwargs)


def test_val_size_too_large_is_reported(cifar_dir):
    with pytest.raises(ValueError, match="val_size=100"):
        datamodule(cifar_dir, val_size=100).setup("fit")


def test_failed_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    from glow_lightning.data.base import DownloadError

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DownloadError, match=r"could not download CIFAR-10 .*URLError.*cifar-10-python\.tar\.gz"):
        dm.prepare_data()


def _hash32_reference(x: torch.Tensor) -> torch.Tensor:
    """The counter-based mixer as first written (out of place), to pin the values the faster code must keep."""
    m = 0xFFFFFFFF
    x = x & m
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & m
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & m
    return x ^ (x >> 16)


@pytest.mark.parametrize("seed, stream", [(0, 0), (2**40 + 7, 2**33 + 5), (-1, EVAL_STREAM), (123456789, 3)])
def test_the_noise_and_flips_keep_their_values(seed, stream):
    """A dequantized image is a function of (seed, stream, index) that must not change between versions (resumes
    and published numbers rely on it): the in-place hashing and the scalar keys give the reference values."""
    from glow_lightning.data import noise

    index = torch.arange(-3, 61) * 977
    keys = _hash32_reference(_hash32_reference(_hash32_reference(torch.full_like(index, seed)) ^ (stream & 0xFFFFFFFF))
                             ^ (index & 0xFFFFFFFF))  # fmt: skip
    assert torch.equal(noise.item_keys(seed, stream, index), keys)
    pos = torch.arange(3 * 4 * 4)
    u = ((_hash32_reference(keys[:, None] + pos * 0x9E3779B9) >> 8).float() + 0.5) / 2**24
    assert torch.equal(noise.uniform_from_keys(keys, (3, 4, 4)), u.view(-1, 3, 4, 4))
    assert torch.equal(noise.flip_mask(seed, stream, index), (_hash32_reference(keys ^ noise.FLIP_SALT) & 1).bool())
    assert torch.equal(noise.hash32(index), _hash32_reference(index))


def test_a_prepared_batch_keeps_its_values(cifar_dir):
    """prepare_batch (flips on the uint8 pixels, dequantization in place) = the reference formulas."""
    from glow_lightning.data.noise import flip_mask, item_keys, uniform_from_keys

    dm = datamodule(cifar_dir, n_bits=5)
    g = torch.Generator().manual_seed(0)
    batch = {"pixels": torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g),
             "index": torch.tensor([0, 5, 9, 100, 7, 3]), "label": torch.arange(6)}  # fmt: skip
    out = dm.prepare_batch(batch, train=True, epoch=2)
    flip = flip_mask(dm.seed, 2, batch["index"])
    bins = (batch["pixels"].long() >> 3).where(~flip[:, None, None, None], (batch["pixels"].long() >> 3).flip(-1))
    assert flip.any() and not flip.all()
    assert torch.equal(out["bins"], bins)
    noise = uniform_from_keys(item_keys(dm.seed, 2, batch["index"]), (3, 8, 8))
    assert torch.equal(out["x"], bins.float() / 2**5 + noise / 2**5)
    assert torch.equal(out["label"], batch["label"]) and torch.equal(out["index"], batch["index"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_training_sampler_goes_on_where_a_resumed_epoch_stopped(cifar_dir, monkeypatch, world_size):
    """The training loader's sampler is the datamodule's own (one device, and under DDP a DistributedSampler, which
    Lightning keeps): created in the resumed epoch's order (Lightning sets the epoch only after workers drew indices)
    and skipping, once, the images of the batches the checkpoint had done."""
    from glow_lightning.data.base import EpochDistributedSampler, EpochRandomSampler

    def indices(epoch: int, start_batches: int, rank: int) -> list[list[int]]:
        dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=4, num_workers=0)
        dm.setup("fit")
        monkeypatch.setattr(dm, "_rank_and_world_size", lambda: (rank, world_size))
        monkeypatch.setattr(dm, "_resume_position", lambda: (epoch, start_batches * 4))
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, EpochDistributedSampler if world_size > 1 else EpochRandomSampler)
        first = [batch["index"].tolist() for batch in loader]
        assert len(loader) * 4 * world_size == 32  # the whole epoch's length, as Lightning counts the batches done
        loader.sampler.set_epoch(epoch + 1)
        return first, [batch["index"].tolist() for batch in loader]

    for rank in range(world_size):
        whole, after = indices(epoch=1, start_batches=0, rank=rank)
        rest, after_rest = indices(epoch=1, start_batches=2, rank=rank)
        assert rest == whole[2:] and after_rest == after  # the rest of the epoch, then whole epochs again
        assert whole != indices(epoch=0, start_batches=0, rank=rank)[0]  # the epoch's own order
    if world_size > 1:  # the ranks share out the epoch: each of the 32 training images once
        shares = [indices(epoch=1, start_batches=0, rank=r)[0] for r in range(world_size)]
        images = [i for share in shares for batch in share for i in batch]
        assert len(images) == len(set(images)) == 32


@pytest.mark.parametrize("world_size", [2, 3])
def test_an_epochs_order_is_the_same_on_any_number_of_devices(world_size):
    """Rank r of W takes positions r, r + W, ... of the one-device order, so the first n images of an epoch are done
    after n / W of each rank's share: a mid-epoch resume on another number of devices goes on after them."""
    from glow_lightning.data.base import EpochDistributedSampler, EpochRandomSampler

    data = list(range(30))
    one = list(EpochRandomSampler(data, seed=3, epoch=2))
    assert sorted(one) == data and one != list(EpochRandomSampler(data, seed=3, epoch=1))
    shares = [list(EpochDistributedSampler(data, world_size, r, seed=3, epoch=2)) for r in range(world_size)]
    interleaved = [share[k] for k in range(len(shares[0])) for share in shares]
    assert interleaved[:30] == one  # (DistributedSampler pads the last round with the order's first images)
    skipped = [list(EpochDistributedSampler(data, world_size, r, seed=3, epoch=2, start=4)) for r in range(world_size)]
    assert [share[4:] for share in shares] == skipped
