"""Experiment tracking: the resolved ``glow`` config reaches the logger, and W&B files stay in the run.

- :class:`LoggerSaveConfigCallback` writes ``config.yaml`` as LightningCLI does and also hands the
  whole resolved config (every ``--config`` overlay and flag applied) to a Weights & Biases logger,
  under the ``config`` key next to the model and data hyperparameters that Lightning logs itself.
- It also writes a run record into every checkpoint of ``glow fit`` (``checkpoint["glow_run"]``, plain strings, so
  ``weights_only`` loading reads it): the resolved config as YAML, and the log directories (``lightning_logs/
  version_N``, one per resume) the training that led to this checkpoint wrote to. :func:`checkpoint_run` reads it
  back and :func:`datamodule_of_checkpoint` rebuilds the run's datamodule (notebooks/glow_demo.ipynb uses both):
  the newest ``version_N`` of a run directory may belong to another run or to a later resume.
- :func:`wandb_save_dir_in_run` puts a WandbLogger's files under ``trainer.default_root_dir``
  (``runs/cifar/wandb/...``) unless a ``save_dir`` is given, instead of the current directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
RUN_KEY = "glow_run"  # the checkpoint key of the run record


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` (rank 0) and log the resolved config to every W&B logger."""

    previous_log_dirs: tuple[str, ...] = ()  # from the checkpoint a fit resumes

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        root = os.path.abspath(trainer.default_root_dir)
        log_dir = trainer.log_dir  # where config.yaml went (all ranks: it broadcasts, as in super().setup)
        if log_dir is not None:
            log_dir = os.path.abspath(log_dir)
            log_dir = os.path.relpath(log_dir, root) if log_dir.startswith(root + os.sep) else log_dir
        self.run_record = {"root": root, "log_dir": log_dir, "config": self.parser.dump(self.config, skip_none=False)}

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.previous_log_dirs = tuple((checkpoint.get(RUN_KEY) or {}).get("log_dirs", ()))

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        record = getattr(self, "run_record", None)
        if record is None:
            return
        log_dirs = [*self.previous_log_dirs, *([record["log_dir"]] if record["log_dir"] else [])]
        checkpoint[RUN_KEY] = {"root": record["root"], "log_dirs": log_dirs, "config": record["config"]}

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, format="json_indented", skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": json.loads(config)})


def checkpoint_run(ckpt_path: str, ckpt: dict | None = None) -> dict[str, Any]:
    """The run record of a ``glow fit`` checkpoint: ``{"config": dict | None, "log_dirs": [existing folders]}``.

    ``log_dirs`` are the training's log folders (oldest first, one per resume) that still exist, looked up first
    next to the checkpoint (``<run>/checkpoints/X.ckpt`` -> ``<run>/lightning_logs/version_N``: the run folder
    may have moved), then under the run's original ``default_root_dir``. A checkpoint written without
    ``glow fit`` (or before the record existed) has ``config`` None and no log folders.
    """
    from ..io import load_checkpoint_file

    if ckpt is None:
        ckpt = load_checkpoint_file(ckpt_path)
    record = ckpt.get(RUN_KEY) if isinstance(ckpt, dict) else None
    if not record:
        return {"config": None, "log_dirs": []}
    here = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
    log_dirs = []
    for log_dir in record.get("log_dirs", []):
        candidates = [log_dir] if os.path.isabs(log_dir) else [os.path.join(r, log_dir) for r in (here, record["root"])]
        found = next((c for c in candidates if os.path.isdir(c)), None)
        if found and found not in log_dirs:
            log_dirs.append(found)
    return {"config": yaml.safe_load(record["config"]), "log_dirs": log_dirs}


def datamodule_of_checkpoint(ckpt_path: str, **overrides: Any):
    """The datamodule the checkpoint was trained on, from its run record (class and ``init_args``), with
    ``overrides`` (e.g. ``data_dir=`` on another machine) applied. Only ``glow_lightning.data`` classes are
    built: a checkpoint is not trusted to name code to import."""
    from .. import data

    config = checkpoint_run(ckpt_path)["config"]
    if not config or not isinstance(config.get("data"), dict):
        raise ValueError(
            f"{ckpt_path} holds no run record with data settings (written outside glow fit, or by an older glow-lightning)"
        )
    class_path = config["data"].get("class_path", "")
    module, _, name = class_path.rpartition(".")
    cls = getattr(data, name, None)
    if not module.startswith("glow_lightning.data") or not (
        isinstance(cls, type) and issubclass(cls, data.GlowDataModule)
    ):
        raise ValueError(f"{ckpt_path}: its datamodule {class_path!r} is not a glow_lightning.data class")
    return cls(**{**(config["data"].get("init_args") or {}), **overrides})


def wandb_save_dir_in_run(trainer_config: Namespace) -> None:
    """Default a WandbLogger's ``save_dir`` (Lightning's default: ``.``) to ``trainer.default_root_dir``."""
    logger = trainer_config.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    for spec in loggers:
        if not isinstance(spec, Namespace) or spec.get("class_path") != WANDB_LOGGER:
            continue
        init_args = spec.get("init_args") or Namespace()
        if init_args.get("save_dir") in (None, ".") and init_args.get("dir") is None:
            init_args["save_dir"] = trainer_config.get("default_root_dir") or "."
            spec["init_args"] = init_args
