"""Experiment tracking: the resolved ``glow`` config reaches the logger, and W&B files stay in the run.

- :class:`LoggerSaveConfigCallback` writes ``config.yaml`` as LightningCLI does and also hands the
  whole resolved config (every ``--config`` overlay and flag applied) to a Weights & Biases logger,
  under the ``config`` key next to the model and data hyperparameters that Lightning logs itself.
- :func:`wandb_save_dir_in_run` puts a WandbLogger's files under ``trainer.default_root_dir``
  (``runs/cifar/wandb/...``) unless a ``save_dir`` is given, instead of the current directory.
"""

from __future__ import annotations

import json

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` (rank 0) and log the resolved config to every W&B logger."""

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, format="json_indented", skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": json.loads(config)})


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
