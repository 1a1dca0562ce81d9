"""LikelihoodWriter: ``glow predict`` writes one CSV row of bits/dim per image.

Built on Lightning's ``BasePredictionWriter``. Every rank appends its rows to its own part file as
batches finish; when prediction ends, rank 0 merges the parts into one CSV sorted by image index
(dropping any duplicate a distributed sampler padded in) and removes them. Columns: ``index``,
``label``, ``bpd`` and its parts in bits/dim, which add up to it: ``bpd_level1..L`` (each level's
prior, finest first), ``bpd_logdet``, ``bpd_dequantization`` (log q(u|x) / (D ln 2), 0 for uniform
noise) and ``bpd_discretization`` (n_bits). See :meth:`GlowModule.predict_step`.

Default file: ``<trainer.default_root_dir>/predictions/<dataset>_<split>.csv`` (e.g.
``runs/cifar/predictions/cifar10_test.csv``).
"""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from ..console import say


def dataset_name(datamodule: Any) -> str:
    """``CIFAR10DataModule`` -> ``cifar10``; ``data`` when there is no datamodule."""
    if datamodule is None:
        return "data"
    return type(datamodule).__name__.removesuffix("DataModule").lower() or "data"


class LikelihoodWriter(BasePredictionWriter):
    """Write per-image bits/dim from ``glow predict`` to a CSV file.

    Args:
        output: CSV path; default ``<trainer.default_root_dir>/predictions/<dataset>_<split>.csv``.
    """

    def __init__(self, *, output: str | None = None):
        super().__init__(write_interval="batch")
        self.output = output
        self.path: str | None = None
        self._file = None
        self._writer = None

    def resolve_path(self, trainer: L.Trainer) -> str:
        if self.output:
            return self.output
        datamodule = getattr(trainer, "datamodule", None)
        split = getattr(datamodule, "predict_split", "predict")
        root = trainer.default_root_dir or os.getcwd()
        return os.path.join(root, "predictions", f"{dataset_name(datamodule)}_{split}.csv")

    def _part(self, rank: int) -> str:
        return f"{self.path}.part{rank}"

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.resolve_path(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self._part(trainer.global_rank), "w", newline="")
        self._writer = None

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        columns = list(prediction)
        if self._writer is None:
            self._writer = csv.writer(self._file)
            self._writer.writerow(columns)
        values = [prediction[c].detach().cpu() for c in columns]
        for row in zip(*(v.tolist() for v in values)):
            self._writer.writerow(row)  # floats at full precision (repr round-trips)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        self._file = None
        trainer.strategy.barrier("prediction_writer")
        if trainer.is_global_zero:
            self._merge(trainer.world_size)
            say(f"glow predict: wrote {self.path}", all_ranks=True)  # rank 0 here
        trainer.strategy.barrier("prediction_writer_merged")

    def _merge(self, world_size: int) -> None:
        header, rows = None, {}
        for rank in range(world_size):
            part = self._part(rank)
            with open(part, newline="") as f:
                reader = csv.reader(f)
                part_header = next(reader, None)
                if part_header is not None:
                    header = part_header
                    for row in reader:
                        rows.setdefault(int(row[0]), row)  # index is the first column; drop padded duplicates
            os.remove(part)
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            if header is not None:
                writer.writerow(header)
                writer.writerows(rows[i] for i in sorted(rows))


def read_predictions(path: str) -> dict[str, torch.Tensor]:
    """A LikelihoodWriter CSV -> ``{column: tensor}`` (float64, ``index`` and ``label`` int64).

    Raises ValueError naming ``path`` when it is not such a file (a PNG, a truncated or hand-edited CSV)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
        out = {}
        for c in columns:
            dtype = torch.int64 if c in ("index", "label") else torch.float64
            out[c] = torch.tensor([float(r[c]) for r in rows], dtype=torch.float64).to(dtype)
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError) as err:  # TypeError: a short row's None
        raise ValueError(f"{path} is not a CSV file written by glow predict ({type(err).__name__}: {err})") from err
    if not columns:
        raise ValueError(f"{path} is empty: not a CSV file written by glow predict")
    return out
