"""Model quality per compute: train for a fixed wall-clock budget, report steps and test bits/dim.

Three trainers at the same architecture and batch, on the same images and the same test split (issue 18):

- ``fit``: the product path, ``glow fit`` with a shipped config plus only the architecture / batch flags (and any
  ``--fit-args`` under test), validation and callbacks as shipped, stopped by ``--trainer.max_time``; then
  ``glow test`` on its ``last.ckpt``.
- ``bare``: a bare training loop over our own :class:`~glow_lightning.flow.Glow` (no Lightning): Adam, 200-step
  linear warmup, constant lr, gradient clipping at 50, no validation. It reads batches through the same
  datamodule (same pixels, dequantization noise and test noise), so it separates the recipe and the loop from
  the architecture.
- ``normflows``: normflows' Glow (``pip install normflows``) at the same architecture in the same bare loop.

Each trainer runs in its own process with ``--threads`` threads. ``--parallel`` starts them all at once, so
they share the machine alike (the fair choice on a busy or small machine); otherwise one after another.
The time budget covers the training loop only (imports, data loading and the final test are not counted;
``fit``'s budget includes its validation and callbacks, as a user's run does).

    python benchmarks/quality.py --data-dir ../shared/data/mnist --minutes 10 --seeds 0 1 --parallel --threads 1
    python benchmarks/quality.py ... --impl fit --fit-args "--model.warmup_steps 200"   # an A/B candidate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ------------------------------------------------------------------ workers
def datamodule(args, seed: int):
    from glow_lightning.data import MNISTDataModule

    dm = MNISTDataModule(
        data_dir=args.data_dir, download=False, image_size=args.image_size, batch_size=args.batch_size,
        num_workers=0, seed=seed,
    )  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    return dm


def build(args, impl: str):
    import torch

    if impl == "bare":
        from glow_lightning.flow import Glow

        flow = Glow(
            in_channels=1, image_size=args.image_size, levels=args.levels, steps_per_level=args.steps_per_level,
            hidden_channels=args.hidden_channels, coupling_norm=args.coupling_norm,
        )  # fmt: skip
        return flow, flow.initialize, lambda x: -flow.log_prob(x)
    from benchmark import normflows_glow  # benchmarks/ is sys.path[0] when this file runs as a script

    model = normflows_glow(1, args.levels, args.steps_per_level, args.hidden_channels, args.image_size)

    def init(x):
        with torch.no_grad():
            model.log_prob(x - 0.5, None)  # normflows initialises ActNorm lazily on its first batch

    return model, init, lambda x: -model.log_prob(x - 0.5, None)


def bare_worker(args, impl: str, seed: int) -> dict:
    """A bare loop: Adam, 200-step warmup, constant lr, clipping at 50, no validation; then the test split."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    dm = datamodule(args, seed)
    model, init, nll = build(args, impl)
    dims = args.image_size**2
    init(dm.init_batch(256)["x"])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    loader = dm.train_dataloader()
    steps, epoch, start = 0, 0, time.perf_counter()
    budget = args.minutes * 60

    def done() -> bool:
        return steps >= args.steps if args.steps else time.perf_counter() - start >= budget

    while not done():
        loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
        for raw in loader:
            x = dm.prepare_batch(raw, train=True, epoch=epoch)["x"]
            loss = nll(x).mean() / (dims * math.log(2)) + 8
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            sched.step()
            steps += 1
            if done():
                break
        epoch += 1
    train_s = time.perf_counter() - start
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for raw in dm.test_dataloader():
            x = dm.prepare_batch(raw, train=False)["x"]
            bpd = nll(x) / (dims * math.log(2)) + 8
            total, count = total + bpd.double().sum().item(), count + len(bpd)
    return {"impl": impl, "seed": seed, "steps": steps, "train_s": round(train_s, 1), "test_bpd": total / count}


