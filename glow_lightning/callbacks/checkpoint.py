"""GlowCheckpoint: ModelCheckpoint with glow-lightning's defaults and a refusal to clobber a run.

- A fixed ``dirpath`` (the CLI links it to ``<default_root_dir>/checkpoints``) so that
  ``glow fit ... --ckpt_path last`` finds ``last.ckpt`` again; Lightning's default versioned
  folders make ``last`` silently start from scratch.
- ``last.ckpt`` plus the best by ``val/bpd``; filenames written by hand, since a ``/`` in an
  auto-inserted metric name would make a subfolder.
- A new fit (no ``--ckpt_path``) into a directory that already holds checkpoints stops with a
  message instead of overwriting an earlier run.
- ``last.ckpt`` is written by this class, not by ModelCheckpoint (which in Lightning 2.6 rewrites it only
  when a top-k file is saved, so it went stale on every plateau): after every validation, every
  ``every_n_train_steps``, every training epoch and at the end of training however it ends (max_epochs,
  max_steps, max_time, a stop signal), through ``trainer.save_checkpoint`` (the atomic CheckpointIO),
  once per global step, after the best file of that step is saved (so the callback state inside
  ``last.ckpt`` names the best file on disk and a resume tracks and removes it). With EMA, the
  end-of-training save happens at the last ``on_train_epoch_end``,
  before GlowEMA copies the average into the module, so ``current_model_state`` still holds the raw
  weights. A run stopped by the non-finite guard (NonFiniteTrainingError) writes nothing more.
- SIGTERM / SIGINT stop the fit after the current step and write ``last.ckpt``; SIGUSR1 (SLURM's
  requeue signal) writes it and training goes on (:mod:`~glow_lightning.callbacks.preemption`). The
  ``glow`` CLI turns the stop into exit code 143 / 130 and one line naming the checkpoint.
- A fit first checks that the directory is writable and removes the temporary files of a writer
  that was killed. (Atomic writes and ``weights_only=True`` loads are the CheckpointIO's job:
  :class:`~glow_lightning.io.AtomicCheckpointIO`, which the ``glow`` CLI's trainer adds.)

Private library API used here (check on upgrades): ``ModelCheckpoint._fs``, ``ModelCheckpoint._every_n_train_steps``,
``ModelCheckpoint._should_save_on_train_epoch_end``.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from ..console import say
from ..io import check_writable, join, remove_stale_temporaries
from .fid import FIDMonitor
from .invertibility import InvertibilityMonitor
from .preemption import SignalFlags

# the callbacks' metrics that the sanity check does not log
LOGGED_AFTER_SANITY = {FIDMonitor: ("val/fid",), InvertibilityMonitor: ("val/recon_error",)}


class UnknownMonitorError(ValueError):
    """``--checkpoint.monitor`` names a metric that validation does not log."""


class GlowCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` and the best checkpoints by validation bits/dim.

    Args:
        dirpath: checkpoint directory (set from ``trainer.default_root_dir`` by the ``glow`` CLI).
        filename: checkpoint name pattern (metric names written explicitly).
        monitor: metric that ranks checkpoints: ``val/bpd``, or another that every validation logs (``val/acc`` of
            a class-conditional model, ``val/recon_error``); a name validation does not log is refused at the sanity
            check. A fit stopped before its first validation keeps ``last.ckpt`` only.
        mode: ``min`` or ``max`` of ``monitor``.
        save_top_k: how many best checkpoints to keep (-1 = all).
        save_last: also keep ``last.ckpt``, the newest state (rewritten at every validation, every
            ``every_n_train_steps``, every epoch end and when training ends or is stopped by a signal).
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
            save_last=False,  # last.ckpt is written here (see the module docstring)
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False,
        )
        self.keep_last = save_last
        self.signals = SignalFlags()
        self._last_step_written: int | None = None
        self._fitting = True  # set by setup(): only a fit restores the tracking of earlier checkpoints
        self._validated = False  # whether this fit has run a validation (sanity check excluded)

    @property
    def last_path(self) -> str | None:
        """``<dirpath>/last.ckpt`` (None without a directory or with ``save_last`` off)."""
        return (
            join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            if self.dirpath and self.keep_last
            else None
        )

    def write_last(self, trainer) -> str | None:
        """Write ``last.ckpt`` unless it already holds this global step; on every rank (rank 0 writes)."""
        path = self.last_path
        if (
            path is None
            or trainer.fast_dev_run
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_step_written == trainer.global_step
        ):
            return None
        self.last_model_path = path
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_step_written = trainer.global_step
        return path

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run moved or copied to another folder (its ``dirpath`` changed) goes on tracking its checkpoints
        when they are in the new folder: their paths are read relative to the old one. (Lightning keeps only
        ``best_model_path``, into the old folder: a resume kept the moved best file forever and wrote a second.)

        Outside a fit (``glow test / validate / predict --ckpt_path``) nothing is tracked and nothing loaded:
        Lightning warned that the dirpath had changed whenever the checkpoint came from another folder or machine."""
        if not self._fitting:
            return
        old = state_dict.get("dirpath")
        if self.dirpath and old and old != self.dirpath:
            state_dict = self._moved(state_dict, old) or state_dict
        super().load_state_dict(state_dict)

    def _moved(self, state: dict[str, Any], old: str) -> dict[str, Any] | None:
        """``state`` with the paths under ``old`` moved to ``dirpath``; None unless every tracked file is there."""
        prefix = old.rstrip("/") + "/"

        def move(path: str | None) -> str | None:
            return join(self.dirpath, path[len(prefix) :]) if path and path.startswith(prefix) else path

        tracked = [p for p in (state.get("best_model_path"), state.get("kth_best_model_path")) if p]
        tracked += list(state.get("best_k_models") or {})
        if not tracked or not all(p.startswith(prefix) and self._fs.exists(move(p)) for p in tracked):
            return None
        return state | {
            "dirpath": self.dirpath,
            "best_model_path": move(state.get("best_model_path")),
            "kth_best_model_path": move(state.get("kth_best_model_path")),
            "best_k_models": {move(p): score for p, score in (state.get("best_k_models") or {}).items()},
            "last_model_path": move(state.get("last_model_path")),
        }

    @override
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        mark_epoch_unfinished(trainer, checkpoint)
        record_batch_geometry(trainer, checkpoint)

    @override
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer.state.fn == TrainerFn.FITTING:
            rescale_epoch_position(trainer, checkpoint)  # before Lightning restores its loops from it

    def _install_signals(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.signals.install(trainer)

    @override
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install_signals(trainer)  # before the validation workers are forked

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._install_signals(trainer)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.signals.sync(trainer)
        n = self._every_n_train_steps
        requested, self.signals.save_requested = self.signals.save_requested, False
        if requested or (n >= 1 and trainer.global_step % n == 0):
            path = self.write_last(trainer)
            if requested and path and trainer.is_global_zero:
                say(f"glow: save requested by signal: wrote {path} (global step {trainer.global_step})", all_ranks=True)

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True
        self._check_monitor(trainer)
        super().on_validation_end(trainer, pl_module)
        # a validation at the end of an epoch (or at a mid-epoch stop by max_time / EarlyStopping) has its best
        # file saved by on_train_epoch_end, which then writes last.ckpt with that file in its callback state
        if not self._should_save_on_train_epoch_end(trainer):
            self.write_last(trainer)

    def _check_monitor(self, trainer) -> None:
        """A monitor that validation does not log (``--checkpoint.monitor val/bdp``): one clear error at the sanity
        check, seconds into the run, instead of Lightning's at the end of the first epoch. Training metrics
        (``train/...``) and those of callbacks that skip the sanity check (``val/fid``, ``val/recon_error``) are
        logged only later: Lightning checks those."""
        after_sanity = {name for names in LOGGED_AFTER_SANITY.values() for name in names}
        later = self.monitor is None or self.monitor.startswith("train/") or self.monitor in after_sanity
        if later or self.monitor in trainer.callback_metrics:
            return
        logged = ", ".join(sorted(k for k in trainer.callback_metrics if k not in ("epoch", "step")))
        coming = sorted(  # the switched-on callbacks' metrics that the validations so far did not log
            name
            for cb in trainer.callbacks
            for kind, names in LOGGED_AFTER_SANITY.items()
            if isinstance(cb, kind) and cb.every_n_epochs
            for name in names
            if name not in trainer.callback_metrics
        )
        later_note = f"; its callbacks log later: {', '.join(coming)}" if coming else ""
        raise UnknownMonitorError(
            f"--checkpoint.monitor {self.monitor!r} is not a metric this run logs (validation logged: {logged}"
            f"{later_note})"
        )

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # a fit stopped (max_steps, max_time) before its first validation has no val/bpd to rank a best file by:
        # last.ckpt only, without Lightning's warning "could not find the monitored key ... Did you call log(...)?"
        # (after a validation a missing key is still Lightning's error: a mistyped --checkpoint.monitor)
        if self._validated or self.monitor is None or self.monitor in trainer.callback_metrics:
            super().on_train_epoch_end(trainer, pl_module)
        self.write_last(trainer)  # also the end of training (runs before GlowEMA's on_train_end)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)  # only if no epoch end saw this step

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # e.g. NonFiniteTrainingError: the checkpoints from before the failing steps stay as they are
        signum = self.signals.signum
        path = self.write_last(trainer) if trainer.global_step > 0 else None
        # read by glow_lightning.cli.main: the exit code and the line saying where to resume from
        exception.glow_signal = signum  # type: ignore[attr-defined]
        exception.glow_checkpoint = path or (self.last_model_path or None)  # type: ignore[attr-defined]
        exception.glow_step = trainer.global_step  # type: ignore[attr-defined]
        exception.glow_report = trainer.is_global_zero  # type: ignore[attr-defined]  (one line, from rank 0)

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.signals.uninstall()

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting, self._validated = stage == "fit", False
        if stage == "fit" and self.dirpath and trainer.is_global_zero:
            check_writable(self.dirpath, "checkpoint directory")
            remove_stale_temporaries(self.dirpath)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        # here, unlike in setup(), trainer.ckpt_path says whether this fit resumes
        if trainer.ckpt_path is None:
            self.refuse_an_earlier_run()

    def refuse_an_earlier_run(self) -> None:
        """A new fit (no --ckpt_path) into a checkpoint directory that holds checkpoints: FileExistsError, so that
        neither run's files are mixed up. The CLI asks before the trainer starts (no log folder is made then)."""
        if (
            self.dirpath
            and self._fs.isdir(self.dirpath)
            and any(str(p).endswith(".ckpt") for p in self._fs.ls(self.dirpath, detail=False))
        ):
            raise FileExistsError(
                f"{self.dirpath} already holds checkpoints of an earlier run: resume it with --ckpt_path last, "
                "or start a new run in another directory with --trainer.default_root_dir DIR"
            )


def mark_epoch_unfinished(trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint written at the end of an epoch that was stopped part-way (``max_time``, ``max_steps``,
    EarlyStopping or another ``trainer.should_stop`` mid-epoch) says that the epoch is unfinished.

    Lightning counts such an epoch as processed before ``on_train_epoch_end`` (where last.ckpt and the best file are
    written), so a resume started the next epoch: the rest of the stopped one was skipped (on MNIST, 1,104 of 1,718
    batches after a one-minute run). With the epoch's ``processed`` count set back, the resume is Lightning's
    mid-epoch restart, as after a signal: it runs the batches that were left."""
    loop = trainer.fit_loop
    batches = loop.epoch_loop.batch_progress
    epochs = loop.epoch_progress
    in_epoch_end = epochs.current.processed == epochs.current.started > epochs.current.completed
    if not in_epoch_end or batches.is_last_batch or batches.current.completed >= trainer.num_training_batches:
        return
    saved = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if saved is None:
        return
    for counts in (saved["current"], saved["total"]):
        counts["processed"] -= 1
        counts["completed"] = min(counts["completed"], counts["processed"])


GEOMETRY_KEY = "glow_batch_geometry"  # the checkpoint key: images per batch on each device, and the devices


def record_batch_geometry(trainer, checkpoint: dict[str, Any]) -> None:
    """Keep the batch size and the number of devices in the checkpoint (see :func:`rescale_epoch_position`)."""
    datamodule = trainer.datamodule
    if hasattr(datamodule, "resumes_by_count"):
        checkpoint[GEOMETRY_KEY] = {"batch_size": datamodule.batch_size, "world_size": trainer.world_size}


def rescale_epoch_position(trainer, checkpoint: dict[str, Any]) -> None:
    """A checkpoint from the middle of an epoch resumed with another batch size or number of devices: its count of
    the epoch's batches done, converted to the new batches, so that the resume goes on after the images done.

    Lightning counts the batches done per device and restarts the epoch at that count; the datamodule skips that many
    of the new batches' images in the epoch's order, which is the same on any number of devices (EpochRandomSampler,
    EpochDistributedSampler). Unconverted, a larger batch ended the epoch at once (1,214 of 1,718 batches of 32 done
    are more than the 859 batches of 64) and a smaller one skipped too few images. When the images done are not a
    whole number of new batches, the last of them are trained on again (fewer than one batch over all devices)."""
    saved, datamodule = checkpoint.get(GEOMETRY_KEY), trainer.datamodule
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    if not saved or not hasattr(datamodule, "resumes_by_count") or "epoch_loop.batch_progress" not in fit:
        return
    old = saved["batch_size"] * saved["world_size"]
    new = datamodule.batch_size * trainer.world_size
    epochs, batches = fit["epoch_progress"]["current"], fit["epoch_loop.batch_progress"]
    done = batches["current"]["processed"]
    if old == new or not epochs["started"] > epochs["processed"] or not done:
        return  # the same images per batch, or not in the middle of an epoch: nothing to convert
    if not datamodule.resumes_by_count:  # streaming: litdata's loader resumes by its own per-worker counts
        say(
            f"glow: warning: resuming in the middle of epoch {epochs['processed']} with {new:,} images per batch over "
            f"all devices (checkpoint: {old:,}): the streamed data resumes by its own counts, so the rest of this "
            "epoch skips some of its images and repeats others (the same --data.batch_size and devices resume exactly)"
        )
        return
    converted = done * old // new
    for counts in (batches["current"], batches["total"]):
        for key in counts:  # ready, started, processed, completed: moved together
            counts[key] = max(0, counts[key] + converted - done)
    again = done * old - converted * new
    say(
        f"glow: resuming in the middle of epoch {epochs['processed']} with {new:,} images per batch over all devices "
        f"(checkpoint: {old:,}): it goes on after its first {converted * new:,} images"
        + (f" ({again:,} of the checkpoint's last images again)" if again else "")
    )
