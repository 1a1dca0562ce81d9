"""Image grids in practice: the callbacks of a tiny ``glow fit`` and ``glow sample / reconstruct / interpolate``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from glow_lightning.callbacks.images import InterpolationImages, ReconstructionImages, eval_mode, log_image_grid
from glow_lightning.cli import main
from glow_lightning.data import CIFAR10DataModule
from glow_lightning.flow.visualize import HEADER_HEIGHT as HEADER
from glow_lightning.io import save_grid
from glow_lightning.module import GlowModule

from .conftest import config

TILE = 32 + 2  # a 32x32 image plus the grid's 2-pixel padding


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    """The (32, 32, 3) image at (row, col) of a grid with 2-pixel padding."""
    top, left = 2 + row * TILE, 2 + col * TILE
    return grid[top : top + 32, left : left + 32]


def body(grid: np.ndarray) -> np.ndarray:
    """A PNG grid without its header row, after checking the header is there: white, with dark text pixels."""
    header = grid[:HEADER]
    assert (header < 128).any() and (header == 255).all(axis=-1).mean() > 0.5
    return grid[HEADER:]


def unpadded(grid: np.ndarray, width: int) -> np.ndarray:
    """The first ``width`` columns of a grid body, after checking the rest is white: a header text wider than the
    grid pads it on the right, by how much depends on Pillow's default font (older Pillow: a wider bitmap font)."""
    assert grid.shape[1] >= width and (grid[:, width:] == 255).all()
    return grid[:, :width]


def data_args(cifar_dir: str, root: str) -> list[str]:
    return [
        "--config", config("cifar.yaml"), "--config", config("debug.yaml"),
        "--data.data_dir", cifar_dir, "--data.download", "false", "--data.val_size", "8",
        "--trainer.default_root_dir", root,
    ]  # fmt: skip


def val_pixels(cifar_dir: str, count: int) -> np.ndarray:
    """The first validation images as the fit saw them: (count, 32, 32, 3) uint8."""
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8)
    return dm.fixed_images("val", count)["bins"].permute(0, 2, 3, 1).numpy().astype(np.uint8)


# ------------------------------------------------------------------------------------------ callbacks
def test_tiny_fit_leaves_sample_reconstruction_and_interpolation_pngs(tiny_run):
    images = os.path.join(tiny_run, "images")
    expected = {  # debug.yaml: 8 samples in a row; 4 pairs in a row; 2 pairs x 4 steps; each with a header row
        "samples_t0.5": (36, 274), "samples_t0.7": (36, 274), "samples_t1.0": (36, 274),
        "reconstructions": (36, 274), "interpolations_linear": (70, 138),
    }  # fmt: skip
    names = sorted(os.listdir(images))
    assert names == sorted(f"{name}_epoch{e:03d}.png" for name in expected for e in (0, 1))
    for name, (h, w) in expected.items():
        grid = png(os.path.join(images, f"{name}_epoch001.png"))
        assert grid.shape == (HEADER + h, w, 3)
        body(grid)


def test_callback_reconstructions_match_their_targets(tiny_run, cifar_dir):
    grid = body(png(os.path.join(tiny_run, "images", "reconstructions_epoch001.png")))
    targets = val_pixels(cifar_dir, 4)
    for i in range(4):
        assert np.array_equal(tile(grid, 0, 2 * i), targets[i])
        assert np.array_equal(tile(grid, 0, 2 * i + 1), targets[i])


