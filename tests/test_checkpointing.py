"""last.ckpt always holds the newest state; signals stop a fit after the step with a checkpoint (issue 13).

Items 1 and 2 of issue 13: Lightning 2.6's ModelCheckpoint rewrote ``last.ckpt`` only when a best-k
file was saved, and SIGTERM ended a fit with exit code 0 and no checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from glow_lightning.cli import main
from glow_lightning.io import load_checkpoint_file

from .conftest import ROOT, fit_args
from .reliability_helpers import LrRecorder, MarkerThenWait

HELPERS = "tests.reliability_helpers"
QUICK = ["--trainer.num_sanity_val_steps", "0", "--samples.every_n_epochs", "0", "--reconstructions.every_n_epochs", "0",
         "--interpolations.every_n_epochs", "0", "--invertibility.every_n_epochs", "0"]  # fmt: skip


def step_of(path: str) -> int:
    return int(load_checkpoint_file(path)["global_step"])


def checkpoints(run: str) -> dict[str, int]:
    directory = os.path.join(run, "checkpoints")
    return {name: step_of(os.path.join(directory, name)) for name in os.listdir(directory) if name.endswith(".ckpt")}


def test_last_ckpt_follows_every_validation_on_a_plateau(cifar_dir, tmp_path):
    # mode max on a falling val/bpd: the best file stays at an early epoch, last.ckpt must not
    run = str(tmp_path)
    # coupling_norm none: on this fixture its val/bpd falls every epoch, so "max" keeps epoch 0's file
    cli = main(fit_args(cifar_dir, run, "--trainer.max_epochs", "3", "--checkpoint.mode", "max",
                        "--model.coupling_norm", "none", *QUICK))  # fmt: skip
    saved = checkpoints(run)
    assert saved.pop("last.ckpt") == cli.trainer.global_step == 12
    assert len(saved) == 1 and min(saved.values()) < 12  # the one best file, from before the end (plateau)


@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
@pytest.mark.parametrize("stop", ["max_steps", "max_time", "should_stop"])
def test_last_ckpt_holds_the_final_step_of_a_run_stopped_mid_epoch(cifar_dir, tmp_path, stop, ema):
    run = str(tmp_path)
    limit = {"max_steps": ["--trainer.max_steps", "6"], "max_time": ["--trainer.max_time", "00:00:00:03"],
             # what max_time and EarlyStopping do: a validation runs at the stop, the best file is saved at epoch end
             "should_stop": ["--trainer.callbacks+", f"{HELPERS}.StopAtStep"]}[stop]  # fmt: skip
    extra = ["--ema.decay", "0.9"] if ema else []
    cli = main(fit_args(cifar_dir, run, "--trainer.max_epochs", "1000", *QUICK, *limit, *extra))
    step = cli.trainer.global_step
    if stop != "max_time":
        assert step == 6  # mid-epoch: 4 batches per epoch
    last = load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))
    assert last["global_step"] == step > 0
    # the checkpoint callback's state in last.ckpt names the best file on disk (the one saved at this end)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("GlowCheckpoint"))
    best = [name for name in os.listdir(os.path.join(run, "checkpoints")) if name != "last.ckpt"]
    assert [os.path.basename(state["best_model_path"])] == best
    module = cli.trainer.lightning_module
    final = {k: v for k, v in module.state_dict().items()}
    weights = [k for k in last["state_dict"] if last["state_dict"][k].is_floating_point()]
    assert all(torch.equal(last["state_dict"][k], final[k]) for k in weights)  # after training: EMA copied in
    if ema and step >= 2:  # the first EMA update copies the weights
        raw = last["current_model_state"]
        assert any(not torch.equal(raw[k], last["state_dict"][k]) for k in weights)  # raw ones kept apart
    elif not ema:
        assert "current_model_state" not in last


@pytest.mark.parametrize("stop", ["should_stop", "max_steps"])
def test_a_run_stopped_mid_epoch_resumes_the_rest_of_that_epoch(cifar_dir, tmp_path, capsys, stop):
    """max_time and EarlyStopping stop mid-epoch through ``trainer.should_stop``; Lightning then counts the epoch as
    processed before on_train_epoch_end writes last.ckpt, and a resume skipped the rest of it (on MNIST, 1,104 of
    1,718 batches after a one-minute run). Now it runs the batches that were left, as after a signal."""
    run = str(tmp_path)
    first = {"should_stop": ["--trainer.callbacks+", f"{HELPERS}.StopAtStep"],  # what max_time does
             "max_steps": ["--trainer.max_steps", "6"]}[stop]  # fmt: skip
    main(fit_args(cifar_dir, run, "--trainer.max_epochs", "3", *QUICK, *first, "--trainer.enable_progress_bar", "true",
                  "--trainer.callbacks+", "GlowProgressBar", "--trainer.callbacks.min_interval", "60"))  # fmt: skip
    assert checkpoints(run)["last.ckpt"] == 6  # 4 batches per epoch: stopped after batch 1 of epoch 1
    last = [f for f in capsys.readouterr().out.split("\r") if f.startswith("Epoch 1")][-1]
    assert "2/4" in last  # the count where it stopped, though the bar draws at most every min_interval
    more = ["--trainer.max_steps", "12"] if stop == "max_steps" else []
    record = ["--trainer.callbacks+", f"{HELPERS}.BatchRecorder", "--trainer.enable_progress_bar", "true"]
    capsys.readouterr()
    cli = main(fit_args(cifar_dir, run, "--trainer.max_epochs", "3", *QUICK, *more, "--ckpt_path", "last", *record))
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "BatchRecorder")
    assert recorder.batches == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    # the bar of the resumed epoch names it and counts on from its batches done (Lightning's: "Training: 3/?")
    assert recorder.bar[0] == ("Epoch 1: ", 2, 4) and recorder.bar[2] == ("Epoch 2: ", 0, 4)
    frames = capsys.readouterr().out.split("\r")
    first = [f for f in frames if f.startswith("Epoch 1")]
    assert first and "2/4" in first[0]  # not a first frame "Epoch 1:   0%| | 0/4"
    assert all("-" not in f.split("[")[-1] for f in frames if "Epoch" in f)  # no negative rate ...
    assert not any(f.startswith("Epoch 1") and "0/4" in f for f in frames)  # ... nor epoch 2's reset named epoch 1
    assert cli.trainer.global_step == 12 and checkpoints(run)["last.ckpt"] == 12


def test_a_resumed_epochs_bar_counts_to_where_max_steps_stops_it(cifar_dir, tmp_path):
    """With max_steps and no max_epochs, Lightning's bar total is the steps left; resumed mid-epoch it counts on from
    the batches done, so its total is the batches done plus the steps left (it showed "2/?": 2 done of a total of 1)."""
    run = str(tmp_path)
    main(fit_args(cifar_dir, run, *QUICK, "--trainer.max_steps", "6"))  # 4 batches per epoch: 2 of epoch 1 done
    bar = ["--trainer.enable_progress_bar", "true", "--trainer.callbacks+", f"{HELPERS}.BatchRecorder"]
    cli = main(fit_args(cifar_dir, run, *QUICK, "--trainer.max_epochs", "-1", "--trainer.max_steps", "7",
                        "--ckpt_path", "last", *bar))  # fmt: skip
    assert recorded(cli, "BatchRecorder").bar == [("Epoch 1: ", 2, 3)] and cli.trainer.global_step == 7


def recorded(cli, name: str):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == name)


@pytest.mark.parametrize("batch_size, again", [(4, 0), (16, 8)])
def test_a_mid_epoch_resume_with_another_batch_size_goes_on_after_the_images_done(cifar_dir, tmp_path, capsys,
                                                                                 batch_size, again):  # fmt: skip
    """Lightning counts the epoch's batches done and restarts at that count: resumed with larger batches, the epoch
    ended at once (done >= its new length); with smaller ones, too few images were skipped. The count is converted,
    so the epoch goes on after the images done (some again when they are not a whole number of new batches)."""
    run = str(tmp_path)
    record = ["--trainer.callbacks+", f"{HELPERS}.IndexRecorder", "--trainer.limit_train_batches", "1.0"]
    first = main(fit_args(cifar_dir, run, *QUICK, "--trainer.max_steps", "3", *record))  # 3 of 4 batches of 8
    done = [i for batch in recorded(first, "IndexRecorder").indices for i in batch]
    capsys.readouterr()
    more = ["--data.batch_size", str(batch_size), "--trainer.max_epochs", "2", "--ckpt_path", "last"]
    cli = main(fit_args(cifar_dir, run, *QUICK, *more, *record, "--trainer.callbacks+", f"{HELPERS}.BatchRecorder"))
    out = capsys.readouterr().out
    line = (
        f"glow: resuming in the middle of epoch 0 with {batch_size} images per batch over all devices (checkpoint: 8)"
    )
    assert line in out
    indices, batches = recorded(cli, "IndexRecorder").indices, recorded(cli, "BatchRecorder").batches
    rest = [i for batch, (epoch, _) in zip(indices, batches) if epoch == 0 for i in batch]
    assert len(done) == 24 and len(rest) == 32 - 24 + again
    assert len(set(done + rest)) == 32  # each training image of the epoch (32), ...
    assert rest[:again] == done[24 - again :]  # ... the last ones done again where they are not a whole new batch
    assert [e for e, _ in batches].count(1) == 32 // batch_size  # then whole epochs


def test_a_signal_closes_the_bar_so_the_stop_line_starts_a_line(cifar_dir, tmp_path, capfd):
    """Ctrl-C mid-epoch: the bar's last frame ends its line before "glow: stopped by SIGINT" (it ran on after it:
    "...train/bpd=3.860]glow: stopped by SIGINT: ...")."""
    with pytest.raises(SystemExit):
        main(fit_args(cifar_dir, str(tmp_path), *QUICK, "--trainer.enable_progress_bar", "true",
                      "--trainer.callbacks+", f"{HELPERS}.InterruptAtStep"))  # fmt: skip
    out, err = capfd.readouterr()
    assert "glow: stopped by SIGINT" in err and out.endswith("\n")
    assert "2/4" in [f for f in out.split("\r") if f.startswith("Epoch 1")][-1]  # stopped after 2 of epoch 1's 4


def test_sigterm_to_the_process_group_saves_exits_143_and_resumes(cifar_dir, tmp_path):
    run = str(tmp_path / "run")
    args = fit_args(cifar_dir, run, *QUICK, "--data.init_args.num_workers", "1")
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glow_lightning.cli", *args, "--trainer.callbacks+", f"{HELPERS}.MarkerThenWait"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # fault injection: the marker says step 3 is done and the run waits
            if MarkerThenWait.MARKER in line:
                os.killpg(proc.pid, signal.SIGTERM)  # the DataLoader worker gets it too
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    last = os.path.join(run, "checkpoints", "last.ckpt")
    lines = [x for x in err.splitlines() if x.startswith("glow: stopped by SIGTERM")]
    assert len(lines) == 1 and last in lines[0] and "--ckpt_path last" in lines[0], err[-3000:]
    assert "RuntimeError" not in err and "Traceback" not in err, err[-3000:]
    assert step_of(last) == 3

    resumed = main(args + ["--ckpt_path", "last", "--trainer.callbacks+", f"{HELPERS}.LrRecorder"])
    recorder = next(c for c in resumed.trainer.callbacks if isinstance(c, LrRecorder))
    assert recorder.start_step == 3 and resumed.trainer.global_step == 8
    assert step_of(last) == 8


def test_a_full_disk_during_training_is_one_error_line_naming_the_intact_checkpoint(cifar_dir, tmp_path, capsys):
    run = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(cifar_dir, run, *QUICK, "--trainer.callbacks+", f"{HELPERS}.FailingWrites"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("glow: error:")]
    directory = os.path.join(run, "checkpoints")
    assert len(errors) == 1 and directory in errors[0] and "No space left on device" in errors[0], err
    failed = re.search(r"cannot write checkpoint (\S+) in ", errors[0]).group(1)
    intact = re.search(r"the previous checkpoint (\S+) is intact", errors[0])
    intact = intact.group(1) if intact else failed  # "its previous version is intact"
    assert intact == failed or "its previous version" not in errors[0]
    assert step_of(intact) == 4  # epoch 0's save, readable


def test_resume_with_a_new_lr_and_warmup_applies_them_from_the_resumed_step(cifar_dir, tmp_path, capsys):
    run = str(tmp_path)
    args = fit_args(cifar_dir, run, *QUICK)
    main(args + ["--trainer.max_epochs", "1"])  # 4 steps at lr 1e-3 (debug: warmup 2, constant)
    capsys.readouterr()
    resumed = main(args + ["--ckpt_path", "last", "--model.lr", "1e-4", "--model.warmup_steps", "8",
                           "--trainer.callbacks+", f"{HELPERS}.LrRecorder"])  # fmt: skip
    out = capsys.readouterr().out
    assert "glow: resuming with lr 0.0001 (checkpoint: 0.001), warmup_steps 8 (checkpoint: 2)" in out
    trainer = resumed.trainer
    recorder = next(c for c in trainer.callbacks if isinstance(c, LrRecorder))
    assert recorder.start_step == 4 and trainer.global_step == 8
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-4]
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-4
    expected = [(s, 1e-4 * (s + 1) / 8) for s in range(4, 8)]  # the new warmup, from the resumed step on
    assert [s for s, _ in recorder.lrs] == [s for s, _ in expected]
    assert [lr for _, lr in recorder.lrs] == pytest.approx([lr for _, lr in expected], rel=1e-9)
    assert load_checkpoint_file(os.path.join(run, "checkpoints", "last.ckpt"))["hyper_parameters"]["lr"] == 1e-4

    with pytest.raises(SystemExit) as exit_info:  # the architecture still has to match
        main(args + ["--ckpt_path", "last", "--model.hidden_channels", "8"])
    assert exit_info.value.code == 2
    assert "--model.hidden_channels=8 (checkpoint: 16)" in capsys.readouterr().err


def test_a_moved_run_resumes_with_its_best_file_tracked(cifar_dir, tmp_path, recwarn):
    """Runs get moved (scratch -> project space) or copied to fork an experiment: the resumed run goes on with
    the checkpoints in its new folder (one best file, the right score), not with paths into the old folder."""
    old, new = str(tmp_path / "scratch"), str(tmp_path / "project")
    # coupling_norm none: on this fixture its val/bpd falls every epoch, so every epoch has a new best file
    fit = ["--model.coupling_norm", "none", *QUICK]
    main(fit_args(cifar_dir, old, "--trainer.max_epochs", "1", *fit))
    os.rename(old, new)
    cli = main(fit_args(cifar_dir, new, "--trainer.max_epochs", "3", "--ckpt_path", "last", *fit))
    saved = checkpoints(new)
    assert saved.pop("last.ckpt") == cli.trainer.global_step == 12
    assert list(saved.values()) == [12]  # one best file, the newest: the moved epoch-0 file was replaced
    callback = cli.trainer.checkpoint_callback
    assert callback.best_model_path == os.path.join(new, "checkpoints", next(iter(saved)))
    assert set(callback.best_k_models) == {callback.best_model_path}
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluating_a_checkpoint_from_another_folder_is_quiet(
    cifar_dir, tiny_checkpoint, tmp_path, recwarn, subcommand
):
    """``glow test --ckpt_path`` of a checkpoint written elsewhere (another run folder, another machine): nothing
    is saved, so no checkpoint tracking is restored, and Lightning's "dirpath has changed" warning is gone."""
    args = fit_args(cifar_dir, str(tmp_path / "elsewhere"), "--ckpt_path", tiny_checkpoint)
    cli = main([subcommand, *args[1:]])
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    callback = cli.trainer.checkpoint_callback
    assert callback.best_model_path == "" and not callback.best_k_models
    assert cli.trainer.callback_metrics  # it evaluated


