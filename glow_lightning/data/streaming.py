"""Streaming a converted dataset with litdata (Lightning's streaming engine), locally or from object storage.

For data that does not fit every node's disk or lives in a bucket. Two steps:

1. :func:`convert` runs ``litdata.optimize`` over a datamodule's training, validation and test splits and
   writes chunked shards to ``output_dir/{train,val,test}`` (a local path, ``s3://...``, ``gs://...``), plus
   ``output_dir/glow.json`` (image shape, class count, crop, split sizes). Each item is the image's uint8
   pixels as a NumPy array (litdata's lossless ``numpy`` serializer, never JPEG: a lossy codec changes the
   data and so the bits/dim), its label and its image index in the source dataset. Parallel (litdata's
   workers), with a progress bar, resumable (``use_checkpoint``); a split already converted is skipped.
2. :class:`StreamingDataModule` (``--data.input_dir``) reads them with ``litdata.StreamingDataset`` /
   ``StreamingDataLoader``. litdata decides the batches and the shuffling over DDP ranks and nodes; the
   StreamingDataLoader is stateful, so Lightning's checkpoints resume mid-epoch exactly. Because every
   item carries its source image index, the per-image quantization, flips, crops and dequantization noise
   (GlowDataModule.prepare_batch, a function of (seed, epoch, index)) are those of the in-memory
   datamodule: bits/dim does not depend on the source. Evaluation splits are read with
   ``drop_last=False`` and without shuffling: every image exactly once over all ranks (per-rank lengths
   may differ by a few images, as the in-memory evaluation's UnrepeatedDistributedSampler allows).

litdata (https://github.com/Lightning-AI/litdata) is an optional extra: ``pip install 'glow-lightning[streaming]'``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re

import fsspec
import torch
from typing_extensions import override

from .base import DatasetError, GlowDataModule, IndexedDataset
from .lsun import crop_for_model

SPLITS = ("train", "val", "test")
META = "glow.json"
FORMAT = "glow-lightning streaming v1"


def _litdata():
    try:
        import litdata
    except ImportError as err:
        raise DatasetError(f"streaming needs litdata: pip install 'glow-lightning[streaming]' ({err})") from err
    return litdata


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _fs_path(url: str) -> str:
    """A path fsspec can open: litdata's ``local:`` remote stand-in is a local path."""
    return url[len("local:") :] if url.startswith("local:") else url


def _item(position: int, dataset: IndexedDataset) -> dict:
    """litdata's worker function: the item at ``position`` of a split (a function, not a generator, so
    that litdata's checkpoints can resume an interrupted conversion)."""
    item = dataset[position]
    return {"pixels": torch.as_tensor(item["pixels"]).numpy(), "label": int(item["label"]), "index": int(item["index"])}


def _per_item_decode(litdata) -> dict:
    """``batch_decode=0`` where litdata has it (0.2.7x): its default decodes a window of small items at once
    (256 rows for small arrays), which a shuffled read with DataLoader workers throws away and decodes again for
    almost every item: 6,653 img/s with 2 workers on 32x32 images, 37,806 with per-item decode (and ~80,000 either
    way in the main process; BENCHMARKS.md, data throughput)."""
    parameters = inspect.signature(litdata.StreamingDataset.__init__).parameters
    return {"batch_decode": 0} if "batch_decode" in parameters else {}


def check_chunk_bytes(chunk_bytes: str | int) -> None:
    """A shard size litdata reads (``64MB``, ``1.5GB``, ``500k``, or an int of bytes), checked before any work
    (litdata's own error comes from a worker after the conversion has started)."""
    ok = isinstance(chunk_bytes, int) and chunk_bytes > 0
    ok = ok or bool(re.fullmatch(r"\s*\d+(\.\d*)?\s*([tgmk]b?|b)\s*", str(chunk_bytes), re.IGNORECASE))
    if not ok:
        raise ValueError(f"--chunk_bytes must be a shard size such as 64MB, 1GB or 500kb, got {chunk_bytes!r}")


def convert(
    datamodule: GlowDataModule,
    output_dir: str,
    *,
    splits: tuple[str, ...] = SPLITS,
    num_workers: int | None = None,
    chunk_bytes: str = "64MB",
    start_method: str | None = None,
    storage_options: dict | None = None,
) -> dict[str, int]:
    """Convert a datamodule's splits into litdata shards under ``output_dir/<split>``; returns split sizes.

    Args:
        datamodule: any GlowDataModule (its ``setup()`` is called: the train/val split is its own seeded one).
        output_dir: a local folder, ``s3://bucket/prefix``, ``gs://...`` (litdata's storage) or ``local:/path``.
        splits: which splits to convert.
        num_workers: litdata worker processes (None: litdata's default, the CPU count).
        chunk_bytes: target size of one shard file.
        start_method: multiprocessing start method of litdata's workers (None: litdata's, ``spawn``).
        storage_options: passed to litdata (credentials, endpoint of an S3-compatible store).
    """
    check_chunk_bytes(chunk_bytes)
    litdata = _litdata()
    datamodule.setup(None)
    sizes = {}
    for split in splits:
        dataset = datamodule.splits[split]
        sizes[split] = len(dataset)
        target = _join(output_dir, split)
        try:
            litdata.optimize(
                fn=functools.partial(_item, dataset=dataset), inputs=list(range(len(dataset))), output_dir=target,
                num_workers=num_workers or min(len(dataset), os.cpu_count() or 1), chunk_bytes=chunk_bytes,
                use_checkpoint=True, start_method=start_method, storage_options=storage_options or {},
            )  # fmt: skip
        except RuntimeError as err:
            if "already contains an optimized" not in str(err):
                raise
            # converted by an earlier run: keep it
    pixels = datamodule.splits["train"][0]["pixels"]
    meta = {
        "format": FORMAT,
        "source": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "stored_shape": list(pixels.shape),
        "image_size": datamodule.image_size,
        "num_channels": datamodule.num_channels,
        "dataset_classes": datamodule.dataset_classes,
        "seed": datamodule.seed,
        "splits": sizes,
    }
    with fsspec.open(_fs_path(_join(output_dir, META)), "w", **(storage_options or {})) as f:
        json.dump(meta, f, indent=1)
    return sizes


