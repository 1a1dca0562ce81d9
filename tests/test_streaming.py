"""Streaming with litdata: lossless conversion, one and two processes, mid-epoch resume, the remote cache
path (litdata's ``local:`` stand-in) and the same bits/dim as the in-memory datamodule."""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch

litdata = pytest.importorskip("litdata")

from glow_lightning.cli import main  # noqa: E402
from glow_lightning.data import CIFAR10DataModule, StreamingDataModule  # noqa: E402
from glow_lightning.data.base import DatasetError  # noqa: E402
from glow_lightning.data.streaming import convert  # noqa: E402
from glow_lightning.flow import Glow  # noqa: E402

from .conftest import config  # noqa: E402
from .fixtures import write_cifar10  # noqa: E402

FAST = dict(batch_size=4, num_workers=0)


def source_dm(root: str) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=root, download=False, val_size=8, **FAST)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, str]:
    """(CIFAR fixture dir, its conversion): 32 training, 8 validation and 10 test images."""
    root = write_cifar10(str(tmp_path_factory.mktemp("cifar_stream")))
    out = str(tmp_path_factory.mktemp("streamed") / "cifar")
    assert convert(source_dm(root), out, num_workers=1, start_method="fork") == {"train": 32, "val": 8, "test": 10}
    return root, out


def split_indices(root: str, split: str) -> list[int]:
    """The source image indices of a split of the in-memory datamodule."""
    dm = source_dm(root)
    dm.setup()
    return [int(dm.splits[split][i]["index"]) for i in range(len(dm.splits[split]))]


def indices_of(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_conversion_is_lossless_numpy_never_jpeg(converted):
    root, out = converted
    source = source_dm(root)
    source.setup()
    with open(os.path.join(out, "train", "index.json")) as f:
        assert json.load(f)["config"]["data_format"] == ["numpy", "int", "int"]
    for split in ("train", "val", "test"):
        stream = litdata.StreamingDataset(os.path.join(out, split))
        items = [stream[i] for i in range(len(stream))]
        assert sorted(item["index"] for item in items) == split_indices(root, split)
        for item in items:  # bit-exact pixels and labels of the source image of that index
            pixels, label = source.splits[split].dataset[item["index"]]
            assert item["pixels"].dtype.name == "uint8" and torch.equal(torch.from_numpy(item["pixels"]), pixels)
            assert item["label"] == int(label)
    # a second conversion into the same place keeps the first one
    assert convert(source, out, num_workers=1, start_method="fork")["train"] == 32


def test_one_process_streams_every_image_once_per_epoch(converted):
    root, out = converted
    dm = StreamingDataModule(input_dir=out, **FAST)
    assert (dm.image_shape, dm.dataset_classes) == ((3, 32, 32), 10)
    train = dm.train_dataloader()
    first, second = indices_of(train), indices_of(train)
    expected = split_indices(root, "train")
    assert sorted(first) == sorted(second) == expected and first != second  # reshuffled by litdata
    assert sorted(indices_of(dm.test_dataloader())) == list(range(10))
    # per-item decode where litdata has the option: its windowed default made 2 workers 5x slower (BENCHMARKS.md)
    if "batch_decode" in inspect.signature(litdata.StreamingDataset.__init__).parameters:
        assert {dm.splits[split].batch_decode for split in ("train", "val", "test")} == {0}


def test_mid_epoch_resume_covers_every_image_exactly_once(converted):
    root, out = converted
    dm = StreamingDataModule(input_dir=out, batch_size=4, num_workers=2)
    loader = dm.train_dataloader()
    seen = []
    for k, batch in enumerate(loader):
        seen += batch["index"].tolist()
        if k == 2:
            state = loader.state_dict()  # what Lightning saves in a mid-epoch checkpoint
            break
    resumed = StreamingDataModule(input_dir=out, batch_size=4, num_workers=2).train_dataloader()
    resumed.load_state_dict(state)
    rest = indices_of(resumed)
    assert len(seen) == 12 and len(rest) == 20 and not set(seen) & set(rest)
    assert sorted(seen + rest) == split_indices(root, "train")


def test_same_pixels_noise_and_bits_per_dim_as_in_memory(converted):
    root, out = converted
    source, stream = source_dm(root), StreamingDataModule(input_dir=out, **FAST)
    source.setup()
    torch.manual_seed(0)
    flow = Glow(in_channels=3, image_size=32, levels=2, steps_per_level=2, hidden_channels=8)
    flow.initialize(source.init_batch(16)["x"])

    def bpd_by_index(dm, loader, train, epoch=0):
        out = {}
        with torch.no_grad():
            for raw in loader:
                batch = dm.prepare_batch(raw, train=train, epoch=epoch)
                bpd = -flow.log_prob(batch["x"]) / (3 * 32 * 32 * math.log(2)) + dm.n_bits
                out.update({int(i): (x, float(b)) for i, x, b in zip(batch["index"], batch["x"], bpd)})
        return out

    memory = bpd_by_index(source, source.test_dataloader(), train=False)
    streamed = bpd_by_index(stream, stream.test_dataloader(), train=False)
    assert memory.keys() == streamed.keys() and len(memory) == 10
    for i in memory:
        assert torch.equal(memory[i][0], streamed[i][0]) and memory[i][1] == streamed[i][1]
    # training noise and flips at epoch 3: the same per image index, whatever the order
    memory = bpd_by_index(source, source.train_dataloader(), train=True, epoch=3)
    streamed = bpd_by_index(stream, stream.train_dataloader(), train=True, epoch=3)
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[i][0], streamed[i][0]) for i in memory)


