"""FID / KID of samples (issue 16 item 3): torchmetrics' metrics fed by a tiny feature extractor, so no
Inception download is needed; the extractor checks it is given uint8 (B, 3, H, W) images."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.fid import (
    FeatureExtractorError,
    feature_extractor,
    fid_score,
    kid_score,
    sample_features,
)

from .conftest import cli_args

EXTRACTOR = "tests.test_fid.TinyFeatures"


class TinyFeatures(nn.Module):
    """13 fixed features: the mean of each channel over the 4 quadrants, and the pixels' spread.

    Records the shape of every batch it is given (``seen``), after asserting it is uint8 (B, 3, H, W).
    """

    seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, tuple(x.shape))
        TinyFeatures.seen.append(tuple(x.shape))
        x = x.float() / 255
        return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.flatten(1).std(1, keepdim=True)], 1)


@pytest.fixture(autouse=True)
def _fresh_record():
    TinyFeatures.seen.clear()


def features(pixels: torch.Tensor) -> torch.Tensor:
    return TinyFeatures()(pixels)


def test_identical_sets_give_fid_and_kid_near_zero_and_a_shifted_set_larger_ones():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(40, 200, (300, 3, 8, 8), dtype=torch.uint8, generator=g)
    same = features(real)
    fid_same = fid_score(same, same)
    kid_same, _ = kid_score(same, same, subsets=10, subset_size=100)  # unbiased MMD: random subsets, mean ~ 0
    fids = [fid_score(same, features(real + shift)) for shift in (10, 40)]  # brighter images
    kids = [kid_score(same, features(real + shift), subsets=10, subset_size=100)[0] for shift in (10, 40)]
    assert abs(fid_same) < 1e-6 and 1e-3 < fids[0] < fids[1], (fid_same, fids)
    assert abs(kid_same) < kids[0] / 10 and kids[0] < kids[1], (kid_same, kids)


class SampleSpy:
    """Wraps ``Glow.sample``: records (num_samples, temperature, labels) of every call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, float, torch.Tensor | None]] = []
        original = Glow.sample

        def sample(flow, num_samples, temperature=0.7, labels=None, generator=None):
            self.calls.append((num_samples, temperature, None if labels is None else labels.cpu()))
            return original(flow, num_samples, temperature, labels, generator)

        monkeypatch.setattr(Glow, "sample", sample)


def test_class_conditional_labels_are_drawn_uniformly_and_grayscale_becomes_three_channels(monkeypatch):
    flow = Glow(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8, num_classes=4).eval()
    spy = SampleSpy(monkeypatch)
    out = sample_features(flow, TinyFeatures(), 800, temperature=0.6, batch_size=300)
    assert out.shape == (800, 13)
    assert [(n, t) for n, t, _ in spy.calls] == [(300, 0.6), (300, 0.6), (200, 0.6)]
    assert TinyFeatures.seen == [(300, 3, 8, 8), (300, 3, 8, 8), (200, 3, 8, 8)]
    counts = torch.bincount(torch.cat([y for _, _, y in spy.calls]), minlength=4)
    assert counts.sum() == 800 and counts.min() > 150 and counts.max() < 250, counts  # 200 each expected


def fid_args(cifar_dir, root, ckpt, *extra):
    return [*cli_args("fid", cifar_dir, root), "--ckpt_path", ckpt, "--feature", EXTRACTOR, *extra]


