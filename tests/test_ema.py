"""EMA weights: averaged != raw after training, used for evaluation, swapped safely, saved and resumed."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from glow_lightning.callbacks import GlowCheckpoint
from glow_lightning.callbacks.ema import GlowEMA, averaged_weights
from glow_lightning.data import CIFAR10DataModule
from glow_lightning.module import GlowModule

TINY = dict(levels=2, steps_per_level=1, hidden_channels=16, warmup_steps=1, init_batch_size=16, permutation="invconv")


class Probe(L.Callback):
    """Records the weights the module holds during validation and at the start of training."""

    def __init__(self):
        self.val_state = None
        self.start = None

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.val_state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, GlowEMA))
        self.start = (
            {k: v.clone() for k, v in pl_module.state_dict().items()},
            {k: v.clone() for k, v in ema._average_model.module.state_dict().items()},
            int(ema._average_model.n_averaged),
        )


def fit(cifar_dir: str, root: str, max_steps: int, ckpt_path: str | None = None, probe: Probe | None = None):
    torch.manual_seed(0)
    model = GlowModule(**TINY, lr=1e-2)
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=8, num_workers=0)
    ema = GlowEMA(decay=0.5)
    callbacks = [ema, GlowCheckpoint(dirpath=os.path.join(root, "checkpoints"), every_n_train_steps=2)]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=callbacks + ([probe] if probe else []),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, ema, trainer


@pytest.fixture(scope="module")
def ema_run(cifar_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ema"))
    probe = Probe()
    model, ema, trainer = fit(cifar_dir, root, max_steps=4, probe=probe)
    ckpt = torch.load(os.path.join(root, "checkpoints", "last.ckpt"), weights_only=False)
    return root, model, ema, probe, ckpt


def flow_params(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("flow.") and v.is_floating_point()}


def test_averaged_weights_differ_from_raw_and_are_saved_as_state_dict(ema_run):
    _, _, _, _, ckpt = ema_run
    averaged, raw = flow_params(ckpt["state_dict"]), flow_params(ckpt["current_model_state"])
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4
    # ActNorm's flag and the constant buffers survive averaging exactly
    for key, value in ckpt["state_dict"].items():
        if key.endswith("initialized"):
            assert value.dtype == torch.bool and bool(value)


def test_validation_and_the_final_model_use_the_averaged_weights(ema_run):
    _, model, _, probe, ckpt = ema_run
    for key, value in flow_params(ckpt["state_dict"]).items():
        torch.testing.assert_close(probe.val_state[key], value, rtol=0, atol=0)  # validation saw the EMA
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)  # after fit: EMA copied in


def test_swapping_weights_refreshes_the_cached_inverse_and_log_determinant(ema_run):
    _, model, ema, _, ckpt = ema_run
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    fresh = GlowModule(**TINY)
    fresh.load_state_dict(ckpt["current_model_state"])
    fresh.eval()
    with torch.no_grad():
        before = model.flow.log_prob(x)  # fills the eval caches with the EMA weights
        ema._average_model.module.load_state_dict(ckpt["current_model_state"])
        ema.swap(model)  # Lightning's swap: .data.copy_, no tensor version bump
        try:
            after = model.flow.log_prob(x)
            torch.testing.assert_close(after, fresh.flow.log_prob(x))
            assert not torch.allclose(before, after)
            latents, _ = model.flow.encode(x)
            torch.testing.assert_close(model.flow.decode(latents), x, atol=1e-4, rtol=0)  # cached inverse refreshed
        finally:
            ema.swap(model)


def test_averaged_weights_context_swaps_in_and_out(ema_run):
    _, model, ema, _, ckpt = ema_run
    trainer = L.Trainer(callbacks=[ema], logger=False)
    model.load_state_dict(ckpt["current_model_state"])
    ema._average_model.module.load_state_dict(ckpt["state_dict"])
    key = next(iter(flow_params(ckpt["state_dict"])))
    with averaged_weights(trainer, model):
        assert torch.equal(model.state_dict()[key], ckpt["state_dict"][key])
    assert torch.equal(model.state_dict()[key], ckpt["current_model_state"][key])


@pytest.mark.slow
def test_resume_restores_raw_and_averaged_weights(ema_run, cifar_dir):
    root, _, _, _, ckpt = ema_run
    probe = Probe()
    fit(cifar_dir, root, max_steps=6, ckpt_path=os.path.join(root, "checkpoints", "last.ckpt"), probe=probe)
    raw, averaged, n_averaged = probe.start
    for key, value in flow_params(ckpt["current_model_state"]).items():
        assert torch.equal(raw[key], value)
        assert torch.equal(averaged[key], ckpt["state_dict"][key])
    assert n_averaged == 4


def test_buffers_are_not_averaged_and_survive_every_swap_exactly(ema_run):
    """ActNorm's boolean flag (and any permutation, LU mask or sign): the EMA and raw states hold the
    module's own buffers, bit for bit (an EMA formula would round or truncate them)."""
    _, model, _, _, ckpt = ema_run
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers and any(name.endswith("initialized") for name in buffers)
    for name in buffers:
        assert torch.equal(ckpt["state_dict"][name], ckpt["current_model_state"][name]), name
        assert torch.equal(ckpt["state_dict"][name], model.state_dict()[name]), name