def fit_worker(args, seed: int) -> dict:
    """``glow fit`` for the budget (max_time), then ``glow test`` on its last.ckpt."""
    import torch

    root = os.path.join(args.out, f"fit_{args.tag}_seed{seed}")
    minutes = args.minutes
    common = [
        "--config", args.config, "--data.data_dir", args.data_dir, "--data.download", "false",
        "--data.image_size", str(args.image_size), "--data.batch_size", str(args.batch_size),
        "--trainer.default_root_dir", root,
    ]  # fmt: skip
    arch = [
        "--model.levels", str(args.levels), "--model.steps_per_level", str(args.steps_per_level),
        "--model.hidden_channels", str(args.hidden_channels),
    ]  # fmt: skip
    seconds = int(round(minutes * 60))
    duration = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"  # DD:HH:MM:SS
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    fit = [
        sys.executable, "-m", "glow_lightning.cli", "fit", *common, *arch, "--seed_everything", str(seed),
        *(["--trainer.max_steps", str(args.steps)] if args.steps else ["--trainer.max_time", duration]),
        "--trainer.enable_progress_bar", "false", *shlex.split(args.fit_args),
    ]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(fit, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "fit.log"), "w") as log:
        log.write(out.stdout + out.stderr)
    if out.returncode:
        raise SystemExit(f"glow fit failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    plan = [line for line in (out.stdout + out.stderr).splitlines() if "lr schedule" in line]
    ckpt = os.path.join(root, "checkpoints", "last.ckpt")
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    test = [sys.executable, "-m", "glow_lightning.cli", "test", *common, "--ckpt_path", ckpt,
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    out = subprocess.run(test, env=env, capture_output=True, text=True)
    match = re.search(r"test/bpd\s+([0-9.]+)", out.stdout)
    if out.returncode or not match:
        raise SystemExit(f"glow test failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return {"impl": f"fit {args.tag}".strip(), "seed": seed, "steps": steps, "fit_wall_s": round(wall, 1),
            "test_bpd": float(match.group(1)), "plan": plan[-1] if plan else ""}  # fmt: skip


# ------------------------------------------------------------------ driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with MNIST's idx files (e.g. ../shared/data/mnist)")
    p.add_argument("--config", default="mnist.yaml", help="the shipped config that `fit` starts from")
    p.add_argument("--impl", nargs="+", default=["fit", "bare", "normflows"], choices=["fit", "bare", "normflows"])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per run")
    p.add_argument("--steps", type=int, default=0, help="a fixed number of steps instead of --minutes (A/B per step)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", action="store_true", help="run every (impl, seed) at once")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps-per-level", type=int, default=8)
    p.add_argument("--hidden-channels", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="bare loops' peak lr")
    p.add_argument("--coupling-norm", default="actnorm", choices=["none", "actnorm"], help="the bare loop's Glow")
    p.add_argument("--fit-args", default="", help="extra `glow fit` flags (an A/B candidate)")
    p.add_argument("--tag", default="", help="a name for this fit variant in the table")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="append the rows as JSON lines to this file")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="glow_quality_")

    if args.worker:
        impl, seed = args.worker[0], int(args.worker[1])
        row = fit_worker(args, seed) if impl == "fit" else bare_worker(args, impl, seed)
        print("ROW " + json.dumps(row), flush=True)
        return

    own = [a for a in sys.argv[1:]]
    jobs = [(impl, seed) for seed in args.seeds for impl in args.impl]
    cmds = [[sys.executable, __file__, *own, "--out", args.out, "--worker", impl, str(seed)] for impl, seed in jobs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "PYTHONPATH": REPO}
    rows = []
    if args.parallel:
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, text=True) for c in cmds]
        outputs = [proc.communicate()[0] for proc in procs]
    else:
        outputs = [subprocess.run(c, env=env, stdout=subprocess.PIPE, text=True).stdout for c in cmds]
    for (impl, seed), text in zip(jobs, outputs):
        found = [line[4:] for line in text.splitlines() if line.startswith("ROW ")]
        rows.append(json.loads(found[-1]) if found else {"impl": impl, "seed": seed, "error": "no result"})
    load = os.getloadavg()[0]
    budget = f"{args.steps} steps: s" if args.steps else f"steps in {args.minutes:g} min"
    print(f"| impl | seed | {budget} | test bits/dim |   (load at end {load:.1f})")
    print("|---|---|---|---|")
    for row in rows:
        bpd = f"{row['test_bpd']:.3f}" if "test_bpd" in row else row.get("error")
        print(f"| {row['impl']} | {row['seed']} | {row.get('steps', '-')} | {bpd} |")
    for row in rows:
        if row.get("plan"):
            print(f"  {row['impl']} seed {row['seed']}: {row['plan']}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "minutes": args.minutes, "fixed_steps": args.steps, "threads": args.threads,
                                    "fit_args": args.fit_args, "parallel": args.parallel}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
