"""Experiment tracking: ``configs/wandb.yaml`` (offline W&B) receives the metrics, the hyperparameters
and the resolved config; without it the logger is TensorBoard, needing no account."""

from __future__ import annotations

import glob
import math
import os

import pytest
from lightning.pytorch.loggers import WandbLogger

from glow_lightning.cli import main

from .conftest import config, fit_args


def wandb_run_dir(root: str) -> str:
    """The single offline W&B run under ``<root>/wandb``."""
    runs = glob.glob(os.path.join(root, "wandb", "offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def wandb_image_files(root: str) -> list[str]:
    """Image files an offline W&B run under ``root`` wrote (``files/media/images/``)."""
    return glob.glob(os.path.join(wandb_run_dir(root), "files", "media", "images", "**", "*.png"), recursive=True)


@pytest.fixture
def logged(monkeypatch) -> dict[str, list]:
    """Spy on WandbLogger: every log_metrics / log_hyperparams call (offline W&B keeps a binary file)."""
    calls = {"metrics": [], "hyperparams": []}
    log_metrics, log_hyperparams = WandbLogger.log_metrics, WandbLogger.log_hyperparams

    def spy_metrics(self, metrics, step=None):
        calls["metrics"].append(dict(metrics))
        return log_metrics(self, metrics, step)

    def spy_hyperparams(self, params, *args, **kwargs):
        calls["hyperparams"].append(dict(params))
        return log_hyperparams(self, params, *args, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_metrics", spy_metrics)
    monkeypatch.setattr(WandbLogger, "log_hyperparams", spy_hyperparams)
    return calls


@pytest.mark.slow
def test_wandb_overlay_offline_logs_metrics_hyperparameters_and_config(cifar_dir, tmp_path, logged, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    root = str(tmp_path / "run")
    args = fit_args(cifar_dir, root, "--config", config("wandb.yaml"), "--trainer.max_epochs", "1")
    try:
        run_args = ["--trainer.logger.init_args.name", "tiny", "--trainer.logger.init_args.tags", "[test]"]
        cli = main([*args, *run_args, "--trainer.logger.init_args.id", "tiny-1"])  # a fixed id: resumable
        assert isinstance(cli.trainer.logger, WandbLogger)
        run = cli.trainer.logger.experiment
        assert (run.name, list(run.tags), run.project, run.id) == ("tiny", ["test"], "glow-lightning", "tiny-1")

        keys = set().union(*logged["metrics"])
        for key in ("train/bpd", "train/lr", "train/grad_norm", "val/bpd", "train/bpd_epoch"):
            assert key in keys, (key, keys)
        grad_norms = [m["train/grad_norm"] for m in logged["metrics"] if "train/grad_norm" in m]
        assert len(grad_norms) == 4 and all(math.isfinite(g) and g > 0 for g in grad_norms)  # 4 steps, logged each

        params = {k: v for call in logged["hyperparams"] for k, v in call.items()}
        assert params["levels"] == 2 and params["hidden_channels"] == 16  # model hyperparameters
        resolved = params["config"]  # the resolved config: every overlay and flag applied
        assert resolved["model"]["steps_per_level"] == 2 and resolved["trainer"]["max_epochs"] == 1
        assert resolved["trainer"]["logger"]["init_args"]["name"] == "tiny"
        assert dict(run.config)["config"]["data"]["init_args"]["batch_size"] == 8  # reached the W&B run

        run_dir = wandb_run_dir(root)  # W&B files in the run's directory, not the working directory
        assert glob.glob(os.path.join(run_dir, "run-*.wandb"))
        assert not os.path.exists(os.path.join(root, "lightning_logs"))  # the overlay replaced TensorBoard
        assert os.path.exists(os.path.join(root, "checkpoints", "last.ckpt"))  # and nothing else

        # the image-grid callbacks (on in configs/cifar.yaml) logged their grids to the offline run
        images = [os.path.basename(f) for f in wandb_image_files(root)]
        for kind in ("t0.5_", "t0.7_", "t1.0_", "reconstructions_", "linear_"):  # samples/t0.5, ...
            assert any(kind in name for name in images), (kind, images)
    finally:
        wandb.finish()


def test_default_logger_is_tensorboard(tiny_run):
    assert glob.glob(os.path.join(tiny_run, "lightning_logs", "version_0", "events.out.tfevents.*"))
    assert not os.path.exists(os.path.join(tiny_run, "wandb"))


def test_checkpoint_records_its_run_config_and_every_log_folder(tiny_mnist_run, tmp_path):
    """A resumed fit's checkpoint names both log folders (oldest first) and the data settings it trained on,
    also after the run folder moved; the newest ``version_N`` alone would lose the first half of the curves."""
    import shutil

    from glow_lightning.cli.tracking import checkpoint_run, datamodule_of_checkpoint
    from glow_lightning.data import MNISTDataModule

    moved = shutil.copytree(tiny_mnist_run, tmp_path / "moved")
    logs = [os.path.join(tiny_mnist_run, "lightning_logs", v) for v in ("version_0", "version_1")]
    moved_logs = [str(moved / "lightning_logs" / v) for v in ("version_0", "version_1")]
    ckpt = str(moved / "checkpoints" / "last.ckpt")
    assert checkpoint_run(os.path.join(tiny_mnist_run, "checkpoints", "last.ckpt"))["log_dirs"] == logs
    assert checkpoint_run(ckpt)["log_dirs"] == moved_logs  # next to the checkpoint first
    shutil.rmtree(moved_logs[1])
    assert checkpoint_run(ckpt)["log_dirs"] == [moved_logs[0], logs[1]]  # then in the original run folder
    assert checkpoint_run(ckpt)["config"]["data"]["init_args"]["val_size"] == 8
    datamodule = datamodule_of_checkpoint(ckpt, batch_size=4)
    assert isinstance(datamodule, MNISTDataModule) and datamodule.batch_size == 4
    assert datamodule.fixed_images("val", 2)["bins"].shape == (2, 1, 32, 32)


def test_datamodule_of_checkpoint_builds_glow_lightning_classes_only(tiny_checkpoint, tmp_path):
    import torch

    from glow_lightning.cli.tracking import RUN_KEY, datamodule_of_checkpoint

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt[RUN_KEY]["config"] = "data:\n  class_path: subprocess.Popen\n  init_args: {args: [touch, x]}\n"
    torch.save(ckpt, tmp_path / "named_code.ckpt")
    with pytest.raises(ValueError, match="'subprocess.Popen' is not a glow_lightning.data class"):
        datamodule_of_checkpoint(str(tmp_path / "named_code.ckpt"))
    del ckpt[RUN_KEY]
    torch.save(ckpt, tmp_path / "no_record.ckpt")
    with pytest.raises(ValueError, match="holds no run record"):
        datamodule_of_checkpoint(str(tmp_path / "no_record.ckpt"))
