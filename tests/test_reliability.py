"""Reliability: exact resume, kill-safe checkpoints, the non-finite guard, clear errors, safe loading."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import warnings

import fsspec
import pytest
import torch

import glow_lightning.io as cio
from glow_lightning import Glow
from glow_lightning.callbacks import InvertibilityMonitor
from glow_lightning.cli import main
from glow_lightning.flow.checks import CheckpointFileError
from glow_lightning.io import AtomicCheckpointIO, UnreadableCheckpointError, load_checkpoint_file
from glow_lightning.module import GlowModule

from .conftest import ROOT, cli_args, fit_args
from .reliability_helpers import IndexRecorder, InterruptAtStep, LrRecorder, NanInput

HELPERS = "tests.reliability_helpers"


def callback(cli, cls):
    return next(c for c in cli.trainer.callbacks if isinstance(c, cls))


def ckpt_files(fs, directory: str) -> list[str]:
    return sorted(p for p in fs.ls(directory, detail=False) if p.endswith(".ckpt"))


def temporaries(fs, directory: str) -> list[str]:
    return [p for p in fs.ls(directory, detail=False) if p.endswith(".part")]


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "workers"),
    [("epoch_end", "0"), ("mid_epoch", "0"), ("mid_epoch", "2"), ("interrupt", "0")],
    ids=["epoch-boundary", "mid-epoch", "mid-epoch-workers", "ctrl-c-mid-epoch"],
)
def test_resume_is_exact_also_from_an_fsspec_url(cifar_dir, tmp_path, stop, workers):
    """8 steps straight == stopped, resumed from memory://.../last.ckpt, the rest: images, weights, Adam state, lr.

    Stopped at an epoch's end (4 batches an epoch), in the middle of one (step 6: as max_time / EarlyStopping
    stop, and by Ctrl-C, whose checkpoint is written on the exception). In the middle of an epoch the resume used to
    run that epoch's first images again, and with DataLoader workers its first epoch in epoch 0's order."""
    common = ["--model.warmup_steps", "6", "--model.schedule", "cosine", "--trainer.num_sanity_val_steps", "0",
              "--trainer.callbacks+", f"{HELPERS}.LrRecorder", "--trainer.callbacks+", f"{HELPERS}.IndexRecorder",
              "--data.num_workers", workers]  # fmt: skip
    straight = main(fit_args(cifar_dir, str(tmp_path / "straight"), *common))
    remote = f"memory://resume-test-{stop}-{workers}/run"
    stopper = {"epoch_end": "StopAfterEpoch", "mid_epoch": "StopAtStep", "interrupt": "InterruptAtStep"}[stop]
    first_args = fit_args(cifar_dir, remote, *common, "--trainer.callbacks+", f"{HELPERS}.{stopper}")
    if stop == "interrupt":
        with pytest.raises(SystemExit) as exc:
            main(first_args)
        assert exc.value.code == 130
        first = InterruptAtStep.last_trainer
    else:
        first = main(first_args).trainer
    stopped_at = 4 if stop == "epoch_end" else 6
    assert first.global_step == stopped_at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = main(fit_args(cifar_dir, remote, *common, "--ckpt_path", "last"))
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]  # Lightning's: not true here
    assert resumed.trainer.ckpt_path == remote + "/checkpoints/last.ckpt"
    assert callback(resumed, LrRecorder).start_step == stopped_at and resumed.trainer.global_step == 8

    def recorded(trainer, cls):
        return next(c for c in trainer.callbacks if isinstance(c, cls))

    images = recorded(first, IndexRecorder).indices + callback(resumed, IndexRecorder).indices
    assert images == callback(straight, IndexRecorder).indices  # the same images in the same order
    lrs = recorded(first, LrRecorder).lrs + callback(resumed, LrRecorder).lrs
    assert lrs == callback(straight, LrRecorder).lrs  # identical, step by step (warmup spans the resume)
    assert [s for s, _ in lrs] == list(range(8))
    a = load_checkpoint_file(str(tmp_path / "straight" / "checkpoints" / "last.ckpt"))
    b = load_checkpoint_file(remote + "/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-6, atol=1e-7, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i in opt_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[i][name], opt_b[i][name], rtol=1e-6, atol=1e-9)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8


# ----------------------------------------------------------------------------- kill safety
@pytest.mark.parametrize("root", ["local", "memory://interrupted-save"])
def test_a_save_interrupted_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, root):
    directory = str(tmp_path) if root == "local" else root
    path = directory + "/last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "w": torch.arange(1000.0)}, path)

    def write_half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise OSError("disk unplugged")

    monkeypatch.setattr(cio, "_write_chunks", write_half_then_fail)
    with pytest.raises(OSError, match="disk unplugged"):
        io.save_checkpoint({"global_step": 8, "w": torch.zeros(1000)}, path)
    ckpt = io.load_checkpoint(path)
    assert ckpt["global_step"] == 4 and torch.equal(ckpt["w"], torch.arange(1000.0))
    fs, local = fsspec.core.url_to_fs(directory)
    assert temporaries(fs, local) == []


KILL_DURING_THIRD_WRITE = """
import os, signal, sys
import glow_lightning.io as cio
writes, original = [], cio._write_chunks
def write(f, data):
    writes.append(len(data))
    if len(writes) == 3:  # epoch 1's best checkpoint: half of it, then SIGKILL
        f.write(data[: len(data) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original(f, data)
cio._write_chunks = write
from glow_lightning.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_then_resume(cifar_dir, tmp_path):
    run = str(tmp_path / "run")
    args = fit_args(cifar_dir, run, "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0")
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_THIRD_WRITE, *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    fs = fsspec.filesystem("file")
    directory = os.path.join(run, "checkpoints")
    assert len(temporaries(fs, directory)) == 1  # killed mid-write: the temporary, never the target
    steps = {p: load_checkpoint_file(p)["global_step"] for p in ckpt_files(fs, directory)}  # every one loads
    assert sorted(steps.values()) == [4, 4]  # last.ckpt and the best, both from epoch 0

    resumed = main(args + ["--ckpt_path", "last", "--trainer.callbacks+", f"{HELPERS}.LrRecorder"])
    assert callback(resumed, LrRecorder).start_step == max(steps.values())  # never back past the last save
    assert resumed.trainer.global_step == 8
    assert temporaries(fs, directory) == []  # the killed writer's temporary is removed
    for p in ckpt_files(fs, directory):
        assert load_checkpoint_file(p)["global_step"] in (4, 8)
    assert load_checkpoint_file(os.path.join(directory, "last.ckpt"))["global_step"] == 8


# ------------------------------------------------------------------------ non-finite guard
@pytest.mark.slow
def test_a_nan_batch_skips_that_update_and_is_counted(cifar_dir, tmp_path):
    cli = main(fit_args(cifar_dir, str(tmp_path), "--trainer.num_sanity_val_steps", "0",
                        "--trainer.callbacks+", f"{HELPERS}.NanInput"))  # fmt: skip
    nan = callback(cli, NanInput)
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 8 and module.skipped_steps == 1
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert torch.equal(nan.before[5], nan.before[6])  # step 5 (NaN input) left the weights alone
    assert not torch.equal(nan.before[4], nan.before[5]) and not torch.equal(nan.before[6], nan.before[7])
    ckpt = load_checkpoint_file(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped_steps": 1, "consecutive_skips": 0}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.slow
def test_nan_every_step_stops_naming_the_step_and_layer(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path), "--trainer.num_sanity_val_steps", "0",
                      "--model.max_consecutive_skips", "3", "--trainer.callbacks+", f"{HELPERS}.NanLayer"))  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "glow: error: training stopped at global step 6: 3 optimizer steps in a row" in err
    assert "the first layer whose output became non-finite is flow.steps.1.0.coupling (CouplingLayer)" in err
    ckpt = load_checkpoint_file(str(tmp_path / "checkpoints" / "last.ckpt"))  # the last good one, intact
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


# ----------------------------------------------------------------------- invertibility
def test_invertibility_monitor_reports_a_small_reconstruction_error(tiny_checkpoint):
    module = GlowModule.load_from_checkpoint(tiny_checkpoint).eval()
    monitor = InvertibilityMonitor(num_images=4)
    monitor._batch = {"x": torch.rand(6, 3, 32, 32)[:4], "label": torch.zeros(4, dtype=torch.long)}
    error = float(monitor.recon_error(module))
    assert 0 < error < 1e-4
    with torch.no_grad():
        module.flow.steps[0][0].actnorm.logs.fill_(-30.0)  # a near-singular layer: the round trip breaks
    assert float(monitor.recon_error(module)) > 1e-3 or not torch.isfinite(monitor.recon_error(module))


def test_fit_logs_recon_error(tiny_run):
    events = fsspec.filesystem("file").find(os.path.join(tiny_run, "lightning_logs"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(next(e for e in events if "tfevents" in e))
    acc.Reload()
    values = [e.value for e in acc.Scalars("val/recon_error")]
    assert len(values) == 2 and all(0 <= v < 1e-3 for v in values)


# ------------------------------------------------------------------------ bad input
def _truncated(tiny_checkpoint: str, path) -> str:
    data = open(tiny_checkpoint, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _garbage(tiny_checkpoint: str, path) -> str:
    path.write_bytes(os.urandom(4096))
    return str(path)


class WriteMarker:
    """A pickle payload: unpickling it would create the file ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious(tiny_checkpoint: str, path) -> str:
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["payload"] = WriteMarker(str(path.parent / "MARKER"))
    torch.save(ckpt, str(path), pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


def _test_args(cifar_dir: str, root: str, *extra: str) -> list[str]:
    return ["test", *fit_args(cifar_dir, root)[1:], *extra]


@pytest.mark.parametrize(
    ("make", "code", "culprit"),
    [
        (_truncated, 2, "is not a readable checkpoint"),
        (_garbage, 2, "is not a readable checkpoint"),
        (_malicious, 2, "is not a readable checkpoint"),
    ],
    ids=["truncated", "corrupt", "pickle-that-runs-code"],
)
def test_unreadable_checkpoint_is_refused_naming_the_file(cifar_dir, tiny_checkpoint, tmp_path, capsys, make, code,
                                                          culprit):  # fmt: skip
    path = make(tiny_checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit) as exc:
        main(_test_args(cifar_dir, str(tmp_path / "out"), "--ckpt_path", path))
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert f"{path} {culprit}" in err and "Traceback" not in err
    assert not (tmp_path / "MARKER").exists()


def test_every_loader_refuses_a_checkpoint_that_would_run_code(tiny_checkpoint, tmp_path):
    path = _malicious(tiny_checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointFileError, match="evil.ckpt is not a readable checkpoint") as refused:
        Glow.from_checkpoint(path)  # pure PyTorch, torch.load(weights_only=True): one clear ValueError
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)  # torch's weights_only refusal
    with pytest.raises(UnreadableCheckpointError, match="evil.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # Lightning's restore path, forced safe
    with pytest.raises(pickle.UnpicklingError):
        GlowModule.load_from_checkpoint(path)
    assert not (tmp_path / "MARKER").exists()
    torch.load(path, weights_only=False)  # the payload is real: loading unsafely runs it
    assert (tmp_path / "MARKER").exists()


def test_truncated_last_checkpoint_on_resume_is_refused(cifar_dir, tiny_run, tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _truncated(tiny_checkpoint, run / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(run), "--ckpt_path", "last"))
    assert exc.value.code == 2
    assert "last.ckpt is not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code", "culprit"),
    [
        (["--data.data_dir", "/nonexistent/glow-data"], 1, "/nonexistent/glow-data/cifar-10-batches-py does not exist"),
        (["--data.class_path", f"{HELPERS}.WrongSizeData"], 1, "have shape (1, 28, 28) (C, H, W)"),
        (["--model.levels", "6"], 2, "image_size=32 is not divisible by 2**levels=64"),
        (["--data.n_bits", "0"], 2, "n_bits must be an integer in 1..8, got 0"),
        (["--data.n_bits", "9"], 2, "n_bits must be an integer in 1..8, got 9"),
        (["--model.max_consecutive_skips", "0"], 2, "max_consecutive_skips must be an integer >= 1"),
        (["--ckpt_path", "/nonexistent/run.ckpt"], 2, "--ckpt_path /nonexistent/run.ckpt: no such checkpoint file"),
        (["--trainer.default_root_dir", "{file}/run"], 1, "--trainer.default_root_dir {file}/run is not writable"),
    ],
    ids=[
        "missing-dataset",
        "wrong-image-shape",
        "levels-too-deep",
        "n_bits-0",
        "n_bits-9",
        "max-skips-0",
        "missing-checkpoint",
        "unwritable-root-dir",
    ],  # fmt: skip
)
def test_bad_input_gives_one_line_naming_the_culprit(cifar_dir, tmp_path, capsys, extra, code, culprit):
    (tmp_path / "a_file").write_text("")
    file = str(tmp_path / "a_file")
    extra = [e.replace("{file}", file) for e in extra]
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path / "run"), *extra))
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert culprit.replace("{file}", file) in err, err[-2000:]
    assert "Traceback" not in err


def test_test_with_last_but_no_checkpoint_is_an_error(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_test_args(cifar_dir, str(tmp_path), "--ckpt_path", "last"))
    assert exc.value.code == 2
    assert f"--ckpt_path last: there is no {tmp_path}/checkpoints/last.ckpt" in capsys.readouterr().err


def test_ckpt_path_best_finds_the_best_checkpoint_of_a_run_folder(cifar_dir, tiny_run, tmp_path):
    """``glow test --ckpt_path best`` in a new process (Lightning's "best" only knows a fit in the same process): the
    file last.ckpt's checkpoint callback tracks, looked up by name in the (here: copied) run folder, even beside
    another checkpoint."""
    import shutil

    run = str(tmp_path / "copied_run")
    shutil.copytree(tiny_run, run)
    directory = os.path.join(run, "checkpoints")
    best = [n for n in os.listdir(directory) if n != "last.ckpt"]
    assert len(best) == 1
    shutil.copy(os.path.join(directory, "last.ckpt"), os.path.join(directory, "epoch999-other.ckpt"))
    cli = main(_test_args(cifar_dir, run, "--ckpt_path", "best"))
    assert cli.trainer.ckpt_path == os.path.join(directory, best[0])
    assert cli.trainer.callback_metrics["test/bpd"] > 0


def test_ckpt_path_best_without_one_is_one_line(cifar_dir, tmp_path, capsys):
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        main(_test_args(cifar_dir, str(tmp_path / "run"), "--ckpt_path", "best"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"--ckpt_path best: {directory} holds no best checkpoint (one is written at each validation that "
        "improves val/bpd)"
        in err
        and "Traceback" not in err
    )


def test_ckpt_path_best_of_a_missing_run_folder_says_so(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_test_args(cifar_dir, str(tmp_path / "nowhere"), "--ckpt_path", "best"))
    assert exc.value.code == 2
    assert f"--ckpt_path best: there is no {tmp_path}/nowhere/checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_without_a_checkpoint_is_one_line_not_an_untrained_model(cifar_dir, tmp_path, capsys, subcommand):
    """``glow test --config mnist.yaml --config cpu.yaml`` with the --ckpt_path forgotten evaluated the untrained
    model and exited 0 (test/bpd 10.458 on MNIST)."""
    with pytest.raises(SystemExit) as exc:
        main(cli_args(subcommand, cifar_dir, str(tmp_path / "run")))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"glow {subcommand} needs --ckpt_path (a checkpoint file, or last / best of {tmp_path}/run/checkpoints)" in err
    )
    assert "untrained model" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before a trainer was made


def test_last_but_no_checkpoint_names_the_runs_that_have_one(cifar_dir, tmp_path, capsys, monkeypatch):
    """``glow sample --ckpt_path last`` typed without the run's config: the error names the runs under ./runs
    that have a last.ckpt, newest first, and how to pick one."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["older", "newer"]):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(b"")
        os.utime(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", (1e9 + i, 1e9 + i))
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--ckpt_path", "last"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"there is no {tmp_path}/checkpoints/last.ckpt; runs here with a last.ckpt, newest first: runs/newer, "
        "runs/older (pass the run's --config, or --trainer.default_root_dir runs/newer)" in err
    ), err


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
        ({"num_samples": -3}, "num_samples must be a positive integer, got -3"),
        ({"num_samples": 2.5}, "num_samples must be a positive integer, got 2.5"),
        ({"num_samples": 2, "temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"num_samples": 2, "temperature": float("nan")}, "temperature must be >= 0, got nan"),
    ],
)
def test_bad_sampling_arguments_name_the_argument(kwargs, culprit):
    flow = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8)
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        flow.sample(**kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (1, 8, 8)])
def test_images_of_the_wrong_shape_name_the_shape(shape):
    flow = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8)
    with pytest.raises(
        ValueError, match=rf"x must be a \(B, 1, 8, 8\) batch .* got shape \({', '.join(map(str, shape))}"
    ):
        flow.log_prob(torch.rand(shape))


def test_new_arguments_are_documented_in_fit_help(capsys):
    """The new knobs are documented: ``glow fit --help`` lists them."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.max_consecutive_skips" in out and "--invertibility.every_n_epochs" in out


def test_parser_errors_are_one_line(cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(fit_args(cifar_dir, str(tmp_path), "--trainer.max_epochs", "many"))
    assert exc.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[-1] == "glow: error: --trainer.max_epochs: Expected a <class 'int'>, got many (see: glow fit --help)"
    assert not any(x.startswith("usage:") for x in lines)
