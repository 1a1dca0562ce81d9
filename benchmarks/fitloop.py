"""The fit loop against the raw step (issue 17 item 4), in one process.

``--part ratio``: images/s of ``glow fit``'s training batches (``configs/cifar.yaml`` with its callbacks: clipping,
the non-finite guard, the image grids, the invertibility check, the checkpoint, the TensorBoard logger, the
progress bar; random CIFAR-format images on disk) against the raw training step of ``benchmarks/benchmark.py``
(forward to bits/dim, backward, GlowModule's optimizer) of another model of the same configuration and batch
size, on a fixed batch. The two alternate inside the fit (after each fit batch, one raw step) so load from other
processes hits both alike. A fit batch is the time from one ``on_train_batch_start`` to the next, the raw step
taken out: data loading, the step, every hook and the logging; the epoch's last batch (validation and the
end-of-epoch callbacks start there) and the first ``--warmup`` batches are not counted.

``--part hooks``: where a fit batch's time goes, from Lightning's SimpleProfiler: the mean time per training batch
of every hook and loop section that runs on (nearly) every batch (the step itself: ``training_step``,
``backward``, ``optimizer_step``; the rest is the per-batch work the raw step does not have).

``--part epoch-end``: the end-of-epoch work (the three sample grids, reconstructions, interpolations, the
invertibility check; validation itself not counted) of one short ``glow fit`` at the paper config, from
Lightning's SimpleProfiler, against a CIFAR-10 epoch extrapolated from the measured training step:
703 steps (45,000 training images, batch 64) x the median ``run_training_batch`` time.

    python benchmarks/fitloop.py --part ratio --levels 2 --steps-per-level 4 --hidden-channels 64 --batch-size 16
    python benchmarks/fitloop.py --part hooks                # the same small model, one fit, per-hook times
    python benchmarks/fitloop.py --part epoch-end            # the paper config, L=3 K=32 width 512, batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmark import Ours, make_step, sync  # noqa: E402

from glow_lightning.cli import main as glow  # noqa: E402
from glow_lightning.module import make_optimizer  # noqa: E402
from tests.fixtures import write_cifar10  # noqa: E402

LR = 1e-5  # the raw step's and the fit's: the paper config diverges on random images at the config's 1e-3 after
# the 1-step warmup of a ~20-step plan (every step then skipped by the non-finite guard)
EPOCH_STEPS = 703  # CIFAR-10: 45,000 training images (5,000 held out for validation), batch 64
END_OF_EPOCH = {  # profiler key -> what it is
    "[Callback]SampleImages.on_train_epoch_end": "sample grids",
    "[Callback]ReconstructionImages.on_train_epoch_end": "reconstructions",
    "[Callback]InterpolationImages.on_train_epoch_end": "interpolations",
    "[Callback]InvertibilityMonitor.on_validation_epoch_end": "invertibility check",
}


class BatchTimer(L.Callback):
    """perf_counter at every training batch start (synchronised on CUDA); after each batch from ``warmup`` on,
    one raw step (``RAW_STEP``) is timed too, and its time is taken out of that batch's interval."""

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.starts: list[float] = []
        self.raw: list[float] = []  # raw step times, one per batch from warmup on
        self.inserted: list[float] = []  # time spent in the raw step after batch i (0 before warmup)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if RAW_STEP is None or batch_idx < self.warmup:
            self.inserted.append(0.0)
            return
        sync(pl_module.device)
        t0 = time.perf_counter()
        RAW_STEP()
        sync(pl_module.device)
        self.raw.append(time.perf_counter() - t0)
        self.inserted.append(time.perf_counter() - t0)

    def batches(self) -> list[float]:
        """Fit batch times from ``warmup`` on, the raw steps taken out; the last batch has no next start."""
        n = len(self.starts) - 1
        return [self.starts[i + 1] - self.starts[i] - self.inserted[i] for i in range(self.warmup, n)]


RAW_STEP = None  # set by ratio(): the raw step timed between fit batches


def fit_args(args, data: str, root: str, batches: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "cifar.yaml"),
        "--data.data_dir", data, "--data.download", "false", "--data.val_size", str(args.batch_size),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
        "--model.levels", str(args.levels), "--model.steps_per_level", str(args.steps_per_level),
        "--model.hidden_channels", str(args.hidden_channels), "--model.init_batch_size", str(args.batch_size),
        "--model.lr", str(LR),
        "--trainer.accelerator", args.accelerator, "--trainer.devices", "1", "--trainer.precision", args.precision,
        "--trainer.default_root_dir", root, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "1",
        *extra,
    ]  # fmt: skip


