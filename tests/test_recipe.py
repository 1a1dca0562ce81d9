"""The training recipe options of issue 18: openai/glow's coupling network and a warmup / schedule planned
from the run's length (``warmup_fraction``), resolved once and kept in the checkpoint."""

from __future__ import annotations

import math
import os

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.flow.layers import CouplingLayer, FlowStep, NetActNorm
from glow_lightning.io import load_checkpoint_file
from glow_lightning.module import GlowModule

from .conftest import fit_args
from .reliability_helpers import LrRecorder

QUICK = ["--trainer.num_sanity_val_steps", "0", "--samples.every_n_epochs", "0", "--reconstructions.every_n_epochs", "0",
         "--interpolations.every_n_epochs", "0", "--invertibility.every_n_epochs", "0"]  # fmt: skip
RECORD = ["--trainer.callbacks+", "tests.reliability_helpers.LrRecorder"]


def recorded(cli) -> list[tuple[int, float]]:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LrRecorder)).lrs


# ------------------------------------------------------------------ coupling_norm
def test_actnorm_coupling_network_is_openai_glows_and_initialised_from_data():
    layer = CouplingLayer(4, 16, "affine", "actnorm")
    convs = [m for m in layer.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.bias is None for c in convs[:2]] == [True, True]  # hidden convolutions: no bias, ActNorm instead
    assert sum(isinstance(m, NetActNorm) for m in layer.net.modules()) == 2
    assert CouplingLayer(4, 16, "affine").net[0].bias is not None  # "none": today's network

    flow = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=2, hidden_channels=16, coupling_norm="actnorm")
    assert not flow.is_initialized  # the hidden ActNorms count too
    x = torch.rand(64, 1, 8, 8)
    flow.initialize(x)
    assert flow.is_initialized
    # after the data-dependent init, the first hidden ActNorm's output is standardized on that batch
    first = flow.steps[0][0]
    captured = {}
    first.coupling.net[1].register_forward_hook(lambda m, i, out: captured.update(h=out.clone()))  # before the ReLU
    with torch.no_grad():
        flow.log_prob(x)  # the same batch through the same path as the initialisation
    h = captured["h"]
    assert torch.allclose(h.mean((0, 2, 3)), torch.zeros(16), atol=1e-4)
    assert torch.allclose(h.std((0, 2, 3), unbiased=False), torch.ones(16), atol=1e-3)


def test_actnorm_flow_step_is_exactly_invertible_with_the_jacobians_logdet():
    from .test_layers import brute_force_logdet, perturb

    step = perturb(FlowStep(4, 8, "affine", "invconv_lu", "actnorm"), scale=0.3)
    x = torch.randn(2, 4, 2, 2)
    y, logdet = step(x)
    x_back, inverse_logdet = step.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-5) and torch.allclose(inverse_logdet, -logdet, atol=1e-4)
    assert torch.allclose(logdet, brute_force_logdet(step, x), atol=1e-4)


def test_a_bad_coupling_norm_is_one_clear_error():
    with pytest.raises(ValueError, match="coupling_norm must be one of .* got 'batchnorm'"):
        Glow(in_channels=1, image_size=8, levels=1, steps_per_level=1, hidden_channels=8, coupling_norm="batchnorm")


def test_a_checkpoint_from_before_coupling_norm_loads_as_the_biased_network(tmp_path, cifar_dir, capsys):
    """Checkpoints without the key hold today's network ("none"), whatever the default becomes."""
    run = str(tmp_path / "old")
    main(fit_args(cifar_dir, run, "--trainer.max_steps", "2", "--model.coupling_norm", "none", *QUICK))
    path = os.path.join(run, "checkpoints", "last.ckpt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["hyper_parameters"]["coupling_norm"]  # as written before the option existed
    old = str(tmp_path / "old.ckpt")
    torch.save(ckpt, old)
    assert Glow.from_checkpoint(old).config["coupling_norm"] == "none"
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    module = GlowModule(**{**hparams, "coupling_norm": "actnorm"})
    with pytest.raises(ValueError, match="coupling_norm: checkpoint 'none' vs this model 'actnorm'"):
        module.on_load_checkpoint(ckpt)
    tested = main(["test", *fit_args(cifar_dir, str(tmp_path / "t"))[1:], "--ckpt_path", old])
    assert tested.model.hparams.coupling_norm == "none"


# ------------------------------------------------------------------ warmup_fraction and the planned schedule
def test_warmup_fraction_and_cosine_are_planned_from_max_steps_and_kept_in_the_checkpoint(tmp_path, cifar_dir, capsys):
    run = str(tmp_path)
    plan = ["--model.warmup_steps", "100", "--model.warmup_fraction", "0.25", "--model.schedule", "cosine",
            "--trainer.max_steps", "8"]  # fmt: skip
    cli = main(fit_args(cifar_dir, run, *plan, *QUICK, *RECORD))
    assert "glow: lr schedule: warmup 2 steps, then cosine decay to 0 at step 8 (planned steps: 8 by max_steps)" in (
        capsys.readouterr().out
    )
    module = cli.model
    assert module.lr_plan["warmup"] == 2 and module.lr_plan["total"] == 8
    lr = module.hparams.lr
    expected = [lr * min(1.0, (s + 1) / 2) * (0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) if s >= 2 else 1.0)
                for s in range(8)]  # fmt: skip
    assert [s for s, _ in recorded(cli)] == list(range(8))
    assert [v for _, v in recorded(cli)] == pytest.approx(expected, rel=1e-9)
    saved = load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))["lr_plan"]
    assert (saved["warmup"], saved["total"]) == (2, 8)


