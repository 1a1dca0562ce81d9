"""GlowModule: the LightningModule that trains a :class:`~glow_lightning.flow.Glow`.

It holds no flow maths: the loss is the flow's bits/dim (Kingma & Dhariwal, 2018, section 5), the
optimizer is Adam (or Adamax) with linear warmup (the paper's lr 1e-3 with warmup), and ActNorm's
data-dependent initialisation runs once, at the start of fit, from training data (DESIGN.md rule 1), unless
the weights come from another run's checkpoint (the warm start, ``init_weights``).
An update whose loss or gradients are not finite is skipped on every rank and counted
(``train/skipped_steps``); too many in a row stop training: the
:class:`~glow_lightning.callbacks.nonfinite.NonFiniteGuard` callback, which ``configure_callbacks`` adds.

Private library API used here (check on upgrades): ``torch.utils._foreach_utils._get_fused_kernels_supported_devices``.
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from .callbacks.nonfinite import NonFiniteGuard, has_grad_scaler, optimizer_params
from .callbacks.progress import GlowProgressBar
from .console import say
from .flow import Glow
from .flow.checks import first_line
from .flow.dequantization import VariationalDequantizer, dequantize, unit_noise
from .flow.glow import ARCH_KEYS, CompileMode, checkpoint_arch
from .flow.layers import Coupling, CouplingNorm, Permutation
from .io import load_checkpoint_file, require_glow_checkpoint
from .metrics import BitsPerDim, logs_at

# the hyperparameters a checkpoint's weights depend on: the flow's, and the variational dequantizer (a module)
ARCH_CHECKED = (*ARCH_KEYS, "dequantization")


def steps(n: int) -> str:
    """``1 step``, ``2,000 steps``."""
    return f"{n:,} step{'' if n == 1 else 's'}"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into (another architecture); ``differ``: the
    hyperparameters that differ, ``{name: the checkpoint's value}``."""

    def __init__(self, message: str, differ: dict[str, Any] | None = None):
        super().__init__(message)
        self.differ = differ or {}


