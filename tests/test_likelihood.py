"""Per-image likelihoods (`glow predict` -> CSV -> histogram) and the importance-weighted test bound."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from glow_lightning import Glow
from glow_lightning.callbacks.predictions import read_predictions
from glow_lightning.cli import main
from glow_lightning.data import CIFAR10DataModule
from glow_lightning.data.noise import EVAL_STREAM
from glow_lightning.histogram import main as histogram_main
from glow_lightning.module import GlowModule

from .conftest import config


def eval_args(subcommand: str, cifar_dir: str, root: str, ckpt: str, *extra: str) -> list[str]:
    return [
        subcommand, "--config", config("cifar.yaml"), "--config", config("debug.yaml"),
        "--data.data_dir", cifar_dir, "--data.download", "false", "--data.val_size", "8",
        "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false", "--ckpt_path", ckpt,
        *extra,
    ]  # fmt: skip


def evaluation_batch(cifar_dir: str, split: str = "test") -> dict:
    """The split's images as the datamodule prepares them for evaluation (same noise as predict/test)."""
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8)
    dm.setup("predict")
    items = [dm.splits[split][i] for i in range(len(dm.splits[split]))]
    raw = {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
    return dm.prepare_batch(raw, train=False)


@pytest.fixture(scope="module")
def predictions(cifar_dir, tiny_checkpoint, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("predict"))
    main(eval_args("predict", cifar_dir, root, tiny_checkpoint))
    return os.path.join(root, "predictions", "cifar10_test.csv")


def test_predict_writes_one_row_per_image_with_the_models_bits_per_dim(predictions, cifar_dir, tiny_checkpoint):
    table = read_predictions(predictions)
    batch = evaluation_batch(cifar_dir)
    assert table["index"].tolist() == batch["index"].tolist() == list(range(10))  # one row per test image
    assert table["label"].tolist() == batch["label"].tolist()
    flow = Glow.from_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        expected = flow.bits_per_dim(batch["x"]).double()
        prior_terms, logdet = flow.log_prob_terms(batch["x"])
    torch.testing.assert_close(table["bpd"], expected, atol=1e-5, rtol=0)
    to_bits = -1 / (flow.dims * math.log(2))
    for level, term in enumerate(prior_terms, start=1):
        torch.testing.assert_close(table[f"bpd_level{level}"], term.double() * to_bits, atol=1e-5, rtol=0)
    torch.testing.assert_close(table["bpd_logdet"], logdet.double() * to_bits, atol=1e-5, rtol=0)


def test_predicted_parts_add_up_to_the_total(predictions):
    table = read_predictions(predictions)
    parts = [c for c in table if c.startswith("bpd_")]
    assert parts == ["bpd_level1", "bpd_level2", "bpd_logdet", "bpd_dequantization", "bpd_discretization"]
    torch.testing.assert_close(sum(table[c] for c in parts), table["bpd"], atol=1e-5, rtol=0)
    assert (table["bpd_discretization"] == 8).all() and (table["bpd_dequantization"] == 0).all()
    assert (table["bpd_level1"] > 0).all() and not torch.allclose(table["bpd"], table["bpd"].mean().expand(10))


@pytest.mark.slow
def test_predict_another_split_and_histogram(predictions, cifar_dir, tiny_checkpoint, tmp_path):
    val_csv = str(tmp_path / "val.csv")
    main(
        eval_args(
            "predict", cifar_dir, str(tmp_path), tiny_checkpoint,
            "--data.predict_split", "val", "--prediction_writer.output", val_csv,
        )
    )  # fmt: skip
    assert len(read_predictions(val_csv)["bpd"]) == 8
    png = str(tmp_path / "hist.png")
    histogram_main([predictions, val_csv, "--output", png, "--labels", "test", "val"])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_histogram_help_is_a_summary_and_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        histogram_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "overlaid, and save it as a PNG" in out and "--column" in out
    assert "Args:" not in out and "Returns:" not in out  # not the whole docstring run together


@pytest.mark.parametrize(("content", "message"), [(b"\x89PNG\r\n\x1a\n", "is not a CSV file written by glow predict"),
                                                 (b"index,bpd\n1,abc\n", "is not a CSV file written by glow predict"),
                                                 (b"", "is empty: not a CSV file written by glow predict")])  # fmt: skip
def test_histogram_of_a_file_that_is_not_predictions_is_one_line_naming_it(tmp_path, capsys, content, message):
    """A PNG passed by mistake printed only "error: 'utf-8' codec can't decode byte 0x89", after a usage dump."""
    path = tmp_path / "seven.png"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        histogram_main([str(path), "--output", str(tmp_path / "h.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"python -m glow_lightning.histogram: error: {path} ")
    assert message in err and len(err.strip().splitlines()) == 1


def test_importance_weighted_bound_with_one_sample_is_the_single_sample_estimate(cifar_dir, tiny_checkpoint, tmp_path):
    cli = main(eval_args("test", cifar_dir, str(tmp_path), tiny_checkpoint, "--model.iw_samples", "1"))
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["test/bpd"].item())
    assert metrics["test/bpd_iw"].item() == pytest.approx(metrics["test/bpd"].item(), abs=1e-6)


def test_importance_weighted_bound_is_not_above_the_average_single_sample_estimate(cifar_dir, tiny_checkpoint):
    samples = 4
    module = GlowModule.load_from_checkpoint(tiny_checkpoint, iw_samples=samples)
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    iw = trainer.test(module, datamodule=dm, verbose=False)[0]
    batch = evaluation_batch(cifar_dir)
    with torch.no_grad():
        single = [
            module.flow.bits_per_dim(dm.dequantize(batch["bins"], batch["index"], EVAL_STREAM + s)).mean().item()
            for s in range(samples)
        ]
    print(f"test/bpd {iw['test/bpd']:.5f}  single-sample per stream {single}  test/bpd_iw(S=4) {iw['test/bpd_iw']:.5f}")
    assert iw["test/bpd"] == pytest.approx(single[0], abs=1e-5)  # draw 0 is the datamodule's evaluation noise
    assert len(set(single)) == samples  # distinct noise per draw
    assert iw["test/bpd_iw"] < sum(single) / samples


def test_fit_help_documents_the_new_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--ema.decay", "--prediction_writer.output", "--model.dequantization", "--model.iw_samples"):
        assert flag in out
    assert "variational" in out