def test_a_resume_from_a_copied_last_ckpt_leaves_the_original_run_alone(cifar_dir, tmp_path):
    """Only last.ckpt copied to a new folder (a fork of the run): the original folder's files stay untouched."""
    old, new = str(tmp_path / "original"), str(tmp_path / "fork")
    fit = ["--model.coupling_norm", "none", *QUICK]
    main(fit_args(cifar_dir, old, "--trainer.max_epochs", "1", *fit))
    before = checkpoints(old)
    os.makedirs(os.path.join(new, "checkpoints"))
    shutil.copy(os.path.join(old, "checkpoints", "last.ckpt"), os.path.join(new, "checkpoints", "last.ckpt"))
    cli = main(fit_args(cifar_dir, new, "--trainer.max_epochs", "2", "--ckpt_path", "last", *fit))
    assert checkpoints(old) == before  # nothing removed or rewritten there
    saved = checkpoints(new)
    assert saved.pop("last.ckpt") == cli.trainer.global_step == 8 and list(saved.values()) == [8]


def test_a_fit_stopped_before_its_first_validation_keeps_last_ckpt_without_a_warning(cifar_dir, tmp_path, recwarn):
    """``--trainer.max_steps 2`` stops mid-epoch before any validation: no val/bpd to rank a best file by, so
    last.ckpt only, and not Lightning's misleading "could not find the monitored key ... Did you call log()?"."""
    run = str(tmp_path / "run")
    cli = main(fit_args(cifar_dir, run, "--trainer.max_steps", "2", *QUICK[2:]))  # with the sanity check
    assert cli.trainer.global_step == 2 and cli.trainer.num_training_batches > 2
    assert checkpoints(run) == {"last.ckpt": 2}
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]


