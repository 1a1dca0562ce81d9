"""The ``glow`` console script: a LightningCLI with glow-lightning's wiring.

    glow fit --config configs/cifar.yaml
    glow test --config configs/cifar.yaml --ckpt_path runs/cifar/checkpoints/last.ckpt
    glow predict --config configs/cifar.yaml --ckpt_path runs/cifar/checkpoints/last.ckpt  # per-image CSV
    glow sample --ckpt_path runs/cifar/checkpoints/last.ckpt --temperature 0.7 --output samples.png

- The datamodule's image shape, ``n_bits`` and class count are linked into the model, so they are
  set once, on the data side.
- The checkpoint callback is registered as ``checkpoint`` (not in ``trainer.callbacks``, which a
  stacked config would replace), with its directory fixed at ``<default_root_dir>/checkpoints``;
  so are the image-grid callbacks (``samples``, ``reconstructions``, ``interpolations``) and ``val_fid``.
- ``glow --help`` lists each subcommand by one line of its own (GlowTrainer's docstrings); a subcommand's usage
  line names its own arguments only, and ``--model.help`` / ``--trainer.help`` print one group (jsonargparse's
  ``--data.help CLASS`` the datamodule's).
- ``sample``, ``reconstruct``, ``interpolate``, ``manipulate`` and ``fid`` are :class:`~glow_lightning.cli.subcommands.GlowTrainer`
  methods; ``sample`` needs no datamodule (the image shape comes from the checkpoint).
- With ``--ckpt_path``, the model's hyperparameters come from the checkpoint; a value set
  explicitly (on the command line or in a config) that contradicts the checkpoint is an error.
- ``--ckpt_path last`` is resolved here to ``<checkpoint dir>/last.ckpt`` through fsspec, so it
  also finds checkpoints on s3://, gs:// or memory:// (Lightning's own lookup drops the protocol).
- User errors (bad values, missing or unreadable files, unwritable directories, a training run
  stopped by the non-finite guard) end with a one-line ``glow: error: ...``, not a traceback.
- A fit stopped by SIGTERM / SIGINT (GlowCheckpoint has written ``last.ckpt``) exits with 143 / 130 and
  one line naming the checkpoint and ``--ckpt_path last``.
- On a fit resume, training settings (:data:`TRAINING_KEYS`) may differ from the checkpoint: they apply
  from the resumed step on (one ``glow: resuming with ...`` line; another ``optimizer`` starts a fresh
  optimizer state); architecture values may not. ``--model.init_weights`` (a warm start: weights only,
  step 0) is loaded before fit and refused together with a ``--ckpt_path`` of another run.

Private library API used here, each for want of a public hook (check these on a Lightning or
jsonargparse upgrade):

- ``LightningCLI._prepare_subcommand_parser``: ``glow sample`` without a datamodule (no public way to
  make the datamodule optional for one subcommand).
- ``LightningCLI._parse_ckpt_path``: where LightningCLI reads ``--ckpt_path`` hyperparameters; ours checks
  them against what was given.
- ``LightningCLI._run_subcommand`` and ``LightningCLI._parser``: our subcommands' ValueErrors become parser
  errors (exit code 2) of the right subcommand.
- ``ArgumentParser.parse_args(..., _skip_validation=True)``: re-parsing without defaults to find the keys
  given explicitly.
- Message wording of jsonargparse / argparse read by :func:`condense` and ``GlowArgumentParser.error``:
  ``Parser key "KEY":``, ``Problem with given class_path '...':``, ``- Expected a <class 'NoneType'>``,
  ``Given value:``, ``Errors:`` and argparse's ``argument --X: expected one argument``. Should the wording
  change, the message stays complete, only longer (tests/test_bad_input.py shows it).
"""

from __future__ import annotations

import argparse
import glob
import inspect
import logging
import os
import re
import signal
import sys
import traceback
import warnings

import torch
from fsspec.core import url_to_fs
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from .. import __version__
from ..callbacks import (
    FIDMonitor,
    GlowCheckpoint,
    GlowEMA,
    InterpolationImages,
    InvertibilityMonitor,
    LikelihoodWriter,
    NonFiniteTrainingError,
    ReconstructionImages,
    SampleImages,
)
from ..callbacks.checkpoint import UnknownMonitorError
from ..callbacks.preemption import exit_code
from ..data import GlowDataModule
from ..data.base import DatasetError
from ..fid import FeatureExtractorError
from ..flow.glow import ARCH_BEFORE_KEY
from ..io import (
    NotWritableError,
    UnreadableCheckpointError,
    check_writable,
    join,
    load_checkpoint_file,
    require_glow_checkpoint,
)
from ..module import CheckpointMismatchError, GlowModule
from .subcommands import GlowTrainer
from .tracking import LoggerSaveConfigCallback, checkpoint_run, wandb_save_dir_in_run