class Tick(LrRecorder):
    """An LrRecorder that advances :func:`inject_clock`'s clock after each step (a module-level class: jsonargparse
    4.39 cannot import a class defined in a function)."""

    clock: dict = {"t": 0.0}

    @staticmethod
    def seconds_per_step(step: int) -> float:
        return 1.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock["t"] += self.seconds_per_step(trainer.global_step)


def inject_clock(monkeypatch, seconds_per_step) -> dict:
    """GlowModule's step timing on an injected clock: each step takes ``seconds_per_step(global_step)`` seconds
    (the LrRecorder of RECORD ticks it), timed from step 1 over 2 steps. Returns the clock ({"t": seconds})."""
    import glow_lightning.module as module_file

    clock = {"t": 0.0}
    monkeypatch.setattr(Tick, "clock", clock)
    monkeypatch.setattr(Tick, "seconds_per_step", staticmethod(seconds_per_step))

    class Clock:
        @staticmethod
        def perf_counter():
            return clock["t"]

    monkeypatch.setattr(module_file, "time", Clock)
    monkeypatch.setattr(GlowModule, "PLAN_SKIP", 1)
    monkeypatch.setattr(GlowModule, "PLAN_TIMED", 2)
    monkeypatch.setattr(GlowModule, "PLAN_SHARE", 0.0)
    monkeypatch.setattr("tests.reliability_helpers.LrRecorder", Tick)
    return clock


def test_a_max_time_plan_comes_from_the_timed_steps(tmp_path, cifar_dir, monkeypatch):
    """With only max_time, the planned steps are the steps that fit at the measured pace (clock injected:
    1 s per step, so the plan is exact and the test does not depend on this machine's speed)."""
    inject_clock(monkeypatch, lambda step: 1.0)
    monkeypatch.setattr(GlowModule, "REPLAN_SHARE", 10.0)  # the first plan only (re-plans: the test below)
    plan = ["--model.warmup_fraction", "0.5", "--model.schedule", "cosine", "--trainer.max_epochs", "-1",
            "--trainer.max_time", "00:01:00:00", "--trainer.max_steps", "6"]  # fmt: skip
    # the Timer counts real time (an hour: the run ends by max_steps); the step time comes from the injected clock
    cli = main(fit_args(cifar_dir, str(tmp_path), *plan, *QUICK, *RECORD))
    module = cli.model
    assert module.lr_plan["total"] == 6 and "max_steps" in module.lr_plan["source"]  # the smaller limit wins

    # a short max_time, a large max_steps: at the injected 1 s/step, the time limit plans fewer steps
    time_limited = ["--model.warmup_steps", "1000", "--model.warmup_fraction", "0.5", "--model.schedule", "cosine", "--trainer.max_epochs", "-1",
                    "--trainer.max_time", "00:00:00:05", "--trainer.max_steps", "10"]  # fmt: skip
    cli = main(fit_args(cifar_dir, str(tmp_path / "by_time"), *time_limited, *QUICK, *RECORD))
    module = cli.model
    # timed from step 1 over 2 steps: planned = step 3 + the seconds left of 5 (real time) at 1 s/step
    assert "in max_time at 1 s/step" in module.lr_plan["source"]
    assert 3 < module.lr_plan["total"] <= 8 and module.lr_plan["warmup"] == round(0.5 * module.lr_plan["total"])


