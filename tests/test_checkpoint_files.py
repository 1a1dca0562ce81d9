"""Files that are not glow checkpoints get one clear error naming the file, on every entry point (issue 13, item 5)."""

from __future__ import annotations

import pytest
import torch

from glow_lightning import Glow
from glow_lightning.cli import main
from glow_lightning.flow.checks import CheckpointFileError
from glow_lightning.io import load_checkpoint_file

from .conftest import cli_args


@pytest.fixture(scope="module")
def odd_files(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("odd")
    ckpt = load_checkpoint_file(tiny_checkpoint)
    files = {}
    files["flow_state"] = str(root / "flow_state.pt")  # what a user saves with torch.save(flow.state_dict())
    torch.save(
        {k[len("flow.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("flow.")}, files["flow_state"]
    )
    files["module_state"] = str(root / "module_state.pt")
    torch.save(ckpt["state_dict"], files["module_state"])
    files["edited"] = str(root / "edited.ckpt")  # hyperparameters that disagree with the tensors
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "hidden_channels": 24}}, files["edited"])
    files["truncated"] = str(root / "truncated.ckpt")
    data = open(tiny_checkpoint, "rb").read()
    open(files["truncated"], "wb").write(data[: len(data) // 2])
    return files


@pytest.mark.parametrize("kind", ["flow_state", "module_state"])
def test_a_plain_state_dict_is_named_as_such_by_every_entry_point(kind, odd_files, cifar_dir, tmp_path, capsys):
    path = odd_files[kind]
    for args in (
        cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", path),
        ["sample", "--ckpt_path", path, "--output", str(tmp_path / "s.png")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and path in err[0] and "plain state_dict" in err[0], err
    with pytest.raises(CheckpointFileError, match="plain state_dict"):
        Glow.from_checkpoint(path)


def test_hyperparameters_that_disagree_with_the_tensors_are_one_line(odd_files, cifar_dir, tmp_path, capsys):
    path = odd_files["edited"]
    for args in (
        cli_args("test", cifar_dir, str(tmp_path), "--ckpt_path", path),
        ["sample", "--ckpt_path", path, "--output", str(tmp_path / "s.png")],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 1
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "taken from the checkpoint" not in line]
        assert len(err) == 1 and err[0].startswith("glow: error:") and "do not fit its hyperparameters" in err[0], err
    with pytest.raises(CheckpointFileError, match="do not fit its hyperparameters"):
        Glow.from_checkpoint(path)


def test_glow_from_checkpoint_names_a_truncated_or_missing_file(odd_files, tmp_path):
    with pytest.raises(CheckpointFileError, match="truncated.ckpt is not a readable checkpoint"):
        Glow.from_checkpoint(odd_files["truncated"])
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        Glow.from_checkpoint(str(tmp_path / "nope.ckpt"))