LINKED_FROM_DATA = {
    "num_channels": "in_channels",
    "image_size": "image_size",
    "n_bits": "n_bits",
    "num_classes": "num_classes",
}
EVALUATION_ONLY = ("iw_samples",)  # model arguments a --ckpt_path does not override
# model arguments that change how a model trains, not what it is: they never conflict outside fit, and in fit
# (resume) they apply from the resumed step on (GlowModule.on_train_start; another ``optimizer`` starts a fresh
# optimizer state, GlowModule.on_load_checkpoint), all but ``init_weights``, a warm start, which a resume refuses
TRAINING_KEYS = frozenset(
    {"optimizer", "lr", "weight_decay", "warmup_steps", "warmup_fraction", "schedule", "y_weight",
     "max_consecutive_skips", "init_batch_size", "compile", "memory_saving", "iw_samples", "init_weights"}
)  # fmt: skip
RESUME_CHANGEABLE = TRAINING_KEYS - {"init_weights"}
EVALUATING = ("validate", "test", "predict")  # Lightning's subcommands that evaluate a model
SPECIAL_CKPT_PATHS = ("best", "hpc", "registry")  # Lightning's own --ckpt_path values
_CKPT_NAMES = (
    "a checkpoint file (a path or an fsspec URL such as s3://...), last (<default_root_dir>/checkpoints/last.ckpt, "
    "the newest state) or best (that folder's best file by --checkpoint.monitor)"
)
CKPT_PATH_HELP = {
    "fit": f"Resume a run from {_CKPT_NAMES}; with last and no checkpoint yet, a new run starts (set-and-forget for "
    "preemptible jobs). A warm start from another run's weights: --model.init_weights.",
    **{
        name: f"Required: the checkpoint to evaluate, {_CKPT_NAMES}. The architecture comes from the checkpoint."
        for name in EVALUATING
    },
}
IMAGE_SUBCOMMANDS = ("sample", "reconstruct", "interpolate", "prepare", "manipulate", "fid")  # GlowTrainer methods
NEEDS_NO_DATA = ("sample",)


def shown(value) -> str:
    """A hyperparameter's value in a message: strings as they are typed (``adamax``), the rest as ``repr``."""
    return value if isinstance(value, str) else repr(value)


def checkpoint_dir(default_root_dir: str | None) -> str:
    """The fixed checkpoint directory of a run: ``<default_root_dir>/checkpoints``."""
    root = default_root_dir or os.getcwd()
    return join(root, "checkpoints")


def load_checkpoint_hparams(path: str) -> dict:
    """The model hyperparameters stored in a checkpoint, loaded without running any pickled code."""
    hparams = require_glow_checkpoint(load_checkpoint_file(path), path)["hyper_parameters"]
    return {**ARCH_BEFORE_KEY, **hparams}  # a key the checkpoint predates: the network it was trained with


def find_last(dirpath: str) -> str | None:
    """``<dirpath>/last.ckpt`` if it exists, on any fsspec filesystem."""
    path = join(dirpath, "last.ckpt")
    fs, target = url_to_fs(path)
    return path if fs.exists(target) else None


def find_best(dirpath: str) -> str | None:
    """The best checkpoint of the run in ``dirpath``: the one ``last.ckpt``'s checkpoint callback tracks (looked up in
    ``dirpath`` by name, so a moved run folder works), else the only checkpoint besides ``last.ckpt``; None if
    neither. Lightning's own ``ckpt_path="best"`` only knows the best file of a fit in the same process."""
    fs, target = url_to_fs(dirpath)
    last = find_last(dirpath)
    if last is not None:
        try:
            states = load_checkpoint_file(last).get("callbacks") or {}
        except (UnreadableCheckpointError, FileNotFoundError):
            states = {}
        for state in states.values():
            tracked = state.get("best_model_path") if isinstance(state, dict) else None
            if tracked:
                path = join(dirpath, os.path.basename(tracked))
                if fs.exists(url_to_fs(path)[1]):
                    return path
    if not fs.isdir(target):
        return None
    others = sorted(p for p in fs.ls(target, detail=False) if p.endswith(".ckpt") and not p.endswith("/last.ckpt"))
    return join(dirpath, os.path.basename(others[0])) if len(others) == 1 else None


def runs_here_hint() -> str:
    """For a ``--ckpt_path last`` that found nothing: the runs with a ``last.ckpt`` under ``./runs`` (where the
    packaged configs train), newest first, and how to pick one; empty when there are none."""
    found = sorted(glob.glob(os.path.join("runs", "*", "checkpoints", "last.ckpt")), key=os.path.getmtime, reverse=True)
    runs = [os.path.dirname(os.path.dirname(p)) for p in found]
    if not runs:
        return ""
    shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
    return f"; runs here with a last.ckpt, newest first: {shown} (pass the run's --config, or --trainer.default_root_dir {runs[0]})"


