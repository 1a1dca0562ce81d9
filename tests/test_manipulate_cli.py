"""``glow manipulate`` end to end on the CIFAR fixture: direction from labelled training images, saved and reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glow_lightning.cli import main
from glow_lightning.data import CIFAR10DataModule

from .test_images import TILE, data_args, png, tile, val_pixels

HEADER = 14  # the band naming the attribute and strengths above the grid


def train_labels(cifar_dir: str) -> torch.Tensor:
    dm = CIFAR10DataModule(data_dir=cifar_dir, download=False, val_size=8)
    return torch.tensor([dm.split("train")[i]["label"] for i in range(len(dm.split("train")))])


def test_manipulate_writes_one_row_per_image_and_reuses_its_saved_direction(
    tiny_checkpoint, cifar_dir, tmp_path, capsys
):
    out = str(tmp_path / "edit.png")
    args = [*data_args(cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint, "--num_images", "3",
            "--strengths", "[-1.5, 0, 1.5]"]  # fmt: skip
    main(["manipulate", *args, "--attribute", "3", "--direction_images", "5", "--output", out])
    printed = capsys.readouterr().out
    saved = torch.load(str(tmp_path / "edit.direction.pt"), weights_only=True)
    labels = train_labels(cifar_dir)
    assert saved["attribute"] == "3" and saved["ckpt_path"] == tiny_checkpoint
    assert saved["counts"] == {"with": min(5, int((labels == 3).sum())), "without": 5}
    assert f"{saved['counts']['with']} images with and 5 without" in printed
    grid = png(out)
    assert grid.shape[0] == HEADER + 3 * TILE + 2 and grid.shape[1] >= 3 * TILE + 2  # padded to fit the header
    assert (grid[:HEADER] < 128).any()  # the header's text
    body = grid[HEADER:]
    targets = val_pixels(cifar_dir, 3)
    for row in range(3):  # strength 0: the exact reconstruction, i.e. the image itself
        assert np.array_equal(tile(body, row, 1), targets[row])
        assert not np.array_equal(tile(body, row, 0), targets[row])
    again = str(tmp_path / "again.png")
    main(["manipulate", *args, "--direction", str(tmp_path / "edit.direction.pt"), "--output", again])
    assert np.array_equal(png(again), grid)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attribute", "12"], "--attribute 12 is not a class of CIFAR10DataModule (it has classes 0..9)"),
        ([], "glow manipulate needs --attribute"),
        (["--attribute", "3", "--direction_images", "0"], "--direction_images must be >= 1"),
        (["--direction", "nope.pt"], "--direction nope.pt: no such file (glow manipulate --attribute A --output X.png"),
    ],
)
def test_manipulate_rejects_bad_attributes_with_exit_code_2(
    tiny_checkpoint, cifar_dir, tmp_path, capsys, extra, message
):
    with pytest.raises(SystemExit) as exc:
        main(["manipulate", *data_args(cifar_dir, str(tmp_path)), "--ckpt_path", tiny_checkpoint,
              "--output", str(tmp_path / "m.png"), *extra])  # fmt: skip
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