def test_a_max_steps_run_inside_a_long_max_time_warms_up_for_its_steps(tmp_path, cifar_dir, capsys):
    """``--trainer.max_steps 8`` with a config's max_time (cpu.yaml): the run ends long before the max_time plan is
    timed (2% of an hour), so until then warmup_fraction and the cosine follow max_steps. Before, the steps ran in the
    provisional warmup of warmup_steps (1,000 here: the lr never passed 1% of its peak)."""
    args = ["--model.warmup_steps", "1000", "--model.warmup_fraction", "0.25", "--model.schedule", "cosine",
            "--trainer.max_epochs", "-1", "--trainer.max_time", "00:01:00:00", "--trainer.max_steps", "8"]  # fmt: skip
    cli = main(fit_args(cifar_dir, str(tmp_path), *args, *QUICK, *RECORD))
    out = capsys.readouterr().out
    assert "(until then: warmup 2 steps, then cosine decay to 0 at step 8, by max_steps / max_epochs)" in out
    lr = cli.model.hparams.lr
    expected = [lr / 2, lr] + [lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(2, 8)]
    assert [v for _, v in recorded(cli)] == pytest.approx(expected, rel=1e-9)
    assert cli.model.lr_plan is None  # never timed: the provisional plan was the run's


class FakeTimer:
    """What GlowModule reads of Lightning's Timer, on an injected clock: a 40 s limit."""

    def __init__(self, clock: dict, limit: float = 40.0):
        self.clock, self.limit = clock, limit

    def time_elapsed(self, stage: str = "train") -> float:
        return self.clock["t"]

    def time_remaining(self, stage: str = "train") -> float:
        return self.limit - self.clock["t"]


@pytest.mark.parametrize("replan", [True, False])
def test_a_slow_start_is_replanned_so_the_run_does_not_end_at_lr_0(replan, tmp_path, cifar_dir, monkeypatch, capsys):
    """The first steps are timed at 3 s/step (another program busy), the rest run at 1 s/step: 24 steps fit in the
    40 s limit, not the 13 the first timing plans. Re-planning every 5% of the plan moves the cosine's end to the
    run's end, with no jump in the lr; without it (``replan=False``: the check can fail) the last steps run at lr 0,
    as a 10-minute MNIST run did (planned 2,978 steps, ran 4,776: BENCHMARKS.md section 5)."""
    clock = inject_clock(monkeypatch, lambda step: 3.0 if step <= 8 else 1.0)
    monkeypatch.setattr(GlowModule, "_timer", lambda self: FakeTimer(clock))
    monkeypatch.setattr(GlowModule, "REPLAN_SHARE", 0.05 if replan else 10.0)
    args = ["--model.warmup_steps", "1000", "--model.warmup_fraction", "0.1", "--model.schedule", "cosine",
            "--trainer.max_epochs", "-1", "--trainer.max_time", "00:01:00:00", "--trainer.max_steps", "24"]  # fmt: skip
    cli = main(fit_args(cifar_dir, str(tmp_path), *args, *QUICK, *RECORD))
    out = capsys.readouterr().out
    assert "cosine decay to 0 at step 13 (planned steps: 13 in max_time at 3 s/step)" in out  # the slow start's plan
    lrs = [lr for _, lr in recorded(cli)]
    assert len(lrs) == 24
    peak = max(lrs)
    if not replan:
        assert cli.model.lr_plan["total"] == 13 and lrs[-5:] == [0.0] * 5
        return
    assert "glow: lr schedule: cosine now ends at step" in out
    assert cli.model.lr_plan["total"] >= 22 and all(lr > 0 for lr in lrs)  # decays over the whole run
    decay = lrs[lrs.index(peak) :]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))  # never rises again
    assert max(a - b for a, b in zip(decay, decay[1:])) < 0.35 * peak  # no jump
    assert lrs[-1] < 0.1 * peak