def without_configs(args: list[str]) -> list[str]:
    """``args`` without its ``--config FILE`` / ``-c FILE`` / ``--config=FILE`` entries."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--config", "-c"):
            skip = True
        elif not arg.startswith("--config="):
            out.append(arg)
    return out


def run_config_of(ckpt_path: str) -> str | None:
    """The ``config.yaml`` that ``glow fit`` saved for the run of ``<run>/checkpoints/X.ckpt``, if there is one."""
    for log_dir in reversed(checkpoint_run(ckpt_path)["log_dirs"]):  # the checkpoint's own training
        if os.path.isfile(os.path.join(log_dir, "config.yaml")):
            return os.path.join(log_dir, "config.yaml")
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))  # no record: the run's newest
    found = sorted(glob.glob(os.path.join(run, "lightning_logs", "version_*", "config.yaml")), key=os.path.getmtime)
    return found[-1] if found else None


EVALUATION_LOGS = ("test", "validate", "predict")  # subcommands whose default logs go to <run>/<subcommand>/


def evaluation_logs_in_run(trainer_config, subcommand: str) -> None:
    """The default logger of ``glow test`` / ``validate`` / ``predict`` writes to ``<run>/<subcommand>/version_N``,
    not a new ``lightning_logs/version_N`` beside the training run's logs. A logger given explicitly is kept."""
    if trainer_config.get("logger") not in (None, True):
        return
    trainer_config["logger"] = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=trainer_config.get("default_root_dir") or ".", name=subcommand),
    )


def condense(message: str) -> str:
    """A jsonargparse error on one line: ``--key: reason (given value)``."""
    key = re.match(r'Parser key "([^"]+)":', message)
    nested = re.search(
        r"Problem with given class_path '([^']+)':\n(.*?)\n\s*(?:- Expected a <class 'NoneType'>|Given value|- Problem with)",
        message,
        re.S,
    )
    if key and nested:  # --data.KEY of a subclass: the reason given for KEY, not the Union's summary
        inner = condense(" ".join(line.strip() for line in nested.group(2).splitlines()))
        if inner.startswith("--"):
            return f"--{key.group(1)}.{inner[2:]}"
        return f"--{key.group(1)}: {inner} ({nested.group(1)})"
    raw = [line for line in message[key.end() if key else 0 :].splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    if "Errors:" in lines:  # "Does not validate against any of the Union subtypes" -> the reasons
        top = min((len(x) - len(x.lstrip()) for x in raw if x.lstrip().startswith("- ")), default=0)
        reasons = [  # the subtypes' own reasons, not the lists nested under them
            x.strip()[2:] for x in raw
            if len(x) - len(x.lstrip()) == top and x.lstrip().startswith("- ") and "Expected a <class 'NoneType'>" not in x
        ]  # fmt: skip
        specific = [r for r in reasons if not r.startswith("Not a valid subclass of ")]
        reasons = specific or reasons  # "min_interval must be >= 0", not also "Not a valid subclass of Callback"
        given = [x[len("Given value: ") :] for x in lines if x.startswith("Given value:") and len(x) < 80]
        lines = ["; ".join(reasons) + "".join(f", got {g}" for g in given)]
    # older jsonargparse (4.39) words an unknown key "Validation failed: Key 'k' is not expected": one wording for all
    text = re.sub(
        r"(?:Validation failed: )?Key '([^']+)' is not expected", r"Option '\1' is not accepted", " ".join(lines)
    )
    return f"--{key.group(1)}: {text}" if key else text


class GlowArgumentParser(LightningArgumentParser):
    """A parser whose errors are one ``glow: error: ...`` line (and exit code 2), not a usage dump."""

    @override
    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse is probing: let it catch the exception
            return super().error(message, ex)
        subcommand = self.prog.split()[-1] if " [options] " in self.prog else ""
        missing = re.fullmatch(r"argument (--\S+): expected one argument", message)
        if missing:  # argparse takes a value like -1e-3 for an option
            message += f" (a value that starts with '-' is written {missing.group(1)}=VALUE)"
        # jsonargparse >= 4.40 says "the following arguments are required: X.data", 4.39 'Key "X.data" is required'
        required = re.search(r"""(?:arguments are required: |Key ")(\w+)\.(\w+)(?=[",]|$)""", message)
        if required:  # checked by the root parser: the subcommand is the key's first part
            subcommand = required.group(1)
        if required and required.group(2) == "data":  # `glow reconstruct --ckpt_path X`, no config.yaml found
            message = reads_images(subcommand)
        elif required and required.group(2) == "ckpt_path":  # `glow sample --output a.png`
            message = f"glow {subcommand} needs --ckpt_path: a checkpoint file of a glow fit run, or last / best"
        elif required:  # `glow prepare` without --output: "required: prepare.output"
            message = f"glow {subcommand} needs --{required.group(2)}"
        no_config = re.search(r"""(?:--config|key "config"): File does not exist: '([^']*)'""", message)
        if no_config:  # --config cifar, --config configs/cifar.yml
            stem = os.path.splitext(os.path.basename(no_config.group(1)))[0]
            known = os.path.isfile(os.path.join(CONFIGS_DIR, f"{stem}.yaml"))
            message += f"; did you mean --config {stem}.yaml?" if known else "; glow configs lists the packaged ones"
        sys.stderr.write(f"glow: error: {condense(message)} (see: glow {subcommand} --help)\n".replace("  ", " "))
        raise SystemExit(2)


def reads_images(subcommand: str) -> str:
    """The error of a subcommand that reads images given no dataset."""
    if subcommand == "fit":
        return (
            "glow fit reads images: pass --config (a packaged one, e.g. mnist.yaml; glow configs lists them) or --data"
        )
    return (
        f"glow {subcommand} reads images: pass --config (the run's <run>/lightning_logs/version_N/config.yaml, "
        "or the configs it was trained with, e.g. mnist.yaml) or --data"
    )


class GroupHelp(argparse.Action):
    """``--model.help`` / ``--trainer.help``: print one group's arguments and exit. jsonargparse has
    ``--data.help CLASS`` for subclass groups (the datamodule) only; the model and trainer are plain class groups."""

    def __init__(
        self, option_strings, dest, *, key: str, cls: type, skip: set[str] = frozenset(), note: str = "", **kw
    ):
        kw.setdefault("help", f"Show the --{key}.* arguments only and exit.")
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kw)
        self.key, self.cls, self.skip, self.note = key, cls, set(skip), note

    def __call__(self, parser, namespace, values, option_string=None):
        prog = parser.prog.replace(" [options]", "")
        group = LightningArgumentParser(
            prog=prog, usage=f"%(prog)s [--{self.key}.ARG VALUE ...]", description=self.note
        )
        if self.skip:
            group.add_class_arguments(self.cls, self.key, skip=self.skip, fail_untyped=False)
        else:
            group.add_lightning_class_args(self.cls, self.key)
        group.print_help()
        parser.exit()