def test_callback_grids_reach_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = os.path.join(tiny_run, "lightning_logs", "version_0")
    acc = EventAccumulator(logs, size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {"samples/t0.7", "reconstructions", "interpolations/linear"} <= tags
    assert [e.step for e in acc.Images("samples/t0.7")] == [4, 8]  # one per epoch, at the global step


class FakeWandb(WandbLogger):
    """The real ``log_image`` (argument checks, ``wandb.Image``), with no W&B run behind it."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((metrics, step))


class FakeTensorBoard(TensorBoardLogger):
    def __init__(self):
        self.calls = []

    @property
    def experiment(self):
        return SimpleNamespace(add_image=lambda *args, **kwargs: self.calls.append((args, kwargs)))


def test_log_image_grid_sends_to_every_logger_and_always_writes_a_png(tmp_path):
    wandb, tensorboard = FakeWandb(), FakeTensorBoard()
    trainer = SimpleNamespace(
        loggers=[wandb, tensorboard], global_step=12, current_epoch=3, default_root_dir=str(tmp_path)
    )
    grid = torch.rand(3, 10, 40)
    path = log_image_grid(trainer, "samples/t0.7", grid, caption="T=0.7", scale=2)
    assert path == f"{tmp_path}/images/samples_t0.7_epoch003.png"
    assert png(path).shape == (2 * (HEADER + 10), 80, 3)  # the file: with the caption as its header, upscaled
    [(metrics, step)] = wandb.calls
    assert step == 12 and list(metrics) == ["samples/t0.7"]
    assert [image._caption for image in metrics["samples/t0.7"]] == ["T=0.7"]
    assert tensorboard.calls == [(("samples/t0.7", grid), {"global_step": 12})]  # the loggers: the grid as it is
    path = log_image_grid(trainer, "reconstructions", grid)  # no caption: no header
    assert list(wandb.calls[-1][0]) == ["reconstructions"]
    assert png(path).shape == (10, 40, 3)
    trainer.loggers = []  # no logger at all: still a file
    trainer.current_epoch = 4
    assert os.path.isfile(log_image_grid(trainer, "reconstructions", grid))


def test_eval_mode_restores_the_training_mode():
    module = torch.nn.Sequential(torch.nn.Dropout(0.5))
    with eval_mode(module):
        assert not module.training and not torch.is_grad_enabled()
    assert module.training and torch.is_grad_enabled()


def test_real_image_callbacks_skip_with_a_warning_without_images(cifar_dir):
    module = GlowModule(levels=2, steps_per_level=1, hidden_channels=8)
    no_val = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=0)
    for datamodule, reason in ((None, "need a glow_lightning datamodule"), (no_val, "'val' split is empty")):
        trainer = SimpleNamespace(datamodule=datamodule)
        for callback in (ReconstructionImages(), InterpolationImages()):
            with pytest.warns(UserWarning, match=reason):
                assert list(callback.grids(trainer, module)) == []


# ---------------------------------------------------------------------------------------- subcommands
@pytest.mark.slow
def test_sample_needs_only_the_checkpoint_and_is_reproducible(tiny_checkpoint, tmp_path, capsys):
    def sample(seed: int, name: str) -> np.ndarray:
        out = str(tmp_path / name)
        main(["sample", "--ckpt_path", tiny_checkpoint, "--num_samples", "6", "--nrow", "3",
              "--temperature", "0.7", "--seed_everything", str(seed), "--output", out])  # fmt: skip
        assert f"to {out}" in capsys.readouterr().out
        return png(out)

    first, again, other = sample(1, "a.png"), sample(1, "b.png"), sample(2, "c.png")
    assert first.shape == (HEADER + 2 * TILE + 2, 3 * TILE + 2, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_ckpt_path_last_is_the_runs_last_checkpoint(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "last.png")
    main(
        ["sample", "--trainer.default_root_dir", tiny_run, "--ckpt_path", "last", "--num_samples", "1", "--output", out]
    )
    assert f"to {out}" in capsys.readouterr().out
    assert png(out).shape == (HEADER + TILE + 2, TILE + 2, 3)


def test_reconstruct_writes_targets_beside_identical_reconstructions(tiny_checkpoint, cifar_dir, tmp_path, capsys):
    out = str(tmp_path / "recon.png")
    main(["reconstruct", *data_args(cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint,
          "--num_images", "6", "--pairs_per_row", "2", "--output", out])  # fmt: skip
    assert f"to {out}" in capsys.readouterr().out
    grid = unpadded(body(png(out)), 4 * TILE + 2)
    assert grid.shape == (3 * TILE + 2, 4 * TILE + 2, 3)
    targets = val_pixels(cifar_dir, 6)
    for i in range(6):
        row, col = divmod(i, 2)
        assert np.array_equal(tile(grid, row, 2 * col), targets[i])
        assert np.array_equal(tile(grid, row, 2 * col + 1), targets[i])


@pytest.mark.parametrize("amend", [[], ["--data.num_workers", "0"]])
def test_reconstruct_with_only_a_checkpoint_reads_the_runs_own_config(tiny_checkpoint, cifar_dir, tmp_path, capsys,
                                                                      amend):  # fmt: skip
    """``glow reconstruct --ckpt_path X`` alone: the data comes from the run's saved config.yaml (it was "the
    following arguments are required: reconstruct.data"), the same images as with the configs given; ``--data.X``
    options amend it (one of them made the data the bare base class: "another architecture (in_channels ...)")."""
    out = str(tmp_path / "recon.png")
    main(["reconstruct", "--ckpt_path", tiny_checkpoint, "--num_images", "4", "--pairs_per_row", "2",
          "--output", out, *amend])  # fmt: skip
    captured = capsys.readouterr()
    assert "glow reconstruct: data and settings from the run's config " in captured.err
    assert "lightning_logs/version_0/config.yaml" in captured.err and f"to {out}" in captured.out
    grid = unpadded(body(png(out)), 4 * TILE + 2)
    targets = val_pixels(cifar_dir, 4)
    assert np.array_equal(tile(grid, 1, 2), targets[3])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reconstruct", "--ckpt_path", "elsewhere.ckpt"],
         "glow reconstruct reads images: pass --config (the run's <run>/lightning_logs/version_N/config.yaml"),
        (["reconstruct", "--ckpt_path", "lone.ckpt", "--data.batch_size", "8"],
         "or --data: --data.X options alone do not name a dataset (see: glow reconstruct --help)"),
        (["fit", "--data.batch_size", "8"],
         "glow fit reads images: pass --config (a packaged one, e.g. mnist.yaml; glow configs lists them) or --data: "),
        (["sample", "--ckpt_path", "lone.ckpt", "--data.batch_size", "8"],
         "glow sample reads no images: leave out the --data.X options, or pass --data"),
        (["sample", "--output", "a.png"],
         "glow sample needs --ckpt_path: a checkpoint file of a glow fit run, or last / best (see: glow sample --help)"),
    ],
)  # fmt: skip
def test_reading_images_without_a_config_or_a_run_config_is_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                                      args, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    lone = torch.load(tiny_checkpoint, weights_only=True)
    del lone["glow_run"]  # a checkpoint file without its run: no saved config.yaml to read the data from
    torch.save(lone, "lone.ckpt")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert f"(see: glow {args[0]} --help)" in err


def test_interpolate_rows_run_from_one_image_to_the_other(tiny_checkpoint, cifar_dir, tmp_path, capsys):
    out = str(tmp_path / "interp.png")
    main(["interpolate", *data_args(cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint,
          "--pairs", "3", "--steps", "5", "--method", "spherical", "--output", out])  # fmt: skip
    assert f"to {out}" in capsys.readouterr().out
    grid = body(png(out))
    assert grid.shape == (3 * TILE + 2, 5 * TILE + 2, 3)
    images = val_pixels(cifar_dir, 6)
    for p in range(3):
        assert np.array_equal(tile(grid, p, 0), images[p])
        assert np.array_equal(tile(grid, p, 4), images[3 + p])
        assert not np.array_equal(tile(grid, p, 2), images[p])


def test_sample_help_documents_its_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt_path", "--num_samples", "--temperature", "--label", "--output", "--seed_everything"):
        assert flag in out
    assert "prior temperature" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.hidden_channels", "32"], "--model.hidden_channels=32 (checkpoint: 16)"),
        (["--label", "3"], "--label 3: this model is unconditional"),
        (["--temperature", "-1"], "--temperature must be a number >= 0, got -1.0"),
    ],
)
def test_sample_rejects_bad_arguments_with_exit_code_2(tiny_checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--ckpt_path", tiny_checkpoint, "--output", str(tmp_path / "s.png"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_interpolate_with_more_pairs_than_images_is_an_error(tiny_checkpoint, cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["interpolate", *data_args(cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint, "--pairs", "5"])
    assert exc.value.code == 2
    assert "--pairs 5 needs 10 images; the 'val' split has 8" in capsys.readouterr().err


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory) -> str:
    """A (untrained) class-conditional model saved like a Lightning checkpoint."""
    torch.manual_seed(0)
    module = GlowModule(levels=2, steps_per_level=1, hidden_channels=8, num_classes=10)
    path = str(tmp_path_factory.mktemp("cond") / "cond.ckpt")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_sample_label_of_a_class_conditional_model(conditional_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "nine.png")
    main(["sample", "--ckpt_path", conditional_checkpoint, "--label", "9", "--num_samples", "2", "--output", out])
    assert unpadded(body(png(out)), 2 * TILE + 2).shape == (TILE + 2, 2 * TILE + 2, 3)
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--ckpt_path", conditional_checkpoint, "--label", "10", "--output", out])
    assert exc.value.code == 2
    assert "--label 10 is out of range: this model has classes 0..9" in capsys.readouterr().err


def test_scale_upscales_the_png_by_nearest_neighbour(tiny_checkpoint, tmp_path, capsys):
    """``--scale 3``: each pixel a 3x3 block, the header's too."""
    out, big = str(tmp_path / "one.png"), str(tmp_path / "three.png")
    common = ["sample", "--ckpt_path", tiny_checkpoint, "--num_samples", "4", "--nrow", "2", "--seed_everything", "0"]
    main([*common, "--output", out])
    main([*common, "--output", big, "--scale", "3"])
    small, large = png(out), png(big)
    body(small)
    assert large.shape == (3 * small.shape[0], 3 * small.shape[1], 3)
    assert np.array_equal(large[::3, ::3], small) and np.array_equal(large[2::3, 1::3], small)
    with pytest.raises(SystemExit) as exc:
        main([*common, "--output", big, "--scale", "0"])
    assert exc.value.code == 2 and "--scale must be >= 1, got 0" in capsys.readouterr().err


def test_header_row_says_what_the_grid_shows(tmp_path):
    """The header is text drawn with PIL's default font: a different caption gives different header pixels."""
    grid = torch.rand(3, 34, 274)
    headers = {text: png(save_grid(grid, str(tmp_path / f"{i}.png"), header=text))[:HEADER]
               for i, text in enumerate(["T=0.7", "T=1", "target | reconstruction"])}  # fmt: skip
    assert not np.array_equal(headers["T=0.7"], headers["T=1"])
    for header in headers.values():
        assert header.shape == (HEADER, 274, 3) and (header < 128).any()
    narrow = png(save_grid(torch.rand(3, 34, 34), str(tmp_path / "n.png"), header="target | reconstruction"))
    assert narrow.shape[1] > 34 and (narrow[HEADER:, 34:] == 255).all()  # padded white to fit the text


def test_sample_callback_writes_upscaled_captioned_pngs(tmp_path):
    from glow_lightning.callbacks import SampleImages

    module = GlowModule(levels=2, steps_per_level=1, hidden_channels=8)
    trainer = SimpleNamespace(
        loggers=[], callbacks=[], global_step=0, current_epoch=0, is_global_zero=True, default_root_dir=str(tmp_path)
    )
    callback = SampleImages(temperatures=[0.7], num_samples=2, nrow=2, scale=2)
    callback.on_train_epoch_end(trainer, module)
    [path] = callback.last_files
    assert png(path).shape == (2 * (HEADER + TILE + 2), 2 * (2 * TILE + 2), 3)
    with pytest.raises(ValueError, match="scale must be an integer >= 1, got 0"):
        SampleImages(scale=0)