def read_meta(input_dir: str, storage_options: dict | None = None) -> dict:
    """The ``glow.json`` that :func:`convert` wrote at ``input_dir``."""
    path = _fs_path(_join(input_dir, META))
    try:
        with fsspec.open(path, "r", **(storage_options or {})) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"input_dir={input_dir!r} is not a converted dataset: cannot read {path} ({type(err).__name__}: {err}); "
            "convert one first with glow_lightning.data.streaming.convert (glow prepare)"
        ) from err
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class StreamingDataModule(GlowDataModule):
    """A dataset converted by :func:`convert`, streamed with litdata from a local folder or a bucket.

    Args:
        input_dir: what :func:`convert` wrote: a local folder, ``s3://bucket/prefix``, ``gs://...``, or
            ``local:/path`` (litdata's stand-in for a remote: it goes through the download cache).
        cache_dir: where litdata caches downloaded shards of a remote ``input_dir`` (None: its default).
        max_cache_size: litdata's cap on that cache (e.g. ``50GB``).
        seed: as the in-memory datamodule's: with the seed of the conversion (``glow.json``) the noise,
            flips and crops of every image are the same as there. Also seeds litdata's shuffling.
        storage_options: passed to litdata and fsspec (credentials, endpoint).
        **kwargs: the shared options of :class:`GlowDataModule` (n_bits, batch_size, num_workers, flip,
            class_conditional, ...); ``data_dir``, ``download`` and ``val_size`` do not apply (the
            splits are those converted).
    """

    resumes_by_count = False  # litdata's StreamingDataLoader restores its position from its own state

    def __init__(
        self,
        *,
        input_dir: str,
        cache_dir: str | None = None,
        max_cache_size: str = "100GB",
        seed: int = 0,
        storage_options: dict | None = None,
        **kwargs,
    ):
        kwargs.setdefault("download", False)
        super().__init__(seed=seed, **kwargs)
        self.input_dir, self.cache_dir, self.max_cache_size = input_dir, cache_dir, max_cache_size
        self.storage_options = storage_options or {}
        self.meta = read_meta(input_dir, self.storage_options)
        self.num_channels, self.image_size = self.meta["num_channels"], self.meta["image_size"]
        self.dataset_classes = self.meta["dataset_classes"]
        self.stored_size = self.meta["stored_shape"][-1]

    def _dataset(self, split: str, train: bool):
        litdata = _litdata()
        if split not in self.meta["splits"]:
            raise DatasetError(f"{self.input_dir} has no {split} split (converted: {', '.join(self.meta['splits'])})")
        return litdata.StreamingDataset(
            _join(self.input_dir, split), cache_dir=self.cache_dir, shuffle=train, drop_last=train,
            seed=self.seed, max_cache_size=self.max_cache_size, storage_options=self.storage_options,
            **_per_item_decode(litdata),
        )  # fmt: skip

    @override
    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.splits and split in self.meta["splits"]:
                self.splits[split] = self._dataset(split, train=split == "train")

    def _streaming_loader(self, split: str, train: bool = False):
        litdata = _litdata()
        self.setup()
        if split not in self.splits:
            raise DatasetError(f"{self.input_dir} has no {split} split (converted: {', '.join(self.meta['splits'])})")
        return litdata.StreamingDataLoader(
            self.splits[split], batch_size=self.batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=train,
        )  # fmt: skip

    @override
    def train_dataloader(self):
        return self._streaming_loader("train", train=True)

    @override
    def val_dataloader(self):
        return self._streaming_loader("val")

    @override
    def test_dataloader(self):
        return self._streaming_loader("test")

    @override
    def predict_dataloader(self):
        return self._streaming_loader(self.predict_split)

    @override
    def prepare_batch(self, batch: dict, train: bool, epoch: int = 0) -> dict:
        """Crops first when the stored images are larger than the model's (LSUN), as its datamodule does."""
        if self.stored_size != self.image_size:
            pixels = crop_for_model(batch["pixels"], self.image_size, self.seed, batch["index"], train, epoch)
            batch = {**batch, "pixels": pixels}
        return super().prepare_batch(batch, train=train, epoch=epoch)

    @override
    def init_batch(self, num_images: int, device: torch.device | str = "cpu") -> dict:
        """ActNorm's init batch: random training images (by global position: the same on a resumed run)."""
        dataset = self._dataset("train", train=False)
        rank = self._rank_and_world_size()[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + rank)
        picks = torch.randperm(self.meta["splits"]["train"], generator=g)[:num_images].tolist()
        items = [dataset[i] for i in picks]
        batch = {
            "pixels": torch.stack([torch.from_numpy(item["pixels"]) for item in items]),
            "label": torch.tensor([item["label"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
        }
        return self.prepare_batch({k: v.to(device) for k, v in batch.items()}, train=True, epoch=0)