def short_usage(subcommand: str, trainer_class: type, skip: set[str]) -> str:
    """``glow SUBCOMMAND``'s usage line with its own arguments only (argparse's lists every trainer, model and
    data argument: ~100 lines before the subcommand's own)."""
    own = []
    for name, param in inspect.signature(getattr(trainer_class, subcommand)).parameters.items():
        if name in skip or name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        arg = f"--{name} {name.upper()}"
        own.append(arg if param.default is inspect.Parameter.empty else f"[{arg}]")
    lines = ["%(prog)s [-h] [-c CONFIG]"]
    for part in [*own, "[--trainer.* --model.* --data.* ...: see below]"]:
        if len(lines[-1]) + len(part) + 1 > 96:
            lines.append("   ")
        lines[-1] += " " + part
    return "\n".join(lines)


class GlowCLI(LightningCLI):
    """LightningCLI for glow-lightning (``glow --help``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("trainer_class", GlowTrainer)
        parser_kwargs = {
            "description": "Train and evaluate Glow normalizing flows. `glow configs` lists the packaged configs "
            "(`--config cifar.yaml` finds them from any directory). `glow SUBCOMMAND --help` shows a subcommand's "
            "arguments; `glow fit --model.help`, `--trainer.help` or `--data.help CLASS` one group's.",
            **{
                name: {"usage": short_usage(name, kwargs["trainer_class"], skip)}
                for name, skip in self.subcommands().items()
            },
        }
        for key, value in (kwargs.pop("parser_kwargs", None) or {}).items():  # the caller's settings win
            parser_kwargs[key] = {**parser_kwargs[key], **value} if isinstance(value, dict) else value
        kwargs["parser_kwargs"] = parser_kwargs
        kwargs.setdefault("parser_class", GlowArgumentParser)
        # the optimizer and schedule are --model.optimizer / lr / warmup_steps / schedule; LightningCLI's own
        # --optimizer / --lr_scheduler would silently replace GlowModule.configure_optimizers (warmup included)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(GlowModule, GlowDataModule, *args, subclass_mode_data=True, **kwargs)

    @override
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in IMAGE_SUBCOMMANDS}}

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        if subcommand not in NEEDS_NO_DATA:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        else:
            datamodule_class, self.datamodule_class = self.datamodule_class, None  # LightningCLI: data not required
            try:
                parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            finally:
                self.datamodule_class = datamodule_class
        for action in parser._actions:
            if action.dest == "ckpt_path" and subcommand in CKPT_PATH_HELP:  # Lightning's: "hpc", "registry", ...
                action.help = CKPT_PATH_HELP[subcommand]
            elif action.dest == "seed_everything":  # Lightning's text did not say what it seeds, nor the configs' 0
                action.help = (
                    "Seed of torch, numpy and Python's random (model init, sampling); an int, or true for a random "
                    "one (logged). The packaged configs set 0. The data's order, noise and flips follow --data.seed."
                )
        return parser

    @override
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"glow {__version__}")
        return parser

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--model.help", action=GroupHelp, key="model", cls=GlowModule, skip=set(LINKED_FROM_DATA.values()),
            note="GlowModule's arguments. Linked from the datamodule, so set on the data side: in_channels and "
            "image_size (the dataset's; --data.channels and --data.image_size where the datamodule takes them, e.g. "
            "ImageFolderDataModule), n_bits (--data.n_bits), num_classes (--data.class_conditional true).",
        )  # fmt: skip
        parser.add_argument("--trainer.help", action=GroupHelp, key="trainer", cls=self.trainer_class)
        parser.add_lightning_class_args(GlowCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleImages, "samples")
        parser.add_lightning_class_args(ReconstructionImages, "reconstructions")
        parser.add_lightning_class_args(InterpolationImages, "interpolations")
        parser.add_lightning_class_args(InvertibilityMonitor, "invertibility")
        parser.add_lightning_class_args(FIDMonitor, "val_fid")  # off unless --val_fid.every_n_epochs is set
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)
        parser.add_lightning_class_args(GlowEMA, "ema")  # off unless --ema.decay is set
        parser.add_lightning_class_args(LikelihoodWriter, "prediction_writer")  # glow predict -> CSV
        for data_attr, model_arg in LINKED_FROM_DATA.items():
            parser.link_arguments(f"data.{data_attr}", f"model.{model_arg}", apply_on="instantiate")

    @override
    def _parse_ckpt_path(self) -> None:
        """Take the model's hyperparameters from ``--ckpt_path``; refuse explicit values that contradict it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path and subcommand in EVALUATING:  # Lightning would evaluate the untrained weights, rc 0
            self._parser(subcommand).error(
                f"glow {subcommand} needs --ckpt_path (a checkpoint file, or last / best of "
                f"{self.config[subcommand].checkpoint.dirpath or 'the run'}): without one it would "
                f"{'write' if subcommand == 'predict' else 'report'} the figures of an untrained model"
            )
        if ckpt_path == "last":
            dirpath = self.config[subcommand].checkpoint.dirpath
            ckpt_path = self.config[subcommand]["ckpt_path"] = find_last(dirpath)
            if ckpt_path is None and subcommand != "fit":
                self._parser(subcommand).error(
                    f"--ckpt_path last: there is no {join(dirpath, 'last.ckpt')}{runs_here_hint()}"
                )
            # fit: nothing to resume yet, start from scratch (set-and-forget for preemptible jobs)
        elif ckpt_path == "best":
            dirpath = self.config[subcommand].checkpoint.dirpath
            ckpt_path = self.config[subcommand]["ckpt_path"] = find_best(dirpath)
            if ckpt_path is None:
                monitor = self.config[subcommand].checkpoint.get("monitor") or "val/bpd"
                fs, target = url_to_fs(dirpath)
                what = (
                    f"{dirpath} holds no best checkpoint (one is written at each validation that improves {monitor})"
                    if fs.isdir(target)
                    else f"there is no {dirpath}"
                )
                self._parser(subcommand).error(
                    f"--ckpt_path best: {what}"
                    + ("; --ckpt_path last takes its newest state" if find_last(dirpath) else runs_here_hint())
                )
        init_weights = self.config[subcommand].model.get("init_weights") if subcommand == "fit" else None
        if init_weights and ckpt_path in SPECIAL_CKPT_PATHS:
            self._refuse_warm_start_and_resume(init_weights, ckpt_path)
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
            return
        try:
            hparams = load_checkpoint_hparams(ckpt_path)
        except FileNotFoundError:
            self._parser(subcommand).error(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        except UnreadableCheckpointError as err:  # truncated, corrupt, or holding code to run
            self._parser(subcommand).error(f"--ckpt_path {err}")
        if init_weights and init_weights != hparams.get("init_weights"):  # the same value: the same run resuming
            self._refuse_warm_start_and_resume(init_weights, ckpt_path)
        defaults = {k: p.default for k, p in inspect.signature(GlowModule.__init__).parameters.items()}
        model_config = self.config[subcommand].model
        explicit = self._explicit_model_keys(subcommand)
        evaluating = subcommand != "fit"  # the architecture comes from the checkpoint; configs yield to it
        on_command_line = self._explicit_model_keys(subcommand, command_line_only=True) if evaluating else explicit
        conflicts, yielded, changed, updates = [], [], [], {}
        for key, saved in hparams.items():
            if key not in defaults or key in LINKED_FROM_DATA.values() or key in EVALUATION_ONLY:
                continue  # linked values are checked against the checkpoint when it is loaded
            given = model_config.get(key, defaults[key])
            if key == "init_weights" and not evaluating:  # checked above: resuming never loads it
                updates[key] = saved
                continue
            if evaluating and key in TRAINING_KEYS:
                if key not in on_command_line:
                    updates[key] = saved
                continue
            if given != saved and (key in on_command_line or (not evaluating and given != defaults[key])):
                if not evaluating and key in RESUME_CHANGEABLE:  # applies from the resumed step on
                    changed.append(f"{key} {shown(given)} (checkpoint: {shown(saved)})")
                    continue
                conflicts.append(f"--model.{key}={given!r} (checkpoint: {saved!r})")
            elif given != saved and key in explicit:
                yielded.append(f"{key}={saved!r} (config: {given!r})")
            updates[key] = saved
        if changed and subcommand == "fit" and rank_zero_only.rank == 0:
            changed.sort(key=lambda change: change.startswith("optimizer "))  # last, with what it means
            fresh = ": the optimizer state starts fresh" if changed[-1].startswith("optimizer ") else ""
            print(f"glow: resuming with {', '.join(changed)}{fresh}", flush=True)
        if conflicts:
            run_config = run_config_of(ckpt_path)
            self._parser(subcommand).error(
                f"values given for {ckpt_path} contradict the checkpoint: {', '.join(conflicts)}. "
                "Drop them, or pass the config the checkpoint was trained with"
                + (f" ({run_config})." if run_config else ".")
            )
        if yielded:
            print(f"glow {subcommand}: taken from the checkpoint: {', '.join(yielded)}", file=sys.stderr)
        if self.config[subcommand].get("data") is None:  # `glow sample` alone: nothing to link from
            updates.update({key: hparams[key] for key in LINKED_FROM_DATA.values() if key in hparams})
        for key, value in updates.items():
            model_config[key] = value

    def _refuse_warm_start_and_resume(self, init_weights: str, ckpt_path: str) -> None:
        self._parser("fit").error(
            f"--model.init_weights {init_weights} and --ckpt_path {ckpt_path}: a warm start begins a new run at "
            f"global step 0 from the weights of {init_weights}, --ckpt_path resumes the run of {ckpt_path}; "
            "give only one of them"
        )

    def _explicit_model_keys(self, subcommand: str, command_line_only: bool = False) -> set[str]:
        """The ``--model.*`` keys set on the command line or in a config (only on the command line, with
        ``command_line_only``), also those equal to their default.

        Re-parses the arguments without defaults; the resolved ``default_root_dir`` is passed along, since the
        checkpoint directory is linked from it. Should that parse fail, only non-default values count as given.
        """
        args = getattr(self.parser, "args", None)  # what parse_args parsed (None for a dict / Namespace config)
        if args is None:
            return set()
        if command_line_only:
            args = without_configs(args)
        root = self.config[subcommand].trainer.get("default_root_dir")
        args = [*args, f"--trainer.default_root_dir={'null' if root is None else root}"]
        parsers = (self.parser, self._parser(subcommand))
        exit_on_error = [p.exit_on_error for p in parsers]
        try:
            for p in parsers:
                p.exit_on_error = False  # raise instead of printing an error and exiting
            given = self.parser.parse_args(args, defaults=False, _skip_validation=True)[subcommand].get("model")
        except Exception:
            return set()
        finally:
            for p, value in zip(parsers, exit_on_error):
                p.exit_on_error = value
        return set(given.keys()) if given is not None else set()

    def _check_output_dirs(self) -> None:
        """Fail early, naming the directory, when the run or checkpoint directory is not writable."""
        check_writable(self.trainer.default_root_dir, "--trainer.default_root_dir")
        if self.subcommand == "fit" and self.trainer.checkpoint_callback is not None:
            check_writable(self.trainer.checkpoint_callback.dirpath, "--checkpoint.dirpath")

    before_validate = before_test = before_predict = _check_output_dirs

    def before_fit(self) -> None:
        """Check the output directories; load the warm start's weights (``--model.init_weights``) now, so that a
        missing or unfitting file is a one-line argument error before training starts."""
        self._check_output_dirs()
        checkpoint = self.trainer.checkpoint_callback
        if isinstance(checkpoint, GlowCheckpoint) and not self.config_init["fit"].get("ckpt_path"):
            checkpoint.refuse_an_earlier_run()  # before Lightning makes lightning_logs/version_N for this run
        path = self.model.hparams.get("init_weights")
        if not path or self.config_init["fit"].get("ckpt_path"):
            return
        try:
            self.model.load_initial_weights(path)
        except FileNotFoundError:
            self._parser("fit").error(f"--model.init_weights {path}: no such checkpoint file")
        except (UnreadableCheckpointError, CheckpointMismatchError) as err:
            self._parser("fit").error(f"--model.init_weights {err}")

    @override
    def before_instantiate_classes(self) -> None:
        data = self.config[self.subcommand].get("data") if self.subcommand else None
        bare = data is not None and str(data.get("class_path", "")).rsplit(".", 1)[-1] == "GlowDataModule"
        if bare:  # only --data.X options (--data.batch_size 8): the base class has no dataset (NotImplementedError)
            message = f"{reads_images(self.subcommand)}: --data.X options alone do not name a dataset"
            if self.subcommand in NEEDS_NO_DATA:
                message = f"glow {self.subcommand} reads no images: leave out the --data.X options, or pass --data"
            self._parser(self.subcommand).error(message)
        if self.subcommand:
            wandb_save_dir_in_run(self.config[self.subcommand].trainer)
        if self.subcommand in EVALUATION_LOGS:
            evaluation_logs_in_run(self.config[self.subcommand].trainer, self.subcommand)

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ValueError as err:
            if subcommand not in IMAGE_SUBCOMMANDS or isinstance(err, CheckpointMismatchError):
                raise
            self._parser(subcommand).error(str(err))  # a bad argument of ours: exit code 2

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:  # our constructors (and Lightning's) name the value
            self._parser(self.subcommand).error(str(err))
        except TypeError as err:  # Lightning's checks of a value's type: `--trainer.devices two`
            if "lightning" not in traceback.extract_tb(err.__traceback__)[-1].filename:
                raise  # a TypeError of ours is a bug: its traceback
            self._parser(self.subcommand).error(str(err))


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs(width: int = 100) -> dict[str, str]:
    """The configs shipped inside the package: ``{"cifar.yaml": "<the first sentence of its comment>", ...}``, at most
    ``width`` characters (cut at a word, with "...")."""
    out = {}
    for name in sorted(os.listdir(CONFIGS_DIR)):
        if not name.endswith(".yaml"):
            continue
        words = []
        with open(os.path.join(CONFIGS_DIR, name)) as f:
            for line in f:
                if not line.startswith("#") or line.startswith("#  "):  # the settings, or an example command
                    break
                words += line[1:].split()
        text = " ".join(words)
        end = re.search(r"(?<!\.)\.(\s|$)", text)  # the first sentence ("PNG / JPEG / ... files" goes on)
        text = text[: end.start() + 1] if end else text
        text = text.rstrip(":")
        if len(text) > width:
            text = text[: text.rfind(" ", 0, width - 3)].rstrip(",;:(") + "..."
        out[name] = text
    return out


def resolve_configs(args: list[str]) -> list[str]:
    """``--config NAME`` that is not a file resolves to the packaged config of that name (``cifar.yaml``, or
    ``configs/cifar.yaml`` outside a clone); a path to an existing file always wins."""

    def resolve(value: str) -> str:
        if os.path.exists(value) or value.lstrip().startswith(("{", "[")) or ":" in value.split("/")[0]:
            return value  # a file, inline YAML, or a URL
        packaged = os.path.join(CONFIGS_DIR, os.path.basename(value))
        if os.path.dirname(value) in ("", "configs") and os.path.isfile(packaged):
            return packaged
        return value

    out, after_flag = [], False
    for arg in args:
        if after_flag:
            out.append(resolve(arg))
            after_flag = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            after_flag = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve(arg[len("--config=") :]))
        else:
            out.append(arg)
    return out