@pytest.mark.parametrize("sanity", ["2", "0"])
def test_a_mistyped_monitor_is_one_clear_error_at_the_first_validation(cifar_dir, tmp_path, capsys, sanity):
    """``--checkpoint.monitor val/bdp``: one line naming it and what validation logs, at the sanity check (or the
    first validation without one), not a traceback after a whole epoch."""
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path / "run"), "--checkpoint.monitor", "val/bdp", "--trainer.max_epochs", "1",
                      *QUICK[2:], "--trainer.num_sanity_val_steps", sanity, "--invertibility.every_n_epochs", "1"))  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "glow: error: --checkpoint.monitor 'val/bdp' is not a metric this run logs (validation logged: " in err
    assert "val/bpd" in err.splitlines()[-1] and "Traceback" not in err
    assert "val/recon_error" in err.splitlines()[-1]  # the invertibility check's: later, or in the first validation
    assert err.count("val/recon_error") == 1


def test_a_mistyped_training_monitor_is_lightnings_error_in_one_line(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path / "run"), "--checkpoint.monitor", "train/bdp", "--trainer.max_epochs",
                      "1", *QUICK))  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "glow: error: `ModelCheckpoint(monitor='train/bdp')` could not find the monitored key" in err
    assert "Traceback" not in err


def test_a_mid_epoch_validation_writes_last_ckpt(cifar_dir, tmp_path):
    """--trainer.val_check_interval 2 (epochs of 4 batches): last.ckpt follows the validation at step 2 before the
    epoch ends, so a crash at step 3 loses nothing validated."""
    cli = main(fit_args(cifar_dir, str(tmp_path / "run"), "--trainer.val_check_interval", "2", "--trainer.max_steps",
                        "4", "--trainer.callbacks+", "tests.reliability_helpers.LastCkptProbe", *QUICK))  # fmt: skip
    probe = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LastCkptProbe")
    assert dict(probe.seen)[2] == 2 and dict(probe.seen)[3] == 2  # written after the validation at step 2
