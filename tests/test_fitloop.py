"""The per-batch work ``glow fit`` adds around the training step (issue 17 item 4): the gradient norm is computed
once per step (the non-finite guard's, reused for clipping), and the progress bar redraws at a bounded rate."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from glow_lightning.callbacks import GlowProgressBar
from glow_lightning.callbacks.nonfinite import NonFiniteGuard
from glow_lightning.cli import main

from .conftest import cli_args, fit_args


def _grads(optimizer) -> list[torch.Tensor]:
    return [p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _torch_clipped(grads: list[torch.Tensor], max_norm: float, clip) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's own ``clip_grad_norm_`` of these gradients: (their norm, the clipped gradients)."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = clip(params, max_norm, foreach=True)
    return norm, [p.grad for p in params]


class GradRecorder(L.Callback):
    """The gradients after backward (before the guard and clipping) and after the optimizer step (as it used them:
    fused Adam stores the gradients it scaled)."""

    def __init__(self):
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda optimizer, *_: self.after.append(_grads(optimizer)))

    def on_after_backward(self, trainer, pl_module):
        self.before.append(_grads(trainer.optimizers[0]))


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])
def test_clipping_reuses_the_guards_norm_and_clips_as_torch_does(cifar_dir, tmp_path, monkeypatch, optimizer):
    """Fused Adam: the scaling goes into the optimizer's kernel (``grad_scale``); Adamax: one foreach scaling with
    the guard's norm. Either way the norm is not computed again and the step gets torch's clipped gradients."""
    clip = torch.nn.utils.clip_grad_norm_

    def not_expected(*args, **kwargs):
        raise AssertionError("the gradients were clipped another way")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", not_expected)  # the norm is not computed again
    if optimizer == "adam":
        monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", not_expected)  # no separate scaling pass
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_steps", "3", "--trainer.gradient_clip_val", "1e-3",
                        "--model.optimizer", optimizer, "--trainer.callbacks+", f"{__name__}.GradRecorder"))  # fmt: skip
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, GradRecorder))
    assert cli.trainer.global_step == 3 and len(recorder.before) == len(recorder.after) == 3
    assert bool(cli.trainer.optimizers[0].defaults.get("fused")) == (optimizer == "adam")
    assert not hasattr(cli.trainer.optimizers[0], "grad_scale")  # dropped after each step, as GradScaler does
    for before, after in zip(recorder.before, recorder.after):
        norm, clipped = _torch_clipped(before, 1e-3, clip)  # torch's own clipping of the same gradients
        assert norm > 1e-3  # the clipping was active
        assert len(after) == len(clipped)
        for a, c in zip(after, clipped):  # fused Adam divides by the scale where torch multiplies by its inverse
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-12)


def test_gradient_accumulation_clips_the_accumulated_gradients(cifar_dir, tmp_path):
    """README's recipe for the paper's batch (``--trainer.accumulate_grad_batches``): one guard test, one norm and one
    clipping per optimizer step, on the gradients summed over its batches."""
    clip = torch.nn.utils.clip_grad_norm_
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_epochs", "1", "--trainer.accumulate_grad_batches",
                        "2", "--trainer.gradient_clip_val", "1e-3", "--trainer.callbacks+", f"{__name__}.GradRecorder"))  # fmt: skip
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, GradRecorder))
    assert cli.trainer.num_training_batches == 4 and cli.trainer.global_step == 2
    assert len(recorder.before) == 4 and len(recorder.after) == 2  # a backward per batch, a step per two
    for step, after in enumerate(recorder.after):
        summed = recorder.before[2 * step + 1]  # after the second backward: the sum of both batches' gradients
        norm, clipped = _torch_clipped(summed, 1e-3, clip)
        assert norm > 1e-3 and len(after) == len(clipped)
        for a, c in zip(after, clipped):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-12)
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped_steps == 0


def test_clipping_by_value_clamps_every_gradient(cifar_dir, tmp_path):
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_steps", "2", "--trainer.gradient_clip_val", "1e-4",
                        "--trainer.gradient_clip_algorithm", "value", "--trainer.callbacks+", f"{__name__}.GradRecorder"))  # fmt: skip
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, GradRecorder))
    assert len(recorder.after) == 2
    for before, after in zip(recorder.before, recorder.after):
        assert max(float(g.abs().max()) for g in before) > 1e-4  # the clamp was active
        assert all(torch.equal(a, b.clamp(-1e-4, 1e-4)) for a, b in zip(after, before))


def test_clipping_without_the_guard_computes_the_norm_itself(cifar_dir, tmp_path):
    """A module whose guard did not run this step (e.g. a trainer built without configure_callbacks) still clips."""
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_steps", "1"))
    module, optimizer = cli.model, cli.trainer.optimizers[0]
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard))
    guard.grad_norm = (module.trainer.global_step - 1, torch.tensor(0.0))  # a stale norm: not used
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert torch.allclose(total, torch.tensor(1.0), atol=1e-5)


def test_a_trained_module_still_pickles(cifar_dir, tmp_path):
    """torch.save(module) and ddp_spawn pickle the LightningModule: it holds no callback (their weak references
    do not pickle)."""
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_steps", "2"))
    buffer = io.BytesIO()
    torch.save(cli.model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), cli.model.state_dict().values()))


@pytest.fixture
def drawn(monkeypatch) -> list[tuple[int, int]]:
    """(bar id, count shown) at each redraw of any TQDM bar during the test."""
    drawn: list[tuple[int, int]] = []
    refresh = Tqdm.refresh

    def counted(self, *args, **kwargs):
        drawn.append((id(self), self.n))
        return refresh(self, *args, **kwargs)

    monkeypatch.setattr(Tqdm, "refresh", counted)
    return drawn


@pytest.mark.parametrize("min_interval, draws", [(0.0, "every batch"), (1e9, "first and last")])
def test_the_training_bar_redraws_at_most_every_min_interval(cifar_dir, tmp_path, drawn, min_interval, draws):
    args = fit_args(cifar_dir, str(tmp_path), "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "2",
                    "--trainer.callbacks+", "glow_lightning.callbacks.GlowProgressBar",
                    "--trainer.callbacks.min_interval", str(min_interval))  # fmt: skip
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    cli = main(args)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, GlowProgressBar) and bar.min_interval == min_interval
    batches = cli.trainer.num_training_batches
    assert batches >= 3
    shown = [n for i, n in drawn if i == id(bar.train_progress_bar) and 0 < n < batches]  # the epoch's inner batches
    assert shown == (list(range(1, batches)) if draws == "every batch" else [1])  # one redraw per update
    assert bar.train_progress_bar.n == batches  # the finished bar shows the whole epoch
    logged = float(cli.trainer.callback_metrics["train/bpd"])
    assert bar.get_metrics(cli.trainer, cli.model)["train/bpd"] == pytest.approx(logged)  # read when logged


def test_a_negative_min_interval_is_refused():
    with pytest.raises(ValueError, match="min_interval must be >= 0 seconds, got -1"):
        GlowProgressBar(min_interval=-1)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
@pytest.mark.parametrize("min_interval, draws", [(0.0, "every batch"), (1e9, "first and last")])
def test_the_evaluation_bars_redraw_at_most_every_min_interval(
    cifar_dir, tiny_checkpoint, tmp_path, drawn, subcommand, min_interval, draws
):
    """Lightning's validation / test bar redraws after every batch; GlowProgressBar's at most every min_interval."""
    args = cli_args(subcommand, cifar_dir, str(tmp_path), "--ckpt_path", tiny_checkpoint, "--data.batch_size", "2",
                    "--trainer.limit_val_batches", "1.0", "--trainer.limit_test_batches", "1.0",
                    "--trainer.callbacks+", "glow_lightning.callbacks.GlowProgressBar",
                    "--trainer.callbacks.min_interval", str(min_interval))  # fmt: skip
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    cli = main(args)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, GlowProgressBar)
    shown = [n for _, n in drawn if n > 0]
    batches = max(shown)
    assert batches >= 3
    assert shown[:-1] == (list(range(1, batches)) if draws == "every batch" else [1])  # inner batches
    assert shown[-1] == batches  # the last batch always draws


def test_glow_lines_during_a_fit_are_printed_above_the_bar(cifar_dir, tmp_path, capsys):
    """A plain print landed at the end of the bar's line ('Training: ... it/s]glow: lr schedule: ...'), and the
    bar's next redraw wrote over it; the lines now start a line of their own, the bar redrawn below."""
    args = fit_args(cifar_dir, str(tmp_path), "--trainer.max_steps", "2", "--model.schedule", "cosine")
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    main(args)
    segments = capsys.readouterr().out.replace("\r", "\n").split("\n")
    assert any(s.startswith("glow: lr schedule: warmup") for s in segments)
    assert not [s for s in segments if "glow:" in s and not s.startswith("glow:")]