def config_of_checkpoint(args: list[str]) -> list[str]:
    """``glow reconstruct --ckpt_path runs/x/checkpoints/last.ckpt`` with neither ``--config`` nor ``--data``: the
    subcommands that read images take the data (and the rest) from the run's own ``config.yaml``, as ``glow sample``
    takes the architecture from the checkpoint; one line says so. Options such as ``--data.download false`` amend
    it (given after it). Unchanged when the run has no saved config."""
    subcommand = args[0] if args else ""
    if subcommand not in (*EVALUATING, *IMAGE_SUBCOMMANDS) or subcommand in NEEDS_NO_DATA:
        return args
    # a whole data spec (--data CLASS, --data.class_path) replaces the run's; --data.X options only amend it
    whole_data = ("--data", "--data.class_path", "--data.help")
    if any(a in ("--config", "-c", "-h", "--help", *whole_data) or a.startswith(("--config=", "--data=",
                                                                                  "--data.class_path="))
           for a in args):  # fmt: skip
        return args
    ckpt = next((b for a, b in zip(args, args[1:]) if a == "--ckpt_path"), None)
    ckpt = ckpt or next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
    if not ckpt or ckpt in ("last", "best") or not os.path.isfile(ckpt):
        return args
    try:
        config = run_config_of(ckpt)
    except (OSError, UnreadableCheckpointError):
        return args  # the checkpoint's own error comes later, from the parser
    if config is None:
        return args
    print(f"glow {subcommand}: data and settings from the run's config {config}", file=sys.stderr)
    return [subcommand, "--config", config, *args[1:]]