def test_ema_is_off_by_default_and_validates_decay():
    assert not GlowEMA().enabled
    with pytest.raises(ValueError, match="decay"):
        GlowEMA(decay=1.5)


def test_image_callbacks_draw_with_the_averaged_weights(cifar_dir, tmp_path):
    from glow_lightning.callbacks.images import _EpochImages

    class GridProbe(_EpochImages):
        def grids(self, trainer, pl_module):
            ema = next(c for c in trainer.callbacks if isinstance(c, GlowEMA))
            self.inside = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.average = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
            return iter(())

    class RawProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            self.raw = {k: v.clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(0)
    grid_probe, raw_probe = GridProbe(every_n_epochs=1), RawProbe()
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=8, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[GlowEMA(decay=0.5), raw_probe, grid_probe],
    )  # fmt: skip
    model = GlowModule(**TINY, lr=1e-2)
    trainer.fit(model, datamodule=dm)
    key = "flow.steps.0.0.coupling.net.0.weight"
    assert not torch.equal(grid_probe.inside[key], raw_probe.raw[key])  # not the raw weights...
    assert torch.equal(grid_probe.average[key], raw_probe.raw[key])  # ...those were swapped out
    assert torch.equal(grid_probe.inside[key], model.state_dict()[key])  # the EMA, copied in at train end


def test_warm_start_from_an_ema_checkpoint_takes_its_averaged_weights(ema_run, cifar_dir, tmp_path):
    """GlowModule(init_weights=...) in plain Lightning: the checkpoint's state_dict (EMA) before the first step."""
    _, _, _, _, ckpt = ema_run
    path = str(tmp_path / "ema.ckpt")
    torch.save(ckpt, path)  # a copy: the resume test rewrites the run's last.ckpt

    class StartState(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    start = StartState()
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=8, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[start],
    )  # fmt: skip
    trainer.fit(GlowModule(**TINY, lr=1e-2, init_weights=path), datamodule=dm)
    averaged, raw = flow_params(ckpt["state_dict"]), flow_params(ckpt["current_model_state"])
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)
    assert all(torch.equal(start.state[k], v) for k, v in ckpt["state_dict"].items())
    assert trainer.global_step == 1


def test_the_ema_callback_pickles_for_ddp_spawn():
    """``--trainer.strategy ddp_spawn`` pickles the callbacks: Lightning's EMA averaging function (torch's
    get_ema_avg_fn, a closure) failed with "Can't pickle local object ... ema_update" before training."""
    import pickle

    from torch.optim.swa_utils import get_ema_avg_fn

    average, current = torch.randn(5), torch.randn(5)
    for warmup, n, decay in [(False, 3, 0.9), (True, 3, 4 / 13), (True, 200, 0.9)]:  # (1 + n) / (10 + n) up to 0.9
        ema = pickle.loads(pickle.dumps(GlowEMA(decay=0.9, warmup=warmup)))
        update = [average.clone()]
        ema._kwargs["multi_avg_fn"](update, [current], torch.tensor(n))  # in place, all parameters at once
        torch.testing.assert_close(update[0], get_ema_avg_fn(decay)(average, current, torch.tensor(n)))
    pickle.dumps(GlowEMA())  # EMA off: the callback is still in every glow fit's trainer


def test_the_average_follows_a_short_run_with_the_decay_warmup():
    """With the decay warmup (default), the first weights' share of the average after n updates is the product of
    (1 + k) / (10 + k), ~10! / n^9, not decay ** n (37% after 1,000 updates at 0.999)."""
    from glow_lightning.callbacks.ema import warmed_up_decay

    decays = [float(warmed_up_decay(0.999, torch.tensor(n))) for n in range(1, 1001)]
    assert decays[0] == pytest.approx(2 / 11) and decays[-1] == pytest.approx(1001 / 1010)
    assert float(warmed_up_decay(0.999, torch.tensor(9000))) == pytest.approx(0.999)  # the decay itself from ~8,990
    assert math.prod(decays) < 1e-15 and 0.999**1000 > 0.36