def test_a_remote_input_dir_goes_through_the_cache(converted, tmp_path):
    _, out = converted
    cache = str(tmp_path / "cache")
    remote = StreamingDataModule(input_dir="local:" + out, cache_dir=cache, **FAST)
    local = StreamingDataModule(input_dir=out, **FAST)
    got = {i: p for b in remote.test_dataloader() for i, p in zip(b["index"].tolist(), b["pixels"])}
    want = {i: p for b in local.test_dataloader() for i, p in zip(b["index"].tolist(), b["pixels"])}
    assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in got)
    cached = [f for _, _, files in os.walk(cache) for f in files if f.endswith(".bin")]
    assert cached, "litdata read the shards without its download cache"


def test_not_a_converted_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"is not a converted dataset: cannot read .*glow.json"):
        StreamingDataModule(input_dir=str(tmp_path))


def _ddp_worker(rank: int, out: str, port: int, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dm = StreamingDataModule(input_dir=out, batch_size=3, num_workers=0)
    seen = {"train": indices_of(dm.train_dataloader()), "test": indices_of(dm.test_dataloader())}
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def test_two_ddp_processes_split_every_epoch_and_read_evaluation_once(converted, tmp_path):
    import socket

    import torch.multiprocessing as mp

    root, out = converted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(out, port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(2)]
    train = split_indices(root, "train")
    # training: disjoint halves; litdata drops the uneven tail (32 images, 2 ranks x batch 3: 30 used)
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) >= 12 and set(ranks[0]["train"] + ranks[1]["train"]) <= set(
        train
    )
    # evaluation: every one of the 10 test images exactly once over both ranks
    assert sorted(ranks[0]["test"] + ranks[1]["test"]) == list(range(10))


@pytest.mark.slow
def test_glow_fit_streams_end_to_end(converted, tmp_path):
    _, out = converted
    cli = main(
        ["fit", "--config", config("imagenet32.yaml"), "--config", config("debug.yaml"), "--config",
         config("streaming.yaml"), "--data.input_dir", out, "--trainer.default_root_dir", str(tmp_path / "run"),
         "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1"]
    )  # fmt: skip
    assert isinstance(cli.datamodule, StreamingDataModule) and cli.trainer.global_step == 4
    assert torch.isfinite(cli.trainer.callback_metrics["val/bpd"])


def test_glow_prepare_converts_a_config_s_dataset_and_says_where(converted, tmp_path, capsys):
    root, _ = converted
    out = str(tmp_path / "prepared")
    main(["prepare", "--config", config("cifar.yaml"), "--data.data_dir", root, "--data.download", "false",
          "--data.val_size", "8", "--data.num_workers", "0", "--output", out, "--num_workers", "1"])  # fmt: skip
    assert "wrote 32 train, 8 val, 10 test images to" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "glow.json")))
    assert meta["splits"] == {"train": 32, "val": 8, "test": 10}
    streamed = StreamingDataModule(input_dir=out, **FAST)
    streamed.setup("fit")
    assert len(streamed.splits["train"]) == 32


def test_glow_fit_stopped_mid_epoch_resumes_the_rest_of_that_epoch_from_the_stream(converted, tmp_path):
    """A stop in the middle of epoch 1 (as max_time stops, after 6 of 8 steps): the resume runs the 2 batches that
    were left, from litdata's loader state: epoch 1 sees each of the 32 training images once."""
    _, out = converted
    args = ["fit", "--config", config("imagenet32.yaml"), "--config", config("debug.yaml"), "--config",
            config("streaming.yaml"), "--data.input_dir", out, "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps",
            "0", "--trainer.callbacks+", "tests.reliability_helpers.IndexRecorder"]  # fmt: skip
    first = main([*args, "--trainer.callbacks+", "tests.reliability_helpers.StopAtStep"])
    resumed = main([*args, "--ckpt_path", "last"])
    assert first.trainer.global_step == 6 and resumed.trainer.global_step == 8

    def recorded(cli):
        return next(c for c in cli.trainer.callbacks if type(c).__name__ == "IndexRecorder").indices

    epoch1 = [i for batch in recorded(first)[4:] + recorded(resumed) for i in batch]
    assert len(epoch1) == len(set(epoch1)) == 32


def test_a_streamed_mid_epoch_resume_with_another_batch_size_says_it_is_not_exact(converted, tmp_path, capsys):
    """litdata's loader state counts its workers' images: resumed with another batch size it skips and repeats some
    (by hand: 12 of 32 done with batches of 4, then batches of 8: 16 more, 4 of them again). One line says so."""
    _, out = converted
    args = ["fit", "--config", config("imagenet32.yaml"), "--config", config("debug.yaml"), "--config",
            config("streaming.yaml"), "--data.input_dir", out, "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
    main([*args, "--trainer.max_steps", "2"])
    capsys.readouterr()
    main([*args, "--trainer.max_steps", "3", "--ckpt_path", "last", "--data.batch_size", "4"])
    assert "glow: warning: resuming in the middle of epoch 0 with 4 images per batch over all devices (checkpoint: 8)" \
        ": the streamed data resumes by its own counts" in capsys.readouterr().out  # fmt: skip