def list_configs() -> None:
    """``glow configs``: the packaged configs, one line each."""
    print(f"packaged configs (glow fit --config NAME.yaml; files in {CONFIGS_DIR}):")
    for name, summary in packaged_configs().items():
        print(f"  {name:22s} {summary}")


class _NoAdverts(logging.Filter):
    """Drop Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines (one per Trainer: on every glow
    command); its warnings and other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


# Lightning's own use of a torch API that newer torch deprecates (2.14 here) (``LeafSpec()`` in
# lightning/pytorch/utilities/_pytree.py): printed once per glow command, nothing a user can act on.
_LIBRARY_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def _quiet_adverts() -> None:
    """Lightning's adverts and the library-internal deprecation warnings above; everything else passes."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in logger.filters):
        logger.addFilter(_NoAdverts())
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def main(args: list[str] | None = None) -> GlowCLI | None:
    """Entry point of the ``glow`` console script; ``args`` replaces ``sys.argv[1:]`` (tests)."""
    if args is None:  # the console script: resolve in sys.argv (LightningCLI warns when given both)
        sys.argv[1:] = config_of_checkpoint(resolve_configs(sys.argv[1:]))
        command = sys.argv[1:2]
    else:
        args = config_of_checkpoint(resolve_configs(list(args)))
        command = args[:1]
    if command == ["configs"]:
        list_configs()
        return None
    _quiet_adverts()
    try:
        return GlowCLI(args=args)
    except (
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        NotWritableError,
        CheckpointMismatchError,
        DatasetError,
        UnreadableCheckpointError,
        NonFiniteTrainingError,
        FeatureExtractorError,
        UnknownMonitorError,
        MisconfigurationException,  # raised by Lightning during a run (e.g. a training metric it cannot find)
    ) as err:
        print(f"glow: error: {err}{data_hint(err)}", file=sys.stderr)
        raise SystemExit(1) from err
    except SIGTERMException as stop:  # SIGTERM / SIGINT (GlowCheckpoint wrote last.ckpt): exit as the shell would
        raise SystemExit(exit_code(stopped(stop))) from stop


