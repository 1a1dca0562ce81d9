"""Bad input from a user's seat: one ``glow: error:`` line naming the value, and no checkpoint lost.

Complements test_reliability.py / test_cli.py / test_images.py (which cover checkpoints, data paths and
model numbers); these are the cases an audit found without a clear message.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.cli import main

from .conftest import cli_args, config, fit_args
from .fixtures import write_image_folder


def run_error(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return exc.value.code, err


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--model.weight_decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
        (["--trainer.max_epochs", "-5"], "`max_epochs` must be a non-negative integer or -1. You passed in -5."),
        (["--checkpoint.save_top_k", "-5"], "Invalid value for save_top_k=-5"),
        (["--data.seed", "abc"], "--data.seed: Expected a <class 'int'>. Got value: abc"),
        (["--data.batch_size", "8.5"], "--data.batch_size: Expected a <class 'int'>. Got value: 8.5"),
        (
            ["--data.batchsize", "4"],
            "--data: Option 'batchsize' is not accepted (glow_lightning.data.CIFAR10DataModule)",
        ),
        (["--config", "/nonexistent/run.yaml"], "--config: File does not exist: '/nonexistent/run.yaml'"),
        (["--model.lr", "-1e-3"], "a value that starts with '-' is written --model.lr=VALUE"),
    ],
    ids=[
        "weight-decay",
        "max-epochs",
        "save-top-k",
        "data-type",
        "data-float",
        "data-unknown-key",
        "config-file",
        "negative-exponent",
    ],  # fmt: skip
)
def test_bad_value_exits_2_naming_it(cifar_dir, tmp_path, capsys, extra, culprit):
    code, err = run_error(fit_args(cifar_dir, str(tmp_path), *extra), capsys)
    assert code == 2
    assert culprit in err, err[-2000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--trainer.callbacks+", "glow_lightning.callbacks.GlowProgressBar", "--trainer.callbacks.min_interval", "-1"],
         "glow: error: min_interval must be >= 0 seconds, got -1.0 (see: glow fit --help)"),
        (["--trainer.callbacks+", "glow_lightning.callbacks.NoSuchBar"],
         "glow: error: --trainer.callbacks: module 'glow_lightning.callbacks' has no attribute 'NoSuchBar' "
         "(glow_lightning.callbacks.NoSuchBar) (see: glow fit --help)"),
    ],
    ids=["callback-argument", "callback-class"],
)  # fmt: skip
def test_a_bad_callback_is_one_line_with_its_own_reason(cifar_dir, tmp_path, capsys, extra, line):
    """The reason, once: not also jsonargparse's list of the Union's other subtypes, nor the same reason twice."""
    code, err = run_error(fit_args(cifar_dir, str(tmp_path), *extra), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == line


@pytest.mark.parametrize(
    ("subcommand", "extra", "culprit"),
    [
        ("sample", ["--nrow", "0"], "--nrow must be >= 1, got 0"),
        ("reconstruct", ["--pairs_per_row", "0"], "--pairs_per_row must be >= 1, got 0"),
        ("sample", ["--output", "{ckpt}"], "--output {ckpt}: the grid is written as a PNG"),
        ("interpolate", ["--output", "{ckpt}"], "--output {ckpt}: the grid is written as a PNG"),
        ("sample", ["--output", "{root}"], "--output {root}: the grid is written as a PNG"),
    ],
    ids=["nrow-0", "pairs-per-row-0", "sample-over-checkpoint", "interpolate-over-checkpoint", "output-is-a-dir"],
)
def test_image_subcommands_refuse_bad_output_arguments(cifar_dir, tiny_checkpoint, tmp_path, capsys, subcommand,
                                                       extra, culprit):  # fmt: skip
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    os.makedirs(os.path.dirname(ckpt))
    shutil.copy(tiny_checkpoint, ckpt)
    before = open(ckpt, "rb").read()
    fill = {"{ckpt}": ckpt, "{root}": str(tmp_path)}
    extra = [fill.get(e, e) for e in extra]
    code, err = run_error(cli_args(subcommand, cifar_dir, str(tmp_path / "run"), "--ckpt_path", ckpt, *extra), capsys)
    assert code == 2
    for key, value in fill.items():
        culprit = culprit.replace(key, value)
    assert culprit in err, err[-2000:]
    assert open(ckpt, "rb").read() == before  # the checkpoint is not replaced by a PNG


def test_sample_output_that_cannot_be_written_names_it(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = str(tmp_path / "a_file" / "s.png")
    code, err = run_error(["sample", "--ckpt_path", tiny_checkpoint, "--num_samples", "2", "--output", out], capsys)
    assert code == 1
    assert f"glow: error: --output {out} cannot be written (FileExistsError" in err


def test_unreadable_image_in_a_folder_is_one_error_without_traceback(tmp_path, capsys):
    root = write_image_folder(str(tmp_path / "imgs"), classes=(), per_class=4)
    with open(os.path.join(root, "broken.png"), "wb") as f:
        f.write(b"not a png")
    args = ["fit", "--config", config("imagefolder.yaml"), "--config", config("debug.yaml"), "--data.data_dir", root,
            "--data.image_size", "16", "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    code, err = run_error(args, capsys)
    assert code == 1
    assert "glow: error: 1 of 5 image files cannot be read:" in err and "broken.png" in err


# ----------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def flow() -> Glow:
    torch.manual_seed(0)
    f = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8, num_classes=3)
    f.initialize(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    return f.eval()


X = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1])


def value_range(x: torch.Tensor) -> str:
    return f"x must hold images in [0, 1], got values in [{float(x.min()):g}, {float(x.max()):g}]"


@pytest.mark.parametrize(
    ("x", "labels", "culprit"),
    [
        ((X * 255).to(torch.uint8), LABELS, "x must be floating-point images in [0, 1], got dtype torch.uint8"),
        (X.numpy(), LABELS, "x must be a torch.Tensor of images, got ndarray"),
        (X * 255, LABELS, value_range(X * 255)),
        (X - 0.5, LABELS, value_range(X - 0.5)),
        (X.masked_fill(X > 0.9, float("nan")), LABELS, "NaN or infinite values"),
        (X.to("meta"), LABELS, "x is on meta but this Glow is on cpu"),
        (X, torch.tensor([0, 3]), "labels must be in 0..2, got values in 0..3"),
    ],
    ids=["uint8", "numpy", "0-255", "centred", "nan", "device", "label-range"],
)
@pytest.mark.parametrize("method", ["log_prob", "encode", "bits_per_dim"])
def test_bad_images_name_the_problem(flow, method, x, labels, culprit):
    with pytest.raises(ValueError) as exc:
        getattr(flow, method)(x, labels)
    assert culprit in str(exc.value)


def test_value_checks_run_in_eval_only_and_accept_valid_images(flow):
    assert torch.isfinite(flow.log_prob(X, LABELS)).all()
    assert flow.log_prob(X[:0], LABELS[:0]).shape == (0,)
    flow.train()
    try:  # training mode skips the value check (no host sync in a training step): no error, non-finite output
        assert not torch.isfinite(flow.log_prob(X * float("nan"), LABELS)).all()
    finally:
        flow.eval()


def test_other_bad_api_arguments_name_the_value(flow):
    with pytest.raises(ValueError, match="temperature must be finite, got inf"):
        flow.sample(2, temperature=float("inf"), labels=LABELS)
    with pytest.raises(ValueError, match="learn_top must be a bool, got 'yes'"):
        Glow(in_channels=1, image_size=8, levels=1, steps_per_level=1, hidden_channels=8, learn_top="yes")
    latents, _ = flow.encode(X, LABELS)
    with pytest.raises(ValueError, match=r"latents must share one batch size, got \[\(2, 2, 4, 4\), \(1, 8, 2, 2\)\]"):
        flow.decode([latents[0], latents[1][:1]])
    fresh = Glow(in_channels=1, image_size=8, levels=1, steps_per_level=1, hidden_channels=8)
    with pytest.raises(ValueError, match="x holds 64 NaN or infinite values"):
        fresh.initialize(torch.full((1, 1, 8, 8), float("nan")))
    assert not fresh.is_initialized
