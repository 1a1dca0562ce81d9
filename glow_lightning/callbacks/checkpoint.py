"""GlowCheckpoint: ModelCheckpoint with glow-lightning's defaults and a refusal to clobber a run.

- A fixed ``dirpath`` (the CLI links it to ``<default_root_dir>/checkpoints``) so that
  ``glow fit ... --ckpt_path last`` finds ``last.ckpt`` again; Lightning's default versioned
  folders make ``last`` silently start from scratch.
- ``last.ckpt`` plus the best by ``val/bpd``; filenames written by hand, since a ``/`` in an
  auto-inserted metric name would make a subfolder.
- A new fit (no ``--ckpt_path``) into a directory that already holds checkpoints stops with a
  message instead of overwriting an earlier run.
- A fit first checks that the directory is writable and removes the temporary files of a writer
  that was killed. (Atomic writes and ``weights_only=True`` loads are the CheckpointIO's job:
  :class:`~glow_lightning.io.AtomicCheckpointIO`, which the ``glow`` CLI's trainer adds.)

Private library API used here (check on upgrades): ``ModelCheckpoint._fs``.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from ..io import check_writable, remove_stale_temporaries


class GlowCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` and the best checkpoints by validation bits/dim.

    Args:
        dirpath: checkpoint directory (set from ``trainer.default_root_dir`` by the ``glow`` CLI).
        filename: checkpoint name pattern (metric names written explicitly).
        monitor: metric that ranks checkpoints.
        mode: ``min`` or ``max`` of ``monitor``.
        save_top_k: how many best checkpoints to keep (-1 = all).
        save_last: also write ``last.ckpt`` at every save.
        every_n_epochs: save every this many epochs.
        every_n_train_steps: also save every this many optimizer steps (0 = off).
    """

    def __init__(
        self,
        *,
        dirpath: str | None = None,
        filename: str = "epoch{epoch:03d}-step{step:07d}-bpd{val/bpd:.4f}",
        monitor: str | None = "val/bpd",
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
    ):
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False,
        )

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.dirpath and trainer.is_global_zero:
            check_writable(self.dirpath, "checkpoint directory")
            remove_stale_temporaries(self.dirpath)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        # here, unlike in setup(), trainer.ckpt_path says whether this fit resumes
        if trainer.ckpt_path is not None or not self.dirpath:
            return
        if self._fs.isdir(self.dirpath) and any(
            str(p).endswith(".ckpt") for p in self._fs.ls(self.dirpath, detail=False)
        ):
            raise FileExistsError(
                f"{self.dirpath} already holds checkpoints of an earlier run: resume it with --ckpt_path last, "
                "or start a new run in another directory with --trainer.default_root_dir DIR"
            )