def make_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0, allow_fused: bool = True
) -> torch.optim.Optimizer:
    """GlowModule's optimizer: Adam (fused single-kernel update where torch supports it for the
    parameters' device: CPU, CUDA, ...; see BENCHMARKS.md) or Adamax. ``allow_fused=False`` under a
    GradScaler (16-mixed): Lightning unscales the gradients before clipping only for optimizers that do not
    unscale internally. The fused update also takes the non-finite guard's skip on the device (``found_inf``)."""
    params = list(params)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr, weight_decay=weight_decay)
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older/newer torch
        fused_devices = ["cpu", "cuda"]
    fused = (
        allow_fused and bool(params) and all(p.is_floating_point() and p.device.type in fused_devices for p in params)
    )
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class GlowModule(L.LightningModule):
    """Train Glow on images; the loss is bits per dimension.

    Args:
        in_channels: image channels (linked from the datamodule).
        image_size: image height and width (linked from the datamodule).
        levels: number of levels L of the multi-scale flow.
        steps_per_level: flow steps K per level.
        hidden_channels: width of the coupling networks.
        coupling: ``affine`` or ``additive`` coupling.
        permutation: ``invconv_lu``, ``invconv``, ``reverse`` or ``shuffle``.
        learn_top: learn the top prior's mean and log-scale.
        n_bits: bits per colour channel (linked from the datamodule).
        coupling_norm: the coupling networks' hidden layers: ``actnorm`` (openai/glow's: no biases, a
            data-initialised ActNorm after each hidden convolution) or ``none`` (biases); see BENCHMARKS.md.
        num_classes: > 0 for a class-conditional top prior and a classifier on the top latent
            (linked from the datamodule: set ``--data.class_conditional true``).
        y_weight: weight of the classifier's cross-entropy (in bits per image) added to the
            bits/dim loss of a class-conditional model (paper section 5; 0.01 as in openai/glow).
        optimizer: ``adam`` (default) or ``adamax`` (as in openai/glow).
        lr: peak learning rate, reached after the warmup.
        weight_decay: L2 penalty added by the optimizer (0 = off).
        warmup_steps: optimizer steps of linear learning-rate warmup from 0 (0 = off).
        warmup_fraction: if set (0 < f < 1), the warmup is at most this fraction of the planned optimizer steps:
            ``min(warmup_steps, f x planned)``, so a short run is not spent warming up and a long one keeps
            ``warmup_steps``. The planned steps are resolved once, at the start of fit: from ``max_steps``, or
            ``max_epochs`` x the batches per epoch, or, with ``max_time``, from the step time measured over the first
            2% of it (the run then ends at whichever limit comes first; until then, with ``max_steps`` or
            ``max_epochs`` also set, the plan follows them); ``glow fit`` prints the result, the
            checkpoint keeps it. A resume with other limits plans again and moves the lr from the checkpoint's
            plan to the new one over the new warmup's length.
        schedule: after the warmup, keep the learning rate ``constant`` or decay it to zero with a
            ``cosine`` over the rest of the planned steps (resolved as for ``warmup_fraction``).
        init_batch_size: training images used for ActNorm's data-dependent initialisation.
        dequantization: ``uniform`` noise, or ``variational``: noise from a small conditional flow
            q(u | x) trained jointly (Flow++); the loss and bits/dim are then the variational bound.
        iw_samples: S > 0 also logs ``test/bpd_iw``, the importance-weighted bound with S
            dequantization samples per image (0 = off). Not taken from a checkpoint.
        max_consecutive_skips: an optimizer step whose loss or gradients are not finite is skipped
            (counted as ``train/skipped_steps``); after this many skips in a row training stops with
            an error naming the step and the first layer whose output became non-finite.
        compile: ``torch.compile`` each flow step for training (``true`` or a mode: ``default``,
            ``reduce-overhead``, ``max-autotune``); see BENCHMARKS.md.
        memory_saving: ``false``; ``recompute`` (or ``true``): recompute the coupling networks in the backward
            pass instead of storing their activations (~1/10 of the activation memory at the paper config,
            ~1.3x the step time); ``invert``: keep only each level's output and rebuild every step's input with
            its inverse in the backward pass (reversible backprop: activation memory O(1) in depth, ~1/40 of
            plain at the paper config, ~1.4-1.5x the step time). See BENCHMARKS.md.
        init_weights: warm start: a ``glow fit`` checkpoint (``.ckpt``, local path or fsspec URL) whose weights
            this run starts from, with a fresh optimizer, schedule and step count (global step 0); its
            architecture must match, and its ActNorm counts as initialised (no data-dependent init). From an
            EMA run, the checkpoint's ``state_dict``, i.e. the EMA weights, are taken. Not loaded when a fit
            resumes (``--ckpt_path``): the ``glow`` command refuses the two together, unless the checkpoint's run
            was itself warm-started from this file (the same command plus ``--ckpt_path last``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        levels: int = 3,
        steps_per_level: int = 32,
        hidden_channels: int = 512,
        coupling: Coupling = "affine",
        permutation: Permutation = "invconv_lu",
        coupling_norm: CouplingNorm = "actnorm",
        learn_top: bool = True,
        n_bits: int = 8,
        num_classes: int = 0,
        y_weight: float = 0.01,
        optimizer: Literal["adam", "adamax"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        warmup_fraction: float | None = None,
        schedule: Literal["constant", "cosine"] = "constant",
        init_batch_size: int = 256,
        dequantization: Literal["uniform", "variational"] = "uniform",
        iw_samples: int = 0,
        max_consecutive_skips: int = 10,
        compile: bool | CompileMode = False,
        memory_saving: bool | Literal["recompute", "invert"] = False,
        init_weights: str | None = None,
    ):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        if warmup_fraction is not None and not 0 < warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be between 0 and 1 (exclusive), got {warmup_fraction!r}")
        if init_batch_size < 1:
            raise ValueError(f"init_batch_size must be >= 1, got {init_batch_size!r}")
        if not y_weight >= 0:
            raise ValueError(f"y_weight must be >= 0, got {y_weight!r}")
        if dequantization not in ("uniform", "variational"):
            raise ValueError(f"dequantization must be 'uniform' or 'variational', got {dequantization!r}")
        if not isinstance(iw_samples, int) or iw_samples < 0:
            raise ValueError(f"iw_samples must be an integer >= 0, got {iw_samples!r}")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be an integer >= 1, got {max_consecutive_skips!r}")
        self.save_hyperparameters()
        self.flow = Glow(**{k: self.hparams[k] for k in ARCH_KEYS}, compile=compile, memory_saving=memory_saving)
        self.train_bpd, self.val_bpd, self.test_bpd = BitsPerDim(), BitsPerDim(), BitsPerDim()
        self.test_bpd_iw = BitsPerDim()
        self.dequantizer = VariationalDequantizer(in_channels, n_bits) if dequantization == "variational" else None
        if num_classes:  # classification accuracy of the top-latent classifier
            self.val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._initial_weights_loaded = False  # the warm start happens once (load_initial_weights)
        self.skipped_steps = 0  # set by the NonFiniteGuard callback, which keeps (and saves) the counts
        self._log_epoch_bpd = True  # train/bpd_epoch is logged on the first batch of each epoch
        self.lr_plan: dict[str, Any] | None = None  # the resolved warmup and schedule length (see resolve_lr_plan)
        self._loaded_lr_plan: dict[str, Any] | None = None
        # (step, time) where max_time step timing started; (step it starts at, None) before that
        self._plan_timing: tuple[int, float | None] | None = None
        self._pace: list[tuple[int, float]] | None = None  # (step, time) marks a timed plan's re-plans time steps from
        self._resumed_factor: float | None = None  # a resume's lr factor under the checkpoint's plan, until re-planned
        self._resumed_step = 0  # the checkpoint's global step (a max_time plan is made some steps later)
        self._provisional_warmup: int | None = None  # while a max_time plan is timed: warmup_fraction of max_steps

    # ------------------------------------------------------------------ steps
    def _labels(self, batch: dict) -> torch.Tensor | None:
        return batch["label"] if self.flow.num_classes else None

    def _log_prob_terms(self, batch: dict, x: torch.Tensor | None = None):
        """Per-level prior log-probs, logdet and log q(u | bins) (0 for uniform noise), each (B,) nats,
        and the top-latent classifier's logits (``None`` for an unconditional model), in one pass.

        ``x``: dequantized images (default ``batch["x"]``); a variational dequantizer uses their noise as its base noise.
        """
        x = batch["x"] if x is None else x
        log_q = x.new_zeros(x.shape[0])
        if self.dequantizer is not None:
            u, log_q = self.dequantizer(batch["bins"], unit_noise(x, batch["bins"], self.flow.n_bits))
            x = dequantize(batch["bins"], u, self.flow.n_bits)
        prior_terms, logdet, logits = self.flow.log_prob_terms_and_logits(x, self._labels(batch))
        return prior_terms, logdet, log_q, logits

    def _log_prob(self, batch: dict, x: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) - log q(u | bins) in nats (B,): bits/dim of it (BitsPerDim) is the dequantization bound."""
        return self._log_prob_and_logits(batch, x)[0]

    def _log_prob_and_logits(self, batch: dict, x: torch.Tensor | None = None):
        prior_terms, logdet, log_q, logits = self._log_prob_terms(batch, x)
        return torch.stack(prior_terms).sum(0) + logdet - log_q, logits

    def _iw_log_prob(self, batch: dict) -> torch.Tensor:
        """logmeanexp over S noise draws of log p(x_s) - log q(u_s | bins): the importance-weighted bound (B,).

        Draw s is the datamodule's evaluation noise draw s; draw 0 is ``batch["x"]``.
        """
        draws = [batch["x"]] + [
            self.trainer.datamodule.evaluation_draw(batch["bins"], batch["index"], s)
            for s in range(1, self.hparams.iw_samples)
        ]
        log_w = torch.stack([self._log_prob(batch, x) for x in draws])  # (S, B)
        return torch.logsumexp(log_w, 0) - math.log(len(draws))

    def _shared_step(self, batch: dict, stage: str) -> torch.Tensor:
        log_prob, logits = self._log_prob_and_logits(batch)  # (B,) nats
        metric = getattr(self, f"{stage}_bpd")
        metric.update(log_prob, self.flow.dims, self.flow.n_bits)
        loss = (-log_prob / (self.flow.dims * math.log(2))).mean() + self.flow.n_bits  # this batch's bits/dim
        if stage == "train":  # train/bpd: this batch's value; train/bpd_epoch: the epoch's (no Lightning suffixes)
            if logs_at(self.trainer, self.trainer.global_step):  # not prog_bar: GlowProgressBar shows it
                self.log("train/bpd", loss.detach(), on_step=True, on_epoch=False)
            if self._log_epoch_bpd:  # once per epoch is enough: the metric accumulates by itself
                self.log("train/bpd_epoch", metric, on_step=False, on_epoch=True)
                self._log_epoch_bpd = False
        else:
            self.log(f"{stage}/bpd", metric, on_step=False, on_epoch=True, prog_bar=True)
        if logits is not None:  # class-conditional: + y_weight * cross-entropy in bits
            y_bits = F.cross_entropy(logits, batch["label"].long()) / math.log(2)
            if stage == "train":
                self.log("train/y_bits", y_bits, on_step=True, on_epoch=True)
            else:
                accuracy = getattr(self, f"{stage}_acc")
                accuracy.update(logits, batch["label"])
                self.log(f"{stage}/acc", accuracy, on_epoch=True)
            loss = loss + self.hparams.y_weight * y_bits
        return loss

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The loss; on-step metrics only on the steps that log them (:func:`~glow_lightning.metrics.logs_at`):
        Lightning writes them to the loggers every ``log_every_n_steps``, and a logged Python number (the lr)
        becomes a device tensor, a blocking copy on CUDA."""
        loss = self._shared_step(batch, "train")
        if logs_at(self.trainer, self.trainer.global_step):
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    @override
    def on_train_epoch_start(self) -> None:
        self._log_epoch_bpd = True

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        """The non-finite guard (skips, counts and stops; see :mod:`glow_lightning.callbacks.nonfinite`), and
        :class:`~glow_lightning.callbacks.progress.GlowProgressBar` in place of Lightning's default bar."""
        callbacks: list[L.Callback] = [NonFiniteGuard()]
        if type(self._trainer.progress_bar_callback if self._trainer else None) is TQDMProgressBar:
            callbacks.append(GlowProgressBar())  # replaces the default bar (train/bpd without a sync per batch)
        return callbacks

    @override
    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip as Lightning does (``--trainer.gradient_clip_val`` / ``_algorithm``) with no host sync, also for
        fused Adam under bf16-mixed (Lightning's AMP plugin refuses clipping for optimizers that unscale
        internally; with no GradScaler there is nothing to unscale). A non-finite norm leaves non-finite
        gradients: the non-finite guard skips that step. By norm, the guard clips with the norm it computed for
        this step (:meth:`~glow_lightning.callbacks.nonfinite.NonFiniteGuard.clip`: for fused Adam, inside the
        optimizer's kernel); without it, one foreach pass computes the norm and scales."""
        if not gradient_clip_val:
            return
        by_value = gradient_clip_algorithm == "value"  # a str enum of Lightning: str() of it is its class name
        # the guard is looked up, not kept on the module: the module must stay picklable
        guard = next((c for c in self.trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        if not by_value and guard is not None and guard.clip(self.trainer, optimizer, gradient_clip_val):
            return
        params = [p for p in optimizer_params(optimizer) if p.grad is not None]
        if by_value:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True, error_if_nonfinite=False)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "test")
        if self.hparams.iw_samples:
            self.test_bpd_iw.update(self._iw_log_prob(batch), self.flow.dims, self.flow.n_bits)
            self.log("test/bpd_iw", self.test_bpd_iw, on_step=False, on_epoch=True)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per image: bpd and its parts in bits/dim (they add up to bpd): each level's prior, the
        log-determinant, the dequantization term log q / (D ln 2) (0 for uniform) and the discretization n_bits."""
        prior_terms, logdet, log_q, _ = self._log_prob_terms(batch)
        to_bits = -1.0 / (self.flow.dims * math.log(2))
        log_prob = torch.stack(prior_terms).sum(0) + logdet - log_q
        row = {"index": batch["index"], "label": batch["label"], "bpd": log_prob * to_bits + self.flow.n_bits}
        for level, term in enumerate(prior_terms, start=1):
            row[f"bpd_level{level}"] = term * to_bits
        row["bpd_logdet"] = logdet * to_bits
        row["bpd_dequantization"] = -log_q * to_bits
        row["bpd_discretization"] = torch.full_like(log_q, float(self.flow.n_bits))
        return row

    # ------------------------------------------------------------ data init
    @override
    def on_fit_start(self) -> None:
        """The warm start (``init_weights``), then ActNorm's data-dependent init: once, on training data, identical
        on every rank; neither on resume. Weights from a warm start count as initialised."""
        timer = self._timer() if self.trainer.ckpt_path is not None else None
        if timer is not None and timer.time_remaining("train") <= 0:  # Lightning says "Time limit reached" only
            limit = round(timer.time_elapsed("train") + timer.time_remaining("train"))
            say(
                f"glow: this run has had its --trainer.max_time ({datetime.timedelta(seconds=limit)}) already: "
                "resume with a later --trainer.max_time to train on"
            )
        if self.hparams.init_weights and self.trainer.ckpt_path is None and not self._initial_weights_loaded:
            self.load_initial_weights(self.hparams.init_weights)
        if self.flow.is_initialized:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "init_batch"):
            raise RuntimeError(
                "ActNorm needs a data-dependent initialisation: train with a glow_lightning datamodule, "
                "or call module.flow.initialize(images) before trainer.fit()"
            )
        batch = datamodule.init_batch(self.hparams.init_batch_size, self.device)
        self.flow.initialize(batch["x"], self._labels(batch))

    # ------------------------------------------------------------- optimizer
    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step``: linear warmup, then the schedule.

        Uses :attr:`lr_plan` once resolved; before that (and outside fit) ``warmup_steps`` and the trainer's
        estimated steps."""
        anchor = None
        if self.lr_plan is not None:
            warmup, total = self.lr_plan["warmup"], self.lr_plan["total"]
            anchor = self.lr_plan.get("anchor")
        else:
            warmup, total = self._provisional_warmup or self.hparams.warmup_steps, None
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if self.hparams.schedule == "cosine" and step >= warmup:
            if total is None:
                total = self.trainer.estimated_stepping_batches
            total = max(total, warmup + 1)
            if math.isfinite(total):
                factor *= 0.5 * (1.0 + math.cos(math.pi * self._progress(step, warmup, total, anchor)))
        ramp = self.lr_plan.get("ramp") if self.lr_plan is not None else None
        if ramp is not None and ramp[0] <= step < ramp[0] + ramp[2]:  # a resume's way from the old plan to this one
            start, before, length = ramp
            factor = before + (factor - before) * (step - start) / length
        return factor

    @staticmethod
    def _progress(step: int, warmup: int, total: float, anchor: list | None) -> float:
        """The cosine's progress (0..1) at ``step``: linear from the end of warmup to ``total``, or, after a
        max_time re-plan, linear from the ``anchor`` (step, progress there) to ``total``, so the lr stays
        continuous when the planned end moves."""
        start, done = anchor if anchor is not None else (warmup, 0.0)
        if step < start:  # before the last re-plan (not used in training: the lr is only asked for now)
            return done * (step - warmup) / max(start - warmup, 1)
        return min(1.0, done + (1.0 - done) * (step - start) / max(total - start, 1))

    # a max_time plan times the steps after PLAN_SKIP (allocator and kernel warm-up), over at least PLAN_TIMED steps
    # and PLAN_SHARE of the time limit: planning too few steps would leave the run's end at lr 0
    PLAN_SKIP, PLAN_TIMED, PLAN_SHARE = 5, 20, 0.02
    # then the plan is made again every REPLAN_SHARE of the planned steps from the mean step time so far, so a
    # slow start (another program busy while the first steps were timed) does not leave the run's end at lr 0
    REPLAN_SHARE = 0.05

    def _plan_inputs(self) -> dict[str, Any]:
        trainer = self.trainer
        timer = self._timer()
        return {
            "warmup_steps": self.hparams.warmup_steps,
            "warmup_fraction": self.hparams.warmup_fraction,
            "schedule": self.hparams.schedule,
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
            "max_time_s": None if timer is None else round(timer.time_elapsed() + timer.time_remaining()),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }

    def _timer(self):
        from lightning.pytorch.callbacks import Timer

        return next(
            (c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None
        )

    def _warmup_for(self, total: int | None) -> int:
        """``warmup_steps``, or ``warmup_fraction`` of ``total`` planned steps where that is shorter: a short run warms
        up for its share, a long one for warmup_steps."""
        fraction = self.hparams.warmup_fraction
        if fraction is None or total is None:
            return self.hparams.warmup_steps
        return min(self.hparams.warmup_steps, max(1, round(fraction * total)))

    def _needs_plan(self) -> bool:
        return self.hparams.warmup_fraction is not None or self.hparams.schedule == "cosine"

    def resolve_lr_plan(self, planned_steps: float, source: str, timed: bool = False) -> None:
        """Fix the warmup and the schedule's length from the planned optimizer steps; print it in one line.

        ``timed``: the plan comes from a max_time (and the step time); it is made again every
        ``REPLAN_SHARE`` of its steps (:meth:`_replan`)."""
        total = int(planned_steps) if math.isfinite(planned_steps) else None
        fraction = self.hparams.warmup_fraction
        if fraction is not None and total is None:
            raise ValueError(
                "warmup_fraction needs a planned run length: set --trainer.max_steps, --trainer.max_epochs or "
                "--trainer.max_time"
            )
        warmup = self._warmup_for(total)
        before = self._resumed_factor
        self.lr_plan = {"warmup": warmup, "total": total, "source": source, "inputs": self._plan_inputs()}
        if timed and total is not None:
            self.lr_plan["every"] = max(self.PLAN_TIMED, round(self.REPLAN_SHARE * total))
            self.lr_plan["planned_at"] = self.trainer.global_step
        if self.hparams.schedule == "cosine" and total is not None:
            after = f"cosine decay to 0 at step {total:,}"
        else:
            after = "constant" if self.hparams.schedule == "constant" else "cosine (no planned end: constant)"
        say(f"glow: lr schedule: warmup {steps(warmup)}, then {after} (planned steps: {source})")
        if before is not None:
            # a resume whose limits or schedule settings changed: the lr goes from where the checkpoint's plan has
            # it now to the new plan over a warmup's length, not at once (a jump from a finished cosine's ~0 to the
            # full lr undid a 10-minute MNIST run: val/bpd 1.26 -> 1.99)
            step = self.trainer.global_step
            length = max(1, warmup)
            self.lr_plan["ramp"] = [step, before, length]
            self._resumed_factor = None
            since = f" from step {step:,}" if step != self._resumed_step else ""  # a max_time plan: timed first
            say(
                f"glow: lr schedule: resumed at step {self._resumed_step:,} with the checkpoint's plan at lr "
                f"{before * self.hparams.lr:.3g} (x{before:.3g} of --model.lr); it reaches the new plan over "
                f"{steps(length)}{since}"
            )
        self._apply_lr()

    def _apply_lr(self) -> None:
        """Set the optimizer's lr to base lr x :meth:`lr_factor` at the scheduler's current step."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "base_lrs", None) is None:
                continue
            for base, group in zip(scheduler.base_lrs, scheduler.optimizer.param_groups):
                group["lr"] = base * self.lr_factor(scheduler.last_epoch)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """With ``max_time``: time the first steps, then resolve the plan (steps at this pace until the limit);
        from then on, make it again every ``lr_plan["every"]`` steps at the mean pace so far."""
        if self._plan_timing is None:
            if self.lr_plan is not None and "every" in self.lr_plan:
                self._replan()
            return
        step = self.trainer.global_step
        start_step, start_time = self._plan_timing
        if start_time is None:
            if step >= start_step:
                self._plan_timing = (step, time.perf_counter())
            return
        timer = self._timer()
        elapsed = time.perf_counter() - start_time
        if step - start_step < self.PLAN_TIMED:
            return
        limit = timer.time_elapsed("train") + timer.time_remaining("train")
        if not self.trainer.strategy.broadcast(elapsed >= self.PLAN_SHARE * limit, src=0):  # one decision, all ranks
            return
        step_time = elapsed / (step - start_step)
        by_time = self.trainer.strategy.broadcast(step + timer.time_remaining("train") / step_time, src=0)  # one plan
        by_count = self.trainer.estimated_stepping_batches
        self._plan_timing = None
        self._pace = [(start_step, start_time)]  # (step, time) marks: the re-plans time the steps from them
        if by_count <= by_time:
            self.resolve_lr_plan(by_count, f"{by_count:,} by max_steps / max_epochs", timed=True)
        else:
            self.resolve_lr_plan(by_time, f"{int(by_time):,} in max_time at {step_time:.3g} s/step", timed=True)

    def _replan(self) -> None:
        """Every ``lr_plan["every"]`` steps (the same steps on every rank): the planned end again, from rank 0's
        step time over the latter half of the timed steps (validation included) and the time left. The cosine goes on from
        its progress at this step to the new end (:meth:`_progress`), so the lr does not jump."""
        plan, step = self.lr_plan, self.trainer.global_step
        timer = self._timer()
        if not self._pace or timer is None:  # a resumed run: its pace is timed from here
            self._pace = [(step, time.perf_counter())]
            return
        if step - plan["planned_at"] < plan["every"] or step <= self._pace[0][0]:
            return
        now = time.perf_counter()
        # the pace over the latter half of the steps timed so far at least: an early slow spell fades out,
        # and the validations in that span count at their share of the time
        since_step, since = [mark for mark in self._pace if mark[0] <= (self._pace[0][0] + step) / 2][-1]
        step_time = (now - since) / (step - since_step)
        self._pace.append((step, now))
        by_time = self.trainer.strategy.broadcast(step + timer.time_remaining("train") / step_time, src=0)
        new_total = max(int(min(self.trainer.estimated_stepping_batches, by_time)), step + 1)
        old_total, warmup = plan["total"], plan["warmup"]
        start = max(step, warmup)
        done = self._progress(start, warmup, max(old_total, warmup + 1), plan.get("anchor"))
        plan.update(total=max(new_total, start + 1), anchor=[start, done], planned_at=step)
        if abs(new_total - old_total) > 0.1 * old_total:
            say(
                f"glow: lr schedule: cosine now ends at step {plan['total']:,} (was {old_total:,}; "
                f"{step_time:.3g} s/step so far)"
            )
        self._apply_lr()

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        scaler = self._trainer is not None and has_grad_scaler(self._trainer)
        optimizer = make_optimizer(
            self.hparams.optimizer,
            self.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            allow_fused=not scaler,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _start_lr_plan(self) -> None:
        """Resolve the warmup / schedule plan (or reuse the checkpoint's, made from the same settings)."""
        self.lr_plan, self._plan_timing, self._pace, self._resumed_factor = None, None, None, None
        self._provisional_warmup = None
        if not self._needs_plan():
            return
        loaded, inputs = self._loaded_lr_plan, self._plan_inputs()
        if loaded is not None and loaded.get("inputs") == inputs:
            self.lr_plan = dict(loaded)
            self._apply_lr()
            return
        if loaded is not None and self.trainer.global_step > 0:  # a resume with other limits or schedule settings
            self.lr_plan = dict(loaded) | {"inputs": None}
            self._resumed_factor = self.lr_factor(self.trainer.global_step)
            self._resumed_step = self.trainer.global_step
            self.lr_plan.pop("every", None)  # the checkpoint's plan holds (while max_time times steps), not re-planned
        by_count = self.trainer.estimated_stepping_batches
        if self._timer() is not None:
            # resolved after timing the first steps (on_train_batch_end), from PLAN_SKIP steps after this fit's first
            self._plan_timing = (self.trainer.global_step + self.PLAN_SKIP, None)
            counted = int(by_count) if math.isfinite(by_count) else None
            if self.hparams.warmup_fraction is not None and counted is not None:  # max_steps may end the run first
                self._provisional_warmup = self._warmup_for(counted)
            if self.hparams.warmup_fraction is not None:
                if self._resumed_factor is not None:
                    until = "the checkpoint's plan until then"
                else:
                    until = f"until then: warmup {steps(self._provisional_warmup or self.hparams.warmup_steps)}"
                    if self.hparams.schedule == "cosine" and counted is not None:
                        until += f", then cosine decay to 0 at step {counted:,}, by max_steps / max_epochs"
                say(
                    f"glow: lr schedule: resolved from the step time over the first {self.PLAN_SHARE:.0%} of max_time ({until})"
                )
        else:
            source = f"{by_count:,} by max_steps" if self.trainer.max_steps > 0 else (
                f"{by_count:,}: max_epochs {self.trainer.max_epochs} x {self.trainer.num_training_batches:,} batches"
                if math.isfinite(by_count) else "none"
            )  # fmt: skip
            self.resolve_lr_plan(by_count, source)

    @override
    def on_train_start(self) -> None:
        """Resolve the lr plan; on resume, apply this run's lr and weight_decay to the restored optimizer and schedule.

        Lightning restores the optimizer's param groups and the scheduler's ``base_lrs`` from the
        checkpoint; a ``--model.lr`` / ``--model.weight_decay`` given on resume applies from the resumed
        step on; the warmup and schedule follow the checkpoint's plan unless their settings changed.
        """
        if self.trainer.ckpt_path is not None:
            for config in self.trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if getattr(scheduler, "base_lrs", None) is None:
                    continue
                scheduler.base_lrs = [self.hparams.lr] * len(scheduler.base_lrs)
                for group in scheduler.optimizer.param_groups:
                    group["initial_lr"] = self.hparams.lr
                    if "weight_decay" in group:
                        group["weight_decay"] = self.hparams.weight_decay
        self._start_lr_plan()
        self._apply_lr()

    # ------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resolved lr plan, so a resume continues the same warmup and schedule."""
        if self.lr_plan is not None:
            checkpoint["lr_plan"] = dict(self.lr_plan)

    def load_initial_weights(self, path: str) -> None:
        """Warm start: copy the weights of the ``glow fit`` checkpoint ``path`` into this module.

        Takes the checkpoint's ``state_dict`` (with EMA, the averaged weights), ActNorm's ``initialized`` flags
        included; the optimizer, schedule and step count are this run's. Raises FileNotFoundError,
        :class:`~glow_lightning.io.UnreadableCheckpointError` (not a readable glow checkpoint) or
        :class:`CheckpointMismatchError` (another architecture), each one line naming ``path``.
        """
        ckpt = require_glow_checkpoint(load_checkpoint_file(path), path)
        problem = self._checkpoint_problem(ckpt)
        if problem:
            raise CheckpointMismatchError(f"{path}: {problem}", problem.differ)
        try:
            self.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:  # missing or unexpected keys: torch's message spans many lines
            raise CheckpointMismatchError(f"{path}: its weights do not fit this model ({first_line(err)})") from err
        self._initial_weights_loaded = True

    def _checkpoint_problem(self, checkpoint: dict[str, Any]) -> CheckpointMismatchError | None:
        """Why ``checkpoint``'s weights do not fit this model (another architecture, or tensors that contradict
        its hyperparameters), in one line; None if they fit."""
        hparams = checkpoint.get("hyper_parameters", {})
        saved = checkpoint_arch(hparams) | {k: hparams[k] for k in ARCH_CHECKED if k in hparams and k not in ARCH_KEYS}
        differ = {k: v for k, v in saved.items() if v != self.hparams[k]}
        if differ:
            lines = ", ".join(f"{k}: checkpoint {v!r} vs this model {self.hparams[k]!r}" for k, v in differ.items())
            return CheckpointMismatchError(f"the checkpoint was trained with another architecture ({lines})", differ)
        own = self.state_dict()
        for key, value in checkpoint.get("state_dict", {}).items():
            if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
                return CheckpointMismatchError(
                    f"the checkpoint's weights do not fit its hyperparameters: {key} has shape {tuple(value.shape)}, "
                    f"the model built from them {tuple(own[key].shape)} (a checkpoint edited or written by other code)"
                )
        return None

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture, naming the hyperparameters that differ.

        A resume with another ``optimizer`` (Adam <-> Adamax, whose states do not fit each other) starts a fresh
        optimizer state: the checkpoint's ``optimizer_states`` are dropped (Lightning then restores none; the
        step count, schedule position and everything else resume as usual).
        """
        self._loaded_lr_plan = checkpoint.get("lr_plan")
        problem = self._checkpoint_problem(checkpoint)
        if problem:
            raise problem
        saved_optimizer = checkpoint.get("hyper_parameters", {}).get("optimizer", "adam")
        if saved_optimizer != self.hparams.optimizer and "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = []  # Strategy.load_optimizer_state_dict zips it with the optimizers
