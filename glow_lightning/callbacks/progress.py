"""GlowProgressBar: Lightning's TQDM bar, showing ``train/bpd`` without a host-device sync every batch.

Lightning converts every ``prog_bar=True`` metric logged on step to a Python number (``.item()``) after each
training batch, whether a bar is shown or not: one host-device sync per batch (issue 17 item 2). So
``train/bpd`` is logged with ``prog_bar=False`` and this bar reads it itself, from ``trainer.callback_metrics``,
after the steps that log it (:func:`~glow_lightning.metrics.logs_at`: the first, then every ``log_every_n_steps``,
when the loggers read it too) and at the end of an epoch;
between refreshes it shows the last value read.

It also redraws the training bar at most every ``min_interval`` seconds (0.2: five times a second; Lightning's bar
redraws after every batch, which costs ~0.3 ms of Python per batch: issue 17 item 4), and always at an epoch's
last batch, once per update (Lightning's draws the count, then again the metrics: two lines per update in a
redirected log). The validation, test and predict bars are throttled alike (Lightning's redraw after every batch:
one more ``\r`` line per batch in a redirected log), and always drawn at their last batch.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from typing_extensions import override

from ..metrics import logs_at

SHOWN = ("train/bpd",)  # logged on step without prog_bar; shown on the bar


class GlowProgressBar(TQDMProgressBar):
    """TQDM progress bar with ``train/bpd`` refreshed every ``log_every_n_steps`` (no sync per batch).

    Args:
        refresh_rate: redraw the bar every this many batches (as Lightning's ``TQDMProgressBar``; 0 hides it).
        leave: leave the finished epoch's bar on screen.
        min_interval: and at most every this many seconds (training, validation, test and predict bars; the last
            batch of an epoch or evaluation always).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, min_interval: float = 0.2):
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0 seconds, got {min_interval}")
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.min_interval = min_interval
        self._shown: dict[str, float] = {}
        self._in_batch = False
        self._drawn = float("-inf")  # time.monotonic() of the last training-bar redraw
        self._eval_drawn = float("-inf")  # ... of the last validation / test / predict bar redraw

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if getattr(trainer.fit_loop, "restarted_mid_epoch", False):
            # a resume in the middle of an epoch: Lightning skips on_train_epoch_start, so its bar said
            # "Training: 601/?" (no epoch, no total); show the epoch and count on from the batches already done,
            # in one redraw (on_train_epoch_start's reset would draw "Epoch 3: 0/1718" first)
            bar, done = self.train_progress_bar, trainer.fit_loop.epoch_loop.batch_progress.current.completed
            total = self.total_train_batches
            if total != trainer.num_training_batches:  # Lightning's steps left (max_steps, max_epochs -1): after done
                total = min(trainer.num_training_batches, done + total)
            bar.total = convert_inf(total)
            bar.initial = bar.n = done
            bar.set_description(f"Epoch {trainer.current_epoch}")

    @override
    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        # Lightning's, in one redraw: its reset() drew the new epoch's bar under the old name, and after a resumed
        # epoch with its initial count still set (a negative rate: "Epoch 1: 0/4 [00:00<-00:00, -83055.52it/s]")
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.initial = 0
        bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A signal (or an error) ends the run mid-bar: close the bars, so that the line that follows ("glow: stopped
        by SIGINT: ...") starts a line of its own instead of running on after the bar's last frame; that frame shows
        the batches done (the bar draws at most every min_interval)."""
        if trainer.state.fn == "fit":
            self._count_done(trainer)
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar,
                    self._predict_progress_bar):  # fmt: skip
            if bar is not None and not bar.disable:
                bar.close()

    def _count_done(self, trainer) -> None:
        """The training bar's count at the batches done, for the redraw that follows: throttled, it showed the last
        drawn batch (a run stopped by max_time at step 1,214 ended on "1212/1718")."""
        bar = self._train_progress_bar
        if bar is not None and not bar.disable and not trainer.sanity_checking:
            bar.n = trainer.fit_loop.epoch_loop.batch_progress.current.completed

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        self._count_done(trainer)  # redrawn with val/bpd at the validation's end
        super().on_validation_start(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._count_done(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if logs_at(trainer, trainer.global_step - 1):  # the step just done logged them: read them now
            self._read(trainer)
        bar, n, now = self.train_progress_bar, batch_idx + 1, time.monotonic()
        if bar is None or not self.is_enabled:
            return
        if n != bar.total and (n % self.refresh_rate or now - self._drawn < self.min_interval):
            return  # an epoch's last batch always draws
        self._drawn = now
        self._in_batch = True
        try:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        finally:
            self._in_batch = False
        if not bar.disable:  # one redraw with the count and the metrics (Lightning's bar draws twice per update)
            bar.n = n
            bar.refresh()

    def _eval_batch_end(self, bar, batch_idx: int) -> None:
        """Lightning's validation / test / predict batch end, throttled as the training bar."""
        n, now = batch_idx + 1, time.monotonic()
        if bar is None or not self.is_enabled or bar.disable:
            return
        if n != bar.total and (n % self.refresh_rate or now - self._eval_drawn < self.min_interval):
            return
        self._eval_drawn = now
        bar.n = n
        bar.refresh()

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(self.val_progress_bar, batch_idx)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(self.test_progress_bar, batch_idx)

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(self.predict_progress_bar, batch_idx)

    def _read(self, trainer) -> None:
        metrics = trainer.callback_metrics
        self._shown.update({k: float(metrics[k]) for k in SHOWN if k in metrics})  # a sync, every N steps

    @override
    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if not self._in_batch:  # epoch end, validation: not on the hot path
            self._read(trainer)
        items.update(self._shown)
        return items
