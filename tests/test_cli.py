"""The ``glow`` command: help, version, fit -> checkpoints -> test, resume, and bad input."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.module import GlowModule

from .conftest import cli_args, config, fit_args


def run_cli(args: list[str]):
    return main(args)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_help_gives_each_subcommand_one_full_summary(capsys):
    """``glow --help`` lists every subcommand with a whole sentence of its own (Lightning's docstrings' first lines
    are cut mid-sentence: "It's separated from fit to make sure you never run on your")."""
    from glow_lightning.cli import GlowCLI
    from glow_lightning.cli.subcommands import GlowTrainer

    with pytest.raises(SystemExit):
        run_cli(["--help"])
    listing = capsys.readouterr().out.split("Available subcommands:")[1]
    summaries, name = {}, None
    for line in listing.splitlines():
        entry = re.match(r"    (\w+) +(\S.*)", line)
        if entry:
            name, summaries[entry.group(1)] = entry.group(1), entry.group(2).strip()
        elif name and line.startswith(" " * 20) and line.strip():
            summaries[name] += " " + line.strip()
    assert set(summaries) == set(GlowCLI.subcommands())
    for sub, summary in summaries.items():
        first_line = getattr(GlowTrainer, sub).__doc__.strip().splitlines()[0]
        assert summary == first_line and summary.endswith("."), (sub, summary)
    assert len(set(summaries.values())) == len(summaries)


def test_subcommand_usage_lists_its_own_arguments_first(capsys):
    with pytest.raises(SystemExit):
        run_cli(["sample", "--help"])
    out = capsys.readouterr().out
    for own in ("--ckpt_path", "--num_samples", "--temperature", "--output"):
        assert out.index(own) < out.index("--trainer."), own


def test_model_help_shows_the_model_group_only(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--model.help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model.levels" in out and "--model.warmup_steps" in out
    assert "--trainer." not in out and "--data.batch_size" not in out
    text = " ".join(out.split())  # the linked ones: where to set them, by the data-side keys that exist
    assert "n_bits (--data.n_bits)" in text and "num_classes (--data.class_conditional true)" in text
    assert "--data.num_classes" not in text and "--data.num_channels" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--version"])
    assert exc.value.code == 0
    assert re.match(r"glow \d+\.\d+", capsys.readouterr().out)


def test_fit_help_documents_model_and_data_arguments(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model.levels",
        "--model.steps_per_level",
        "--model.hidden_channels",
        "--model.coupling",
        "--model.permutation",
        "--model.warmup_steps",
        "--checkpoint.save_top_k",
    ):
        assert flag in out
    assert "flow steps K per level" in out
    assert "{adam,adamax}" in out or "adamax" in out


def test_optimizer_is_set_on_the_model_only(capsys):
    """LightningCLI's --optimizer / --lr_scheduler would replace the model's optimizer and warmup: not offered."""
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.optimizer" in out and "--optimizer " not in out and "--lr_scheduler " not in out
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", config("cifar.yaml"), "--optimizer", "SGD", "--print_config"])
    assert exc.value.code == 2
    assert "--optimizer" in capsys.readouterr().err


def test_fit_writes_last_and_best_checkpoints(tiny_run):
    files = sorted(os.listdir(os.path.join(tiny_run, "checkpoints")))
    assert "last.ckpt" in files
    assert any(re.match(r"epoch\d{3}-step\d{7}-bpd\d+\.\d{4}\.ckpt", f) for f in files), files


def test_test_subcommand_reports_finite_bits_per_dim(cifar_dir, tiny_checkpoint, tmp_path):
    cli = run_cli(cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", tiny_checkpoint))
    bpd = float(cli.trainer.callback_metrics["test/bpd"])
    assert math.isfinite(bpd) and 7.0 < bpd < 9.0


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_evaluating_the_test_split_needs_only_the_test_files(cifar_dir, tiny_checkpoint, tmp_path, subcommand):
    """An out-of-distribution check downloads a dataset's test split only (SVHN's test_32x32.mat): glow test and
    predict (its default split is test) read nothing else (they raised 'not found: .../data_batch_1')."""
    only_test = tmp_path / "data" / "cifar-10-batches-py"
    only_test.mkdir(parents=True)
    shutil.copy(os.path.join(cifar_dir, "cifar-10-batches-py", "test_batch"), only_test)
    extra = ["--prediction_writer.output", str(tmp_path / "p.csv")] if subcommand == "predict" else []
    run_cli(cli_args(subcommand, str(tmp_path / "data"), str(tmp_path / "run"), "--ckpt_path", tiny_checkpoint, *extra))
    if subcommand == "predict":
        assert len(open(tmp_path / "p.csv").read().splitlines()) == 1 + 10  # the header and the 10 test images


def test_checkpoint_holds_plain_hyperparameters_and_yields_a_pure_glow(tiny_checkpoint, cifar_dir):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert ckpt["hyper_parameters"]["levels"] == 2
    flow = Glow.from_checkpoint(tiny_checkpoint)
    module = GlowModule.load_from_checkpoint(tiny_checkpoint, weights_only=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(x), module.flow.log_prob(x))
    assert flow.is_initialized


def test_resume_from_last_continues_the_step_count(tiny_run, cifar_dir, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    before = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)["global_step"]
    cli = run_cli(fit_args(cifar_dir, run, "--ckpt_path", "last", "--trainer.max_epochs", "3"))
    assert before == 8
    assert cli.trainer.global_step == before + 4


def test_new_fit_refuses_to_overwrite_an_earlier_run(tiny_run, cifar_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    logs = sorted(os.listdir(os.path.join(run, "lightning_logs")))
    with pytest.raises(SystemExit) as exc:
        run_cli(fit_args(cifar_dir, run))
    assert exc.value.code == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before
    assert sorted(os.listdir(os.path.join(run, "lightning_logs"))) == logs  # no version_1 of the refused run


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--model.coupling", "spline"], "model.coupling"),
        (["--model.levels", "6"], "image_size=32 is not divisible by 2**levels=64"),
        (["--data.n_bits", "12"], "n_bits"),
        (["--model.n_bits", "5"], "model.n_bits"),  # linked from the data side
        (["--trainer.max_epochs", "many"], "trainer.max_epochs"),
    ],
)
def test_bad_config_value_exits_2_naming_the_key(cifar_dir, tmp_path, capsys, extra, culprit):
    with pytest.raises(SystemExit) as exc:
        run_cli(fit_args(cifar_dir, str(tmp_path), *extra))
    assert exc.value.code == 2
    assert culprit in capsys.readouterr().err


def test_explicit_flag_contradicting_the_checkpoint_is_an_error(cifar_dir, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(
            cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", tiny_checkpoint, "--model.hidden_channels", "32")
        )
    assert exc.value.code == 2
    assert "--model.hidden_channels=32 (checkpoint: 16)" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["test", "sample"])
def test_explicit_flag_equal_to_its_default_contradicting_the_checkpoint_is_an_error(
    subcommand, cifar_dir, tiny_checkpoint, tmp_path, capsys
):
    """512 is GlowModule's default hidden_channels: given explicitly, it must not silently become the checkpoint's 16."""
    if subcommand == "test":
        args = cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", tiny_checkpoint)
    else:  # no config at all
        args = ["sample", "--ckpt_path", tiny_checkpoint, "--output", str(tmp_path / "samples.png")]
    with pytest.raises(SystemExit) as exc:
        run_cli([*args, "--model.hidden_channels", "512"])
    assert exc.value.code == 2
    assert "--model.hidden_channels=512 (checkpoint: 16)" in capsys.readouterr().err


def test_checkpoint_of_another_architecture_names_the_difference(cifar_dir, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(cli_args("test", cifar_dir, str(tmp_path), "--data.n_bits", "5", "--ckpt_path", tiny_checkpoint))
    assert exc.value.code == 1
    assert "n_bits: checkpoint 8 vs this model 5" in capsys.readouterr().err


def test_console_script_end_to_end(cifar_dir, tiny_checkpoint, tmp_path):
    """The one real ``glow`` process of the suite: installed entry point, test bits/dim printed."""
    glow = os.path.join(os.path.dirname(sys.executable), "glow")  # this Python's (a venv not activated too)
    glow = glow if os.path.exists(glow) else shutil.which("glow")
    out = subprocess.run(
        [glow, "test", "--config", config("cifar.yaml"), "--config", config("debug.yaml"),
         "--data.data_dir", cifar_dir, "--data.download", "false", "--data.val_size", "8",
         "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
         "--ckpt_path", tiny_checkpoint],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"test/bpd\s+([0-9.]+)", out.stdout)
    assert match and math.isfinite(float(match.group(1))), out.stdout[-2000:]


def test_evaluation_with_the_dataset_config_alone_takes_the_architecture_from_the_checkpoint(
    cifar_dir, tiny_checkpoint, tmp_path, capsys
):
    """configs/cifar.yaml says K=32, width 512; the checkpoint K=2, width 16: config values yield, one line says so,
    and the test logs go to <run>/test/, not a new lightning_logs/version_N."""
    args = ["test", "--config", config("cifar.yaml"), "--data.data_dir", cifar_dir, "--data.download", "false",
            "--data.val_size", "8", "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_test_batches", "1", "--ckpt_path", tiny_checkpoint]  # fmt: skip
    cli = run_cli(args)
    assert cli.model.hparams.hidden_channels == 16 and cli.model.hparams.steps_per_level == 2
    err = capsys.readouterr().err
    assert (
        "glow test: taken from the checkpoint: levels=2 (config: 3), steps_per_level=2 (config: 32), hidden_channels=16"
        in err
    )
    assert os.path.isdir(tmp_path / "test" / "version_0") and not os.path.exists(tmp_path / "lightning_logs")


@pytest.mark.parametrize(("data", "hint"), [(["--data.class_conditional", "true"], ", or --data.class_conditional false"),
                                            (["--data.n_bits", "5"], ", or --data.n_bits 8")])  # fmt: skip
def test_evaluation_with_data_of_another_shape_names_the_data_option(cifar_dir, tiny_checkpoint, tmp_path, capsys,
                                                                     data, hint):  # fmt: skip
    """The data sets num_classes and n_bits (they do not yield to the checkpoint as the model's own values do): the
    mismatch line says which option (it named only 'num_classes: checkpoint 0 vs this model 10')."""
    with pytest.raises(SystemExit):
        run_cli(["test", *fit_args(cifar_dir, str(tmp_path))[1:], "--ckpt_path", tiny_checkpoint, *data])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("glow: error: the checkpoint was trained with another architecture (")
    assert err.endswith(f"; the data sets these: pass the config the run was trained with{hint}")


def test_the_config_a_fit_saved_works_for_every_image_subcommand(tiny_run, tmp_path):
    saved = os.path.join(tiny_run, "lightning_logs", "version_0", "config.yaml")
    for subcommand in ("sample", "reconstruct", "interpolate"):
        output = str(tmp_path / f"{subcommand}.png")
        run_cli([subcommand, "--config", saved, "--ckpt_path", "last", "--output", output])
        assert os.path.getsize(output) > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["prepare"], "glow: error: glow prepare needs --output (see: glow prepare --help)"),  # was "prepare.output"
        (["prepare", "--output", "x", "--chunk_bytes", "abc"],  # was litdata's traceback, after the conversion began
         "glow: error: --chunk_bytes must be a shard size such as 64MB, 1GB or 500kb, got 'abc'"),
        (["fit", "--trainer.devices", "two"],  # was Lightning's TypeError traceback
         "glow: error: `devices` selected with `CPUAccelerator` should be an int > 0."),
    ],
)  # fmt: skip
def test_bad_values_lightning_or_litdata_would_raise_are_one_line(cifar_dir, tmp_path, monkeypatch, capsys, extra,
                                                                  message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = cli_args(extra[0], cifar_dir, str(tmp_path / "run"), "--trainer.accelerator", "cpu", *extra[1:])
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(("name", "hint"), [("cifar", "; did you mean --config cifar.yaml?"),
                                            ("configs/mnist.yml", "; did you mean --config mnist.yaml?"),
                                            ("nosuch.yaml", "; glow configs lists the packaged ones")])  # fmt: skip
def test_a_config_that_does_not_exist_points_at_the_packaged_ones(tmp_path, monkeypatch, capsys, name, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", name])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"File does not exist: '{tmp_path / name}'{hint} (see: glow fit --help)" in err


def test_packaged_configs_resolve_from_an_empty_directory_and_a_file_path_wins(cifar_dir, tmp_path, monkeypatch):
    from glow_lightning.cli.main import CONFIGS_DIR, resolve_configs

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_configs(["fit", "--config", "cifar.yaml", "--config=configs/debug.yaml"]) == [
        "fit", "--config", os.path.join(CONFIGS_DIR, "cifar.yaml"), f"--config={os.path.join(CONFIGS_DIR, 'debug.yaml')}",
    ]  # fmt: skip
    (tmp_path / "debug.yaml").write_text("trainer:\n  max_epochs: 1\n")
    assert resolve_configs(["--config", "debug.yaml", "--config", "nosuch.yaml"]) == [
        "--config", "debug.yaml", "--config", "nosuch.yaml",
    ]  # fmt: skip
    cli = run_cli(["fit", "--config", "cifar.yaml", "--config", "configs/debug.yaml", "--config", "debug.yaml",
                   "--data.data_dir", cifar_dir, "--data.download", "false", "--data.val_size", "8",
                   "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert cli.trainer.current_epoch == 1 and cli.model.hparams.hidden_channels == 16  # packaged debug + local file


def test_glow_configs_lists_every_packaged_config(capsys):
    from glow_lightning.cli.main import CONFIGS_DIR

    assert run_cli(["configs"]) is None
    out = capsys.readouterr().out
    names = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml"))
    assert "cifar.yaml" in names and all(f"  {name}" in out for name in names)
    # each a sentence or cut at a word with "..." (the first comment line alone ended mid-sentence, "...appendix):")
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:]}
    assert lines["mnist.yaml"].endswith("width 512, n_bits 8.") and lines["cifar.yaml"].endswith("...")
    assert all(len(text) <= 100 and text.endswith((".", "...", ")")) for text in lines.values())


@pytest.mark.slow
def test_the_cpu_quick_start_overlay_trains_mnist_and_writes_6x6_grids_at_3x(tmp_path, capsys):
    """README "First model on a CPU": ``--config mnist.yaml --config cpu.yaml`` (here on an MNIST fixture, stopped
    after 2 steps instead of 10 minutes): the small model, its lr plan line and 6 x 6 sample grids upscaled 3x."""
    from PIL import Image

    from .fixtures import write_mnist

    data = write_mnist(str(tmp_path / "data"), train_size=40, test_size=10)
    root = str(tmp_path / "run")
    cli = run_cli([
        "fit", "--config", "mnist.yaml", "--config", "cpu.yaml", "--data.data_dir", data, "--data.download", "false",
        "--data.val_size", "8", "--data.num_workers", "0", "--trainer.default_root_dir", root,
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--model.init_batch_size", "8",
    ])  # fmt: skip
    flow = cli.model.flow
    assert (flow.levels, len(flow.steps[0]), flow.config["hidden_channels"]) == (2, 8, 128)
    assert cli.datamodule.batch_size == 32 and cli.config["fit"]["trainer"]["max_time"] == "00:00:10:00"
    assert "glow: lr schedule: resolved from the step time over the first 2% of max_time" in capsys.readouterr().out
    grid = Image.open(os.path.join(root, "images", "samples_t0.7_epoch000.png"))
    assert grid.width == 3 * (6 * (32 + 2) + 2)  # 6 columns of 32x32 digits, 2-pixel padding, 3x
    assert os.path.exists(os.path.join(root, "checkpoints", "last.ckpt"))


def test_lightnings_adverts_are_dropped_and_its_other_messages_kept(cifar_dir, tiny_checkpoint, tmp_path):
    """Lightning logs "💡 Tip: ... try installing litlogger" for every Trainer, so on every glow command."""
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        main(["sample", "--ckpt_path", tiny_checkpoint, "--num_samples", "4", "--output", str(tmp_path / "s.png")])
    finally:
        logger.removeHandler(handler)
    assert any(m.startswith("GPU available") for m in messages)  # the handler saw Lightning's messages
    assert not [m for m in messages if "Tip:" in m]


def test_library_internal_deprecations_are_dropped_and_other_warnings_kept(tiny_checkpoint, tmp_path, recwarn):
    """Newer torch (2.14 here) deprecates ``LeafSpec()``, which Lightning itself calls: one FutureWarning per glow command that
    the user cannot act on. The glow command drops that one; other FutureWarnings still show."""
    import warnings

    main(["sample", "--ckpt_path", tiny_checkpoint, "--num_samples", "4", "--output", str(tmp_path / "s.png")])
    recwarn.clear()
    warnings.warn(
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
        "treespec.is_leaf()` instead.",
        FutureWarning,
        stacklevel=1,
    )
    warnings.warn("some other future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["some other future change"]


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_ckpt_path_and_seed_help_are_glows(capsys, subcommand):
    """Lightning's texts named "hpc" / "registry" and a "best" of the same process, and did not say what is seeded."""
    with pytest.raises(SystemExit):
        run_cli([subcommand, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("Resume a run from" if subcommand == "fit" else "Required: the checkpoint to evaluate") in text
    assert '``"registry"``' not in text and "The data's order, noise and flips follow --data.seed" in text
