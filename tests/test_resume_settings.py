"""Resume with another optimizer or learning rate, and the warm start ``--model.init_weights`` (issue 13 item 3).

On the main branch before this, ``--model.optimizer`` on resume was refused and there was no warm start.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import shutil

import lightning as L
import pytest
import torch

from glow_lightning.cli import main
from glow_lightning.flow import Glow
from glow_lightning.io import load_checkpoint_file

from .conftest import cli_args, fit_args
from .reliability_helpers import LrRecorder

HELPERS = "tests.reliability_helpers"
QUICK = ["--trainer.num_sanity_val_steps", "0", "--samples.every_n_epochs", "0", "--reconstructions.every_n_epochs", "0",
         "--interpolations.every_n_epochs", "0", "--invertibility.every_n_epochs", "0"]  # fmt: skip
# 2 epochs of 4 steps planned (the cosine spans steps 6..8), warmup over steps 0..5: a resume at step 4 is in both
COSINE = ["--trainer.max_epochs", "2", "--model.schedule", "cosine", "--model.warmup_steps", "6", *QUICK]


class AtTrainStart(L.Callback):
    """What the module holds once the checkpoint (if any) is restored, before the first optimizer step."""

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.step = trainer.global_step
        self.optimizer = type(optimizer).__name__
        self.optimizer_state = len(optimizer.state)
        self.schedule_position = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


AT_START = f"{__name__}.AtTrainStart"


def callback(cli, kind):
    return next(c for c in cli.trainer.callbacks if isinstance(c, kind))


@pytest.fixture(scope="module")
def cosine_checkpoint(cifar_dir, tmp_path_factory) -> str:
    """last.ckpt of an Adam run with lr 1e-3 planned for 8 steps (cosine) and stopped after epoch 0 (step 4)."""
    run = str(tmp_path_factory.mktemp("cosine"))
    main(fit_args(cifar_dir, run, *COSINE, "--trainer.callbacks+", f"{HELPERS}.StopAfterEpoch"))
    return os.path.join(run, "checkpoints", "last.ckpt")


def copy_of(checkpoint: str, run: str) -> str:
    """A run directory whose last.ckpt is a copy of ``checkpoint`` (each resume writes its own)."""
    os.makedirs(os.path.join(run, "checkpoints"))
    shutil.copy(checkpoint, os.path.join(run, "checkpoints", "last.ckpt"))
    return run


# ------------------------------------------------------------------------- another optimizer on resume


def test_resume_with_another_optimizer_starts_a_fresh_optimizer_state(cosine_checkpoint, cifar_dir, tmp_path, capsys):
    saved = load_checkpoint_file(cosine_checkpoint)
    assert saved["global_step"] == 4 and saved["optimizer_states"][0]["state"]  # Adam's moments, to be dropped
    run = copy_of(cosine_checkpoint, str(tmp_path / "run"))
    capsys.readouterr()
    cli = main(fit_args(cifar_dir, run, *COSINE, "--ckpt_path", "last", "--model.optimizer", "adamax",
                        "--trainer.callbacks+", f"{HELPERS}.LrRecorder",
                        "--trainer.callbacks+", AT_START))  # fmt: skip
    out = capsys.readouterr().out
    assert "glow: resuming with optimizer adamax (checkpoint: adam): the optimizer state starts fresh" in out
    start = callback(cli, AtTrainStart)
    assert (start.optimizer, start.optimizer_state) == ("Adamax", 0)  # fresh at the restore
    assert start.step == start.schedule_position == 4  # the step count and the schedule resume
    assert cli.trainer.global_step == 8
    recorder = callback(cli, LrRecorder)
    module = cli.trainer.lightning_module
    assert recorder.lrs[0] == (4, pytest.approx(1e-3 * module.lr_factor(4), rel=1e-9))  # not the schedule's step 0
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adamax)
    assert all("exp_inf" in state for state in optimizer.state.values())  # Adamax trained from there
    last = load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))
    assert last["hyper_parameters"]["optimizer"] == "adamax" and last["global_step"] == 8
    assert all("exp_inf" in state for state in last["optimizer_states"][0]["state"].values())


# ------------------------------------------------------------------------- a new lr through warmup and cosine


def logged(csv_dir: str, key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` in the CSVLogger's metrics.csv under ``csv_dir``."""
    (path,) = glob.glob(os.path.join(csv_dir, "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def test_a_resumed_lr_change_follows_warmup_and_cosine_in_the_logged_train_lr(
    cosine_checkpoint, cifar_dir, tmp_path, capsys
):
    run = copy_of(cosine_checkpoint, str(tmp_path / "run"))
    csv_dir = str(tmp_path / "csv")
    capsys.readouterr()
    cli = main(fit_args(cifar_dir, run, *COSINE, "--ckpt_path", "last", "--model.lr", "2e-4",
                        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                        "--trainer.logger.save_dir", csv_dir))  # fmt: skip
    assert "glow: resuming with lr 0.0002 (checkpoint: 0.001)" in capsys.readouterr().out
    lrs = logged(csv_dir, "train/lr")
    assert sorted(lrs) == [4, 5, 6, 7]  # the resumed steps, logged at their global step
    module = cli.trainer.lightning_module
    factors = {step: module.lr_factor(step) for step in lrs}
    assert len(set(factors.values())) >= 3  # warmup, its end, the cosine's decay: not a constant schedule
    assert lrs == {step: pytest.approx(2e-4 * factor, rel=1e-6) for step, factor in factors.items()}


# ------------------------------------------------------------------------- warm start


@pytest.fixture(scope="module")
def warm_run(tiny_checkpoint, cifar_dir, tmp_path_factory):
    """A 2-step fit warm-started from the session's tiny checkpoint, with Glow.initialize counting its calls."""
    run = str(tmp_path_factory.mktemp("warm"))
    calls = []
    original = Glow.initialize

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Glow, "initialize", counting)
        args = fit_args(cifar_dir, run, *QUICK, "--model.init_weights", tiny_checkpoint)
        cli = main(args + ["--trainer.max_steps", "2", "--trainer.callbacks+", AT_START])
    return run, args, cli, len(calls)


