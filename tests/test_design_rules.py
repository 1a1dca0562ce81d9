"""DESIGN.md rules that no other test pinned down: one test per rule, each failing when the rule is broken."""

from __future__ import annotations

import copy
import os

import lightning as L
import pytest
import torch

from glow_lightning import Glow
from glow_lightning.callbacks import GlowCheckpoint
from glow_lightning.cli import GlowCLI
from glow_lightning.data import CIFAR10DataModule
from glow_lightning.flow.layers import ActNorm, ZeroConv2d
from glow_lightning.module import GlowModule

from .conftest import fit_args


class ActNormAtSanityCheck(L.Callback):
    """Records ActNorm's state when Lightning's sanity check (on validation data, in eval mode) starts and ends."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def _record(self, pl_module) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.flow.state_dict().items() if ".actnorm." in k})

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._record(pl_module)
        trainer.should_stop = True  # the rule is about what happens before training


def test_actnorm_is_initialised_from_training_data_before_the_sanity_check(cifar_dir):
    """Rule 1: initialised once, at the start of fit, from the datamodule's training batch; the sanity check
    (validation data, eval mode) neither initialises nor changes it."""
    torch.manual_seed(0)
    module = GlowModule(in_channels=3, image_size=32, levels=2, steps_per_level=1, hidden_channels=8, init_batch_size=6)
    data = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=4, num_workers=0)
    probe = ActNormAtSanityCheck()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    expected = copy.deepcopy(module.flow)
    expected.initialize(data.init_batch(6)["x"])  # the training images the module must use
    trainer.fit(module, data)
    before, after = probe.states
    assert before.keys() == after.keys() and len(before) == 6  # 2 levels x 1 step x (bias, logs, initialized)
    for key, value in expected.state_dict().items():
        if ".actnorm." in key:
            torch.testing.assert_close(before[key], value, msg=key)
            torch.testing.assert_close(after[key], value, msg=key)


def test_learning_rate_warmup_is_on_by_default():
    """Rule 5: a default GlowModule starts at a small fraction of its lr and reaches it after the warmup."""
    module = GlowModule(levels=1, steps_per_level=1, hidden_channels=8)
    warmup = module.hparams.warmup_steps
    assert warmup >= 100
    assert module.lr_factor(0) <= 0.01
    assert module.lr_factor(warmup // 2) == pytest.approx(0.5, abs=0.01)
    assert module.lr_factor(warmup - 1) == module.lr_factor(warmup) == 1.0


@pytest.mark.parametrize("permutation", ["invconv", "invconv_lu", "reverse", "shuffle"])
def test_all_state_is_in_the_state_dict(permutation):
    """Rule 6: permutations, LU masks and signs, ActNorm's flag are registered: a Glow built from another seed
    and given the first one's state_dict computes the same densities and samples."""
    args = dict(in_channels=1, image_size=8, levels=2, steps_per_level=2, hidden_channels=8, permutation=permutation)
    torch.manual_seed(1)
    first = Glow(**args)
    first.initialize(torch.rand(4, 1, 8, 8))
    torch.manual_seed(2)
    second = Glow(**args)
    second.load_state_dict(first.state_dict())
    first.eval(), second.eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(second.log_prob(x), first.log_prob(x), rtol=0, atol=0)
    latents, _ = first.encode(x)
    torch.testing.assert_close(second.decode(latents), first.decode(latents), rtol=0, atol=0)
    assert second.is_initialized and all(
        isinstance(m.initialized, torch.Tensor) for m in second.modules() if isinstance(m, ActNorm)
    )


def test_zero_conv_starts_at_zero_and_scales_by_exp_three_logs():
    """Rule 4: the last conv of the coupling nets and of the priors outputs zero at first, then conv(x) * exp(3 logs)."""
    layer = ZeroConv2d(4, 6)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(layer(x), torch.zeros(2, 6, 5, 5))
    with torch.no_grad():
        layer.conv.weight.normal_()
        layer.logs.fill_(0.2)
    torch.testing.assert_close(layer(x), layer.conv(x) * torch.exp(torch.tensor(0.6)))


def test_overlay_replacing_trainer_callbacks_keeps_the_checkpoint_and_image_callbacks(cifar_dir, tmp_path):
    """Lightning rule: jsonargparse replaces lists, so an overlay's trainer.callbacks must not drop ours."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    args = fit_args(cifar_dir, str(tmp_path / "run"), "--config", str(overlay))[1:]  # run=False: no subcommand
    cli = GlowCLI(args=args, run=False)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"LearningRateMonitor", "SampleImages", "ReconstructionImages", "InterpolationImages"} <= names
    assert isinstance(cli.trainer.checkpoint_callback, GlowCheckpoint)
    assert cli.trainer.checkpoint_callback.dirpath == os.path.join(str(tmp_path / "run"), "checkpoints")
