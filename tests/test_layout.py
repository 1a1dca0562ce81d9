"""The house (issue 12): imports point down, the guard is a callback, the atomic CheckpointIO comes from the trainer."""

from __future__ import annotations

import ast
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from glow_lightning.callbacks import NonFiniteGuard
from glow_lightning.cli.subcommands import GlowTrainer
from glow_lightning.io import AtomicCheckpointIO, load_checkpoint_file
from glow_lightning.module import GlowModule

from .conftest import ROOT, fit_args

PACKAGE = os.path.join(ROOT, "glow_lightning")


def imports_of(path: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def files_in(folder: str) -> list[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]


def test_flow_imports_no_lightning():
    for path in files_in(os.path.join(PACKAGE, "flow")):
        bad = {n for n in imports_of(path) if n.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")}
        assert not bad, f"{path} imports {bad}"


def test_module_imports_nothing_from_data_and_callbacks_nothing_from_cli():
    assert not {n for n in imports_of(os.path.join(PACKAGE, "module.py")) if n.startswith("glow_lightning.data")}
    for path in files_in(os.path.join(PACKAGE, "callbacks")):
        bad = {n for n in imports_of(path) if n.startswith("glow_lightning.cli")}
        assert not bad, f"{path} imports {bad}"


def test_no_shims_at_the_old_top_level_paths():
    old = ("callbacks.py", "checkpoint.py", "checkpoint_io.py", "ema.py", "guard.py", "monitor.py", "prediction.py",
           "tracking.py", "trainer.py", "cli.py")  # fmt: skip
    assert not [f for f in old if os.path.exists(os.path.join(PACKAGE, f))]


def test_the_glow_trainer_adds_the_atomic_checkpoint_io_unless_one_is_given(tmp_path):
    plain = GlowTrainer(logger=False, default_root_dir=str(tmp_path))
    assert type(plain.strategy.checkpoint_io) is AtomicCheckpointIO
    own = TorchCheckpointIO()
    assert GlowTrainer(logger=False, plugins=[own], default_root_dir=str(tmp_path)).strategy.checkpoint_io is own
    assert GlowTrainer(logger=False, plugins=own, default_root_dir=str(tmp_path)).strategy.checkpoint_io is own


def test_the_cli_writes_through_the_atomic_checkpoint_io(cifar_dir, tiny_run):
    from glow_lightning.cli import main

    cli = main(["validate", *fit_args(cifar_dir, tiny_run)[1:], "--ckpt_path", "last"])
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_a_plain_trainer_gets_the_non_finite_guard_from_the_module(cifar_dir, tmp_path):
    from glow_lightning.data import CIFAR10DataModule

    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    module = GlowModule(levels=1, steps_per_level=1, hidden_channels=4, init_batch_size=8)
    trainer.fit(module, CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8, batch_size=8, num_workers=0))
    assert sum(isinstance(c, NonFiniteGuard) for c in trainer.callbacks) == 1
    assert "train/grad_norm" in trainer.callback_metrics and module.skipped_steps == 0


def test_the_guard_state_is_saved_and_an_old_checkpoint_resumes_with_its_skip_count(tiny_checkpoint, tmp_path):
    guard = NonFiniteGuard()
    guard.skipped_steps, guard.consecutive_skips = 3, 2
    restored = NonFiniteGuard()
    restored.on_load_checkpoint(None, None, {"callbacks": {"NonFiniteGuard": guard.state_dict()}})
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped_steps, restored.consecutive_skips) == (3, 2)

    old = load_checkpoint_file(tiny_checkpoint)  # a checkpoint as written before the guard was a callback
    old["callbacks"] = {k: v for k, v in old["callbacks"].items() if k != "NonFiniteGuard"}
    old["skipped_steps"] = 5
    legacy = NonFiniteGuard()
    legacy.on_load_checkpoint(None, None, old)
    assert (legacy.skipped_steps, legacy.consecutive_skips) == (5, 0)


@pytest.mark.slow
def test_resuming_an_old_checkpoint_keeps_its_skip_count(cifar_dir, tiny_checkpoint, tmp_path):
    from glow_lightning.cli import main

    old = load_checkpoint_file(tiny_checkpoint)
    old["callbacks"] = {k: v for k, v in old["callbacks"].items() if k != "NonFiniteGuard"}
    old["skipped_steps"] = 5
    path = str(tmp_path / "old.ckpt")
    torch.save(old, path)
    cli = main(fit_args(cifar_dir, str(tmp_path / "run"), "--trainer.max_epochs", "3", "--ckpt_path", path))
    assert cli.trainer.lightning_module.skipped_steps == 5
    saved = load_checkpoint_file(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert saved["callbacks"]["NonFiniteGuard"]["skipped_steps"] == 5