@pytest.mark.slow
def test_glow_fid_samples_n_at_the_temperature_against_the_split_and_caches_its_features(
    tiny_checkpoint, cifar_dir, tmp_path, monkeypatch, capsys
):
    spy = SampleSpy(monkeypatch)
    cache = str(tmp_path / "cache")
    args = fid_args(cifar_dir, str(tmp_path), tiny_checkpoint, "--num_samples", "7", "--batch_size", "4",
                    "--temperature", "0.5", "--split", "test", "--cache_dir", cache, "--seed_everything", "3")  # fmt: skip
    main(args)
    printed = capsys.readouterr().out
    assert [(n, t, y) for n, t, y in spy.calls] == [(4, 0.5, None), (3, 0.5, None)]  # unconditional fixture
    # the 10 test images in batches of 4, 4, 2, then the 7 samples in batches of 4, 3
    assert TinyFeatures.seen == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32), (3, 3, 32, 32)]
    assert "computed the features of 10 test images" in printed and cache in printed
    assert "N=7 samples at T=0.5 vs the 10 test images of CIFAR10DataModule" in printed
    assert "KID subset_size 1000 > the 7 images of a set: using 7" in printed
    assert "note: FID at N=7 is biased upward" in printed
    (cached,) = os.listdir(cache)
    assert cached.startswith("fid-CIFAR10DataModule-test-")
    fid_line = next(line for line in printed.splitlines() if line.startswith("FID "))

    TinyFeatures.seen.clear()
    main(args)  # same seed: the same samples; the real features come from the cache
    again = capsys.readouterr().out
    assert "read the features of 10 test images" in again
    assert TinyFeatures.seen == [(4, 3, 32, 32), (3, 3, 32, 32)]  # the samples only
    assert next(line for line in again.splitlines() if line.startswith("FID ")) == fid_line

    main(fid_args(cifar_dir, str(tmp_path), tiny_checkpoint, "--num_samples", "3", "--split", "val",
                  "--cache_dir", cache))  # fmt: skip
    assert "N=3 samples at T=1 vs the 8 val images" in capsys.readouterr().out  # --data.val_size 8
    assert len(os.listdir(cache)) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_samples", "1"], "--num_samples must be >= 2"),
        (["--feature", "100"], "--feature 100: Inception-v3 features are one of (64, 192, 768, 2048)"),
        (["--feature", "tests.test_fid.Nothing"], "--feature tests.test_fid.Nothing: cannot import it"),
        (["--feature", "2048", "--feature_weights", "/nonexistent/inception.pth"],
         "--feature_weights /nonexistent/inception.pth: no such file"),
    ],
)  # fmt: skip
def test_glow_fid_rejects_bad_values_in_one_line(tiny_checkpoint, cifar_dir, tmp_path, capsys, extra, message):
    if "--feature_weights" in extra:  # checked when the extractor is built: without the fid extra, that is the error
        pytest.importorskip("torch_fidelity")
    with pytest.raises(SystemExit) as exc:
        main([*cli_args("fid", cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("glow: error: ") and message in err and err.count("\n") == 1, err


def test_inception_weights_not_downloadable_or_not_weights_name_the_option(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)  # no test touches the network
    with pytest.raises(FeatureExtractorError, match=r"^--feature_weights: the Inception weights could not be"):
        feature_extractor(2048)
    garbage = tmp_path / "inception.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureExtractorError, match=rf"^--feature_weights {garbage}: not a weights file"):
        feature_extractor(2048, str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(FeatureExtractorError, match=rf"^--feature_weights {wrong}: not Inception-v3 weights"):
        feature_extractor(2048, str(wrong))


@pytest.mark.slow
def test_feature_weights_reach_torchmetrics_inception(tmp_path, monkeypatch):
    """A local weights file is what the Inception network loads (random weights of the right shapes here)."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    shapes = {}
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: shapes)
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda self, state, *a, **k: shapes.update(state) or None)
    random_net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
               for k, v in random_net.state_dict().items()}  # fmt: skip
    path = tmp_path / "inception.pth"
    torch.save(weights, path)
    net = feature_extractor(2048, str(path))
    assert torch.equal(net.state_dict()["fc.weight"], weights["fc.weight"])
    out = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 2048)


@pytest.mark.slow
def test_val_fid_is_logged_every_k_epochs_with_one_small_n_warning(cifar_dir, tmp_path):
    args = cli_args("fit", cifar_dir, str(tmp_path), "--val_fid.every_n_epochs", "1", "--val_fid.num_samples", "4",
                    "--val_fid.feature", EXTRACTOR, "--val_fid.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    with pytest.warns(UserWarning, match="val/fid: FID at N=4 is biased upward") as record:
        cli = main(args)
    assert sum("val/fid" in str(w.message) for w in record) == 1  # once, not every epoch
    assert torch.isfinite(cli.trainer.callback_metrics["val/fid"])
    samples = [s for s in TinyFeatures.seen if s[0] == 4]
    assert len(samples) == 2  # 2 epochs (debug.yaml), 4 samples each; the 8 val images once
    assert TinyFeatures.seen.count((8, 3, 32, 32)) == 1