def raw_block(step, device, n: int) -> list[float]:
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def ratio(args, data: str, device: torch.device) -> None:
    model = Ours(args).to(device).train()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    model.init(x)
    if args.precision == "bf16-mixed":

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        from contextlib import nullcontext as autocast
    step = make_step(model, make_optimizer("adam", model.parameters(), lr=LR), x, x[0].numel(), autocast)
    raw_block(step, device, args.warmup)
    global RAW_STEP
    RAW_STEP = step
    raw, fit = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as root:
            cli = glow(fit_args(args, data, root, args.warmup + args.steps + 1,
                                "--trainer.callbacks+", f"{__name__}.BatchTimer",
                                "--trainer.callbacks.warmup", str(args.warmup)))  # fmt: skip
            assert torch.get_num_threads() == args.threads  # the fit ran with the raw step's threads
            timer = next(c for c in cli.trainer.callbacks if isinstance(c, BatchTimer))
        raw += timer.raw
        fit += timer.batches()
        if os.environ.get("FITLOOP_DEBUG"):
            print("# fit batches ms:", [round(t * 1e3) for t in timer.batches()])
            print("# raw steps ms:  ", [round(t * 1e3) for t in timer.raw])
    r, f = statistics.median(raw), statistics.mean(fit)
    print(f"# {len(fit)} fit batches in {args.rounds} fit(s), each followed by one raw step (interleaved)")
    print(f"{'':<28}{'ms/batch':>10}{'img/s':>10}")
    print(f"{'raw step (median)':<28}{r * 1e3:>10.2f}{args.batch_size / r:>10.1f}")
    print(f"{'glow fit batches (mean)':<28}{f * 1e3:>10.2f}{args.batch_size / f:>10.1f}")
    print(f"{'glow fit batches (median)':<28}{statistics.median(fit) * 1e3:>10.2f}")
    print(f"# fit / raw throughput: {r / f:.3f} (mean fit batch); overhead {(f - r) * 1e3:.2f} ms per batch")


def hooks(args, data: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        cli = glow(fit_args(args, data, root, args.warmup + args.steps + 1, "--trainer.profiler", "simple"))
        durations = cli.trainer.profiler.recorded_durations
    batches = len(durations["run_training_batch"])
    print(f"# {batches} training batches; mean ms per batch of each section that ran on (nearly) every batch")
    print(f"{'section (SimpleProfiler key)':<72}{'calls':>7}{'ms/batch':>10}")
    for key, times in sorted(durations.items(), key=lambda kv: -sum(kv[1])):
        per_batch = sum(times) / batches * 1e3
        if len(times) >= batches - 1 and per_batch >= 0.005 and not key.startswith("[_EvaluationLoop]"):
            name = key if len(key) <= 70 else key[:67] + "..."
            print(f"{name:<72}{len(times):>7}{per_batch:>10.3f}")


def epoch_end(args, data: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        cli = glow(fit_args(args, data, root, args.steps, "--trainer.profiler", "simple"))
        durations = cli.trainer.profiler.recorded_durations
    steps = durations["run_training_batch"][1:] or durations["run_training_batch"]  # the first one warms up
    step = statistics.median(steps)
    epoch = EPOCH_STEPS * step
    print(
        f"# training step (median of {len(steps)}): {step:.3f} s; CIFAR-10 epoch = {EPOCH_STEPS} x step = {epoch:.0f} s"
    )
    total = 0.0
    for key, what in END_OF_EPOCH.items():
        t = sum(durations.get(key, [0.0]))
        total += t
        print(f"{what:<22}{t:>9.2f} s{100 * t / epoch:>9.3f} % of the epoch")
    print(f"{'end-of-epoch work':<22}{total:>9.2f} s{100 * total / epoch:>9.3f} % of the epoch")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["ratio", "hooks", "epoch-end"], default="ratio")
    p.add_argument("--levels", type=int, default=None)
    p.add_argument("--steps-per-level", type=int, default=None)
    p.add_argument("--hidden-channels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the fit (cifar.yaml: 4)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=None, help="ratio: timed fit batches (and raw steps); epoch-end: fit steps"
    )
    p.add_argument("--rounds", type=int, default=1, help="ratio: fits")
    args = p.parse_args(argv)
    paper = args.part == "epoch-end"
    for name, small, big in [("levels", 2, 3), ("steps_per_level", 4, 32), ("hidden_channels", 64, 512),
                             ("batch_size", 16, 64), ("steps", 100, 3)]:  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, big if paper else small)
    device = torch.device(args.device)
    args.accelerator = "gpu" if device.type == "cuda" else "cpu"
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # else Lightning sets torch's threads to the CPU count in fit
    torch.manual_seed(0)
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(f"# {args.part}: device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"precision {args.precision}, L={args.levels} K={args.steps_per_level} width={args.hidden_channels} "
          f"batch={args.batch_size}, DataLoader workers {args.num_workers}")  # fmt: skip
    with tempfile.TemporaryDirectory() as data:
        per_batch = -(-args.batch_size * (args.warmup + args.steps + 2) // 5) + args.batch_size
        write_cifar10(data, per_batch=per_batch, test_size=args.batch_size)
        if args.part == "ratio":
            ratio(args, data, device)
        elif args.part == "hooks":
            hooks(args, data)
        else:
            epoch_end(args, data)


if __name__ == "__main__":
    main()