def test_warm_start_begins_at_step_0_from_the_checkpoints_weights(warm_run, tiny_checkpoint):
    run, _, cli, initializations = warm_run
    source = load_checkpoint_file(tiny_checkpoint)
    assert source["global_step"] > 0
    start = callback(cli, AtTrainStart)
    assert start.step == start.schedule_position == 0 and start.optimizer_state == 0  # fresh optimizer and schedule
    weights = source["state_dict"]
    assert set(start.state) == set(weights)
    assert all(torch.equal(start.state[k], weights[k]) for k in weights)  # before the first step: the checkpoint's
    assert initializations == 0  # ActNorm counts as initialised: no data-dependent init
    assert cli.trainer.global_step == 2
    last = load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))
    assert last["global_step"] == 2 and last["hyper_parameters"]["init_weights"] == tiny_checkpoint


def test_a_warm_started_run_resumes_with_the_same_command_and_its_config(warm_run, cifar_dir, tmp_path):
    run, args, _, _ = warm_run
    own = load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))["state_dict"]
    cli = main(args + ["--trainer.max_steps", "3", "--ckpt_path", "last",
                       "--trainer.callbacks+", AT_START])  # fmt: skip
    start = callback(cli, AtTrainStart)
    assert start.step == 2 and cli.trainer.global_step == 3
    assert all(torch.equal(start.state[k], own[k]) for k in own)  # the run's weights, not the warm start's again
    saved_config = os.path.join(run, "lightning_logs", "version_0", "config.yaml")  # holds init_weights
    tested = main(["test", "--config", saved_config, "--ckpt_path", "last", "--trainer.default_root_dir", run,
                   "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert math.isfinite(float(tested.trainer.callback_metrics["test/bpd"]))


def plain_state_dict(tiny_checkpoint: str, tmp_path) -> str:
    path = str(tmp_path / "flow_weights.pt")
    torch.save(Glow.from_checkpoint(tiny_checkpoint).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("architecture", "the checkpoint was trained with another architecture (hidden_channels: checkpoint 16 vs "
                         "this model 8)"),
        ("missing", "no such checkpoint file"),
        ("plain_state_dict", "plain state_dict"),
        ("with_ckpt_path", "a warm start begins a new run at global step 0"),
    ],
)  # fmt: skip
def test_a_warm_start_that_cannot_work_is_one_error_line(case, expected, tiny_run, tiny_checkpoint, cifar_dir, tmp_path,
                                                         capsys):  # fmt: skip
    path = {"missing": str(tmp_path / "nope.ckpt"), "plain_state_dict": None}.get(case, tiny_checkpoint)
    path = path or plain_state_dict(tiny_checkpoint, tmp_path)
    root = tiny_run if case == "with_ckpt_path" else str(tmp_path / "run")  # resuming a run not warm-started
    extra = {"architecture": ["--model.hidden_channels", "8"], "with_ckpt_path": ["--ckpt_path", "last"]}.get(case, [])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(cifar_dir, root, *QUICK, "--model.init_weights", path, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("glow: error:")]
    assert len(errors) == 1 and errors[0].startswith("glow: error: --model.init_weights ") and "Traceback" not in err
    assert path in errors[0] and expected in errors[0], errors
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "checkpoints", "last.ckpt"))


def test_init_weights_never_conflicts_outside_fit(tiny_checkpoint, cifar_dir, tmp_path):
    args = cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", tiny_checkpoint, "--trainer.limit_test_batches",
                    "1", "--model.init_weights", str(tmp_path / "any.ckpt"))  # fmt: skip
    tested = main(args)  # a training-only setting: ignored, not a contradiction of the checkpoint
    assert "test/bpd" in tested.trainer.callback_metrics
