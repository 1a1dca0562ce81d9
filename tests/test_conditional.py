"""Class-conditional Glow (paper section 5): label-conditioned top prior, top-latent classifier, val/acc."""

from __future__ import annotations

import math

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.module import GlowModule

from .conftest import config
from .fixtures import write_mnist

TINY = dict(in_channels=1, image_size=8, levels=2, steps_per_level=1, hidden_channels=8, warmup_steps=0)


def loss_of(module: GlowModule, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    batch = {"x": x, "label": labels, "index": torch.arange(len(x))}
    return module._shared_step(batch, "val")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_classifier_loss_is_added_only_for_a_class_conditional_model():
    torch.manual_seed(0)
    x, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = GlowModule(**TINY)
    plain.flow.initialize(x)
    bpd = plain.flow.bits_per_dim(x).mean()
    assert torch.allclose(loss_of(plain, x, labels), bpd)
    assert plain.flow.classifier is None and not hasattr(plain, "val_acc")

    cond = GlowModule(**TINY, num_classes=3, y_weight=0.5)
    cond.load_state_dict(plain.state_dict(), strict=False)  # same flow; prior and classifier start at zero
    assert torch.allclose(cond.flow.bits_per_dim(x, labels).mean(), bpd)
    # zero-initialised classifier: uniform prediction, cross-entropy log2(3) bits
    assert torch.allclose(loss_of(cond, x, labels), bpd + 0.5 * math.log2(3), atol=1e-5)
    loss_of(cond, x, labels).backward()
    assert cond.flow.classifier.linear.weight.grad.abs().sum() > 0
    no_weight = GlowModule(**TINY, num_classes=3, y_weight=0.0)
    no_weight.load_state_dict(plain.state_dict(), strict=False)
    assert torch.allclose(loss_of(no_weight, x, labels), bpd)
    with pytest.raises(ValueError, match="y_weight"):
        GlowModule(**TINY, num_classes=3, y_weight=-1.0)


def test_samples_for_a_label_have_the_image_shape_and_bad_labels_are_refused():
    flow = Glow(in_channels=3, image_size=8, levels=2, steps_per_level=1, hidden_channels=8, num_classes=4).eval()
    for k in range(4):
        samples = flow.sample(5, labels=torch.full((5,), k))
        assert samples.shape == (5, 3, 8, 8) and (samples >= 0).all() and (samples < 1).all()
    with torch.no_grad():  # the class term moves the prior: different labels, different samples
        flow.top_prior.class_proj.weight.normal_()
    g = [torch.Generator().manual_seed(0) for _ in range(2)]
    a, b = (flow.sample(2, labels=torch.full((2,), k), generator=gen) for k, gen in zip((0, 3), g))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"labels must be in 0..3, got \[4, 4\]"):
        flow.sample(2, labels=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="class-conditional.*labels"):
        flow.sample(2)


@pytest.mark.slow
def test_class_conditional_fit_links_the_class_count_and_logs_val_accuracy(tmp_path):
    root = write_mnist(str(tmp_path), train_size=40, test_size=10)
    cli = main(
        ["fit", "--config", config("mnist.yaml"), "--config", config("debug.yaml"), "--data.data_dir", root,
         "--data.download", "false", "--data.val_size", "8", "--data.class_conditional", "true",
         "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
         "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert cli.model.hparams.num_classes == 10 and cli.model.flow.classifier is not None
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert float(metrics["train/y_bits"]) > 0
    flow = Glow.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert flow.num_classes == 10 and flow.sample(3, labels=torch.tensor([7, 7, 7])).shape == (3, 1, 32, 32)


def test_class_conditional_without_labels_exits_2(tmp_path, capsys):
    from .fixtures import write_image_folder

    root = write_image_folder(str(tmp_path / "flat"), classes=(), per_class=4)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", config("imagefolder.yaml"), "--config", config("debug.yaml"),
              "--data.data_dir", root, "--data.class_conditional", "true"])  # fmt: skip
    assert exc.value.code == 2
    assert "class_conditional=True needs class labels" in capsys.readouterr().err