def data_hint(err: Exception) -> str:
    """A checkpoint of another architecture in a value the datamodule sets (num_classes, n_bits, image size,
    channels): say so, and name the option where every datamodule has one."""
    found = getattr(err, "differ", {}).keys() & set(LINKED_FROM_DATA.values())  # CheckpointMismatchError's
    if not found:
        return ""
    options = [f"--data.n_bits {err.differ['n_bits']}"] if "n_bits" in found else []
    if "num_classes" in found:
        options.append(f"--data.class_conditional {'true' if err.differ['num_classes'] else 'false'}")
    return "; the data sets these: pass the config the run was trained with" + (
        f", or {' '.join(options)}" if options else ""
    )


def stopped(stop: SIGTERMException) -> int:
    """Print the one line about a fit stopped by a signal; return the signal number."""
    signum = getattr(stop, "glow_signal", None) or signal.SIGTERM
    name = signal.Signals(signum).name
    path = getattr(stop, "glow_checkpoint", None)
    step = getattr(stop, "glow_step", None)
    if path:
        where = (
            f"the newest checkpoint is {path} (global step {step}); resume with the same command plus --ckpt_path last"
        )
    else:
        where = "no checkpoint was written (no training step had finished)"
    if getattr(stop, "glow_report", True):
        print(f"glow: stopped by {name}: {where}", file=sys.stderr, flush=True)
    return int(signum)


def entry() -> None:
    """The ``glow`` console script (``main`` without a return value, which sys.exit would print).

    The process group of a DDP run ends here: Lightning destroys NCCL groups only, and a CPU rank that exits
    with its gloo group alive can abort (SIGABRT, "terminate called without an active exception") after a
    finished run (seen with ddp_spawn ranks, torch 2.14)."""
    try:
        main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