def test_a_resume_continues_the_checkpoints_plan_and_replans_when_its_settings_change(tmp_path, cifar_dir, capsys):
    run = str(tmp_path)
    args = fit_args(cifar_dir, run, "--model.warmup_steps", "100", "--model.warmup_fraction", "0.25", "--model.schedule", "cosine",
                    "--trainer.max_steps", "8", "--trainer.max_epochs", "10", *QUICK)  # fmt: skip
    first = main(args + ["--trainer.callbacks+", "tests.reliability_helpers.StopAfterEpoch"])  # step 4 of 8
    assert first.trainer.global_step == 4
    capsys.readouterr()
    resumed = main(args + ["--ckpt_path", "last", *RECORD])
    assert "glow: lr schedule" not in capsys.readouterr().out  # the checkpoint's plan, as it was
    lr = resumed.model.hparams.lr
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(4, 8)]
    assert [s for s, _ in recorded(resumed)] == [4, 5, 6, 7]
    assert [v for _, v in recorded(resumed)] == pytest.approx(cosine, rel=1e-9)

    longer = main(args + ["--ckpt_path", "last", "--trainer.max_steps", "12", *RECORD])  # another limit: planned again
    out = capsys.readouterr().out
    assert "glow: lr schedule: warmup 3 steps, then cosine decay to 0 at step 12" in out
    assert (
        "resumed at step 8 with the checkpoint's plan at lr 0 (x0 of --model.lr); it reaches the new plan over 3 steps"
        in out
    )
    assert longer.model.lr_plan["total"] == 12 and longer.trainer.global_step == 12
    # from the finished cosine's 0 to the new one's value over 3 steps, not at once
    new = [lr * 0.5 * (1 + math.cos(math.pi * (s - 3) / 9)) for s in range(8, 12)]
    ramped = [new[i] * min(i, 3) / 3 for i in range(4)]
    assert [v for _, v in recorded(longer)] == pytest.approx(ramped, rel=1e-9, abs=1e-15)


def test_a_resume_with_a_later_max_time_goes_on_from_the_checkpoints_lr(tmp_path, cifar_dir, monkeypatch, capsys):
    """To train longer, resume with a later limit: the new plan is timed again, and the lr goes on from the
    finished plan's ~0 while it is timed, then rises to the new plan over a warmup's length. Before, the timed
    steps ran at the full lr (no plan yet, past warmup_steps) and undid a 10-minute MNIST run (val/bpd 1.26 -> 1.99)."""
    clock = inject_clock(monkeypatch, lambda step: 1.0)
    limit = {"s": 20.0}
    monkeypatch.setattr(GlowModule, "_timer", lambda self: FakeTimer(clock, limit["s"]))
    run = str(tmp_path)
    args = ["--model.warmup_steps", "1000", "--model.warmup_fraction", "0.1", "--model.schedule", "cosine",
            "--trainer.max_epochs", "-1", "--trainer.max_time", "00:01:00:00", *QUICK, *RECORD]  # fmt: skip
    first = main(fit_args(cifar_dir, run, *args, "--trainer.max_steps", "20"))
    assert first.model.lr_plan["total"] == 20 and recorded(first)[-1][1] < 0.01 * first.model.hparams.lr
    capsys.readouterr()
    limit["s"] = 40.0  # the later limit: 20 more steps at 1 s/step
    resumed = main(fit_args(cifar_dir, run, *args, "--trainer.max_steps", "40", "--ckpt_path", "last"))
    out = capsys.readouterr().out
    assert "(the checkpoint's plan until then)" in out and "cosine decay to 0 at step 40" in out
    assert (
        "resumed at step 20 with the checkpoint's plan at lr 0 (x0 of --model.lr); it reaches the new plan over 4 steps from step 23"
        in out
    )
    lrs = [lr for _, lr in recorded(resumed)]
    peak = resumed.model.hparams.lr
    assert len(lrs) == 20 and lrs[0] < 0.01 * peak  # goes on from the finished plan
    assert max(b - a for a, b in zip(lrs, lrs[1:])) < 0.3 * peak  # no jump
    # after the ramp (steps 23..26), the new plan: as if the run had been planned for 40 steps from the start
    new = [peak * 0.5 * (1 + math.cos(math.pi * (s - 4) / 36)) for s in range(27, 40)]
    assert lrs[-13:] == pytest.approx(new, rel=1e-9) and max(lrs) > 0.25 * peak


def test_warmup_fraction_must_be_a_fraction():
    with pytest.raises(ValueError, match="warmup_fraction must be between 0 and 1"):
        GlowModule(warmup_fraction=1.5)


def test_resuming_a_run_that_had_its_max_time_says_how_to_train_on(
    tmp_path, cifar_dir, tiny_checkpoint, monkeypatch, capsys
):
    """The README's "resume with a later limit", typed with the same limit: Lightning stops at once with "Time limit
    reached" only; one line says what to do."""
    import shutil

    os.makedirs(tmp_path / "checkpoints")
    shutil.copy(tiny_checkpoint, tmp_path / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(GlowModule, "_timer", lambda self: FakeTimer({"t": 600.0}, 600.0))  # the limit reached
    main(fit_args(cifar_dir, str(tmp_path), *QUICK, "--ckpt_path", "last"))
    out = capsys.readouterr().out
    assert (
        "glow: this run has had its --trainer.max_time (0:10:00) already: resume with a later --trainer.max_time" in out
    )
