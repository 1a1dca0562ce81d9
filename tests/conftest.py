"""Shared fixtures: a CIFAR-10 fixture in the real pickle format and one tiny trained checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")  # no test may need a W&B account or the network
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault(
    "GLOW_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"glow-test-cache-{os.getpid()}")
)

import pytest  # noqa: E402
import torch  # noqa: E402

from .fixtures import write_cifar10, write_mnist  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def config(name: str) -> str:
    return os.path.join(CONFIGS, name)


def fit_args(data_dir: str, root_dir: str, *extra: str) -> list[str]:
    """``glow fit`` arguments for the tiny debug setup on the CIFAR fixture."""
    return cli_args("fit", data_dir, root_dir, *extra)


def cli_args(subcommand: str, data_dir: str, root_dir: str, *extra: str) -> list[str]:
    """``glow <subcommand>`` arguments for the tiny debug setup on the CIFAR fixture."""
    return [
        subcommand, "--config", config("cifar.yaml"), "--config", config("debug.yaml"),
        "--data.data_dir", data_dir, "--data.download", "false", "--data.val_size", "8",
        "--trainer.default_root_dir", root_dir, "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    """40 training + 10 test random images in ``cifar-10-batches-py`` format."""
    return write_cifar10(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def tiny_run(cifar_dir, tmp_path_factory) -> str:
    """One tiny ``glow fit`` shared by every test that needs a checkpoint; returns its run directory."""
    from glow_lightning.cli import main

    root = str(tmp_path_factory.mktemp("tiny_run"))
    main(fit_args(cifar_dir, root))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> str:
    return os.path.join(tiny_run, "checkpoints", "last.ckpt")


@pytest.fixture(scope="session")
def tiny_mnist_run(tmp_path_factory) -> str:
    """A tiny ``glow fit`` on an MNIST fixture (1-channel), stopped after one epoch and resumed for a second
    (``lightning_logs/version_0`` and ``version_1``); returns its run directory."""
    from glow_lightning.cli import main

    data = write_mnist(str(tmp_path_factory.mktemp("mnist")), train_size=40, test_size=10)
    root = str(tmp_path_factory.mktemp("tiny_mnist_run"))
    args = [
        "fit", "--config", config("mnist.yaml"), "--config", config("debug.yaml"), "--data.data_dir", data,
        "--data.download", "false", "--data.val_size", "8", "--trainer.default_root_dir", root,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    main([*args, "--trainer.max_epochs", "1"])
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    return root
