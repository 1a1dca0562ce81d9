"""Training-step benchmark: glow-lightning's Glow vs a public Glow (normflows), interleaved in one run.

Times complete training steps (forward to bits/dim, backward, Adam step: GlowModule's optimizer
(fused Adam) for ours unless ``--plain-adam``, torch's default Adam for normflows) and prints a table with the
median step time after warmup, images/s, peak memory, achieved TFLOP/s, activation bytes per image
(saved-tensors hook: the exact bytes autograd keeps for backward, device independent) and the ratio.
The two implementations are timed in alternating blocks in the same process, so a shared or noisy
machine affects both alike. normflows is a benchmark-only dependency (``pip install normflows``).

    python benchmarks/benchmark.py --levels 3 --steps-per-level 8 --hidden-channels 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glow_lightning.flow import Glow  # noqa: E402
from glow_lightning.module import make_optimizer  # noqa: E402


# ------------------------------------------------------------------ models
class Ours(torch.nn.Module):
    def __init__(self, args, **options):
        super().__init__()
        self.flow = Glow(
            in_channels=3, image_size=args.image_size, levels=args.levels, steps_per_level=args.steps_per_level,
            hidden_channels=args.hidden_channels, **options,
        )  # fmt: skip

    def init(self, x):
        self.flow.initialize(x)

    def forward(self, x):
        return -self.flow.log_prob(x)  # (B,) nats


def normflows_glow(c: int, L: int, K: int, hidden: int, s: int):
    """normflows' MultiscaleFlow for ``c`` x ``s`` x ``s`` images: L levels of K GlowBlocks, as our Glow."""
    import normflows as nf

    q0, merges, flows = [], [], []
    for i in range(L):  # i = 0 is the coarsest level in normflows' ordering
        flows.append(
            [nf.flows.GlowBlock(c * 2 ** (L + 1 - i), hidden, split_mode="channel", scale=True)
             for _ in range(K)] + [nf.flows.Squeeze()]
        )  # fmt: skip
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (L - i), s // 2 ** (L - i), s // 2 ** (L - i))
        else:
            shape = (c * 2 ** (L + 1), s // 2**L, s // 2**L)
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


class NormflowsGlow(torch.nn.Module):
    """normflows' Glow at the same architecture: L levels x K GlowBlocks (affine coupling with sigmoid
    scale, LU 1x1 conv, actnorm), squeeze, split with a learned diagonal Gaussian per level."""

    def __init__(self, args):
        super().__init__()
        self.model = normflows_glow(3, args.levels, args.steps_per_level, args.hidden_channels, args.image_size)

    def init(self, x):
        with torch.no_grad():
            self.model.log_prob(x - 0.5, None)  # normflows initialises ActNorm lazily on its first batch

    def forward(self, x):
        return -self.model.log_prob(x - 0.5, None)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------- measures
def bits_per_dim(nll: torch.Tensor, dims: int) -> torch.Tensor:
    return nll.mean() / (dims * math.log(2)) + 8


def make_step(model, optimizer, x, dims, autocast):
    def step():
        with autocast():
            loss = bits_per_dim(model(x), dims)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def saved_bytes(model, x, dims, autocast, loss_fn=None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (storage-deduplicated)."""
    storages = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = loss_fn(model(x)) if loss_fn else bits_per_dim(model(x), dims)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(n for ptr, n in storages.items() if ptr not in param_ptrs)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def rebuilt_step_bytes(flow, batch_size, image_size, device, autocast) -> int:
    """Bytes autograd saves while the invert backward rebuilds and backprops one level-1 step (the largest):
    its coupling NN and its ActNorm + 1x1 conv, recomputed from the step's output (the backward's own code)."""
    from glow_lightning.flow.reversible import step_backward

    step = flow.steps[0][0]
    y = torch.rand(batch_size, 4 * flow.in_channels, image_size // 2, image_size // 2, device=device)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(), torch.enable_grad():
        step_backward(step, y, torch.ones_like(y), y.new_ones(batch_size))
    param_ptrs = {p.untyped_storage().data_ptr() for p in flow.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in param_ptrs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps-per-level", type=int, default=8)
    p.add_argument("--hidden-channels", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--coupling", choices=["affine", "additive"], default="affine")
    p.add_argument("--coupling-norm", choices=["actnorm", "none"], default="actnorm",
                   help="our coupling network: openai/glow's (actnorm, the default) or a plain biased one")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--block", type=int, default=1, help="consecutive steps per implementation per round")
    p.add_argument("--impl", nargs="+", default=["ours", "normflows"],
                   help="ours, ours-compile, ours-memory, ours-compile-memory, ours-invert, ours-compile-invert, "
                        "normflows (memory: memory_saving='recompute', invert: memory_saving='invert')")  # fmt: skip
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for the ours-compile* variants")
    p.add_argument("--plain-adam", action="store_true",
                   help="ours with torch's default Adam too, instead of GlowModule's optimizer (fused Adam)")  # fmt: skip
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--no-activation-bytes", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.precision == "bf16-mixed":

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    dims = x[0].numel()
    models, steps = {}, {}
    for name in args.impl:
        if name == "normflows":
            model = NormflowsGlow(args)
        else:
            options = {"coupling_norm": args.coupling_norm, "coupling": args.coupling}
            if "compile" in name:
                options["compile"] = True if args.compile_mode == "default" else args.compile_mode
            if "memory" in name:
                options["memory_saving"] = "recompute"
            if "invert" in name:
                options["memory_saving"] = "invert"
            model = Ours(args, **options)
        model.to(device).train()
        model.init(x)
        models[name] = model
        if name == "normflows" or args.plain_adam:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)  # torch's default Adam (foreach)
        else:
            optimizer = make_optimizer("adam", model.parameters(), lr=1e-5)  # GlowModule's own choice (fused)
        steps[name] = make_step(model, optimizer, x, dims, autocast)

    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, precision {args.precision}, "
          f"L={args.levels} K={args.steps_per_level} width={args.hidden_channels} batch={args.batch_size} "
          f"image {args.image_size}x{args.image_size}")  # fmt: skip
    for name, model in models.items():
        print(f"# {name}: {params(model):,} parameters")

    rows = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        rows[name] = {"warmup_s": time.perf_counter() - t0, "times": []}
        rows[name]["flops"] = None if args.no_flops else count_flops(step)
        rows[name]["act"] = None if args.no_activation_bytes else saved_bytes(models[name], x, dims, autocast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak = {}
    for _ in range(math.ceil(args.steps / args.block)):  # interleaved rounds
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.block):
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                rows[name]["times"].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device))

    for name, model in models.items():
        if "memory" in name and not args.no_activation_bytes:  # backward recomputes one coupling NN at a time
            net = model.flow.steps[0][0].coupling.net  # the largest: level 1
            x_a = torch.zeros(args.batch_size, net[0].in_channels, args.image_size // 2, args.image_size // 2)
            one = saved_bytes(net, x_a.to(device), dims, autocast, loss_fn=lambda out: out.sum())
            print(
                f"# {name}: backward adds one recomputed level-1 coupling NN: {one / args.batch_size / 2**20:.2f} MiB/img"
            )
        if "invert" in name and not args.no_activation_bytes:  # backward rebuilds and recomputes one step at a time
            one = rebuilt_step_bytes(model.flow, args.batch_size, args.image_size, device, autocast)
            print(f"# {name}: backward adds one rebuilt level-1 flow step: {one / args.batch_size / 2**20:.2f} MiB/img")

    header = (
        f"{'impl':<22}{'step ms':>10}{'img/s':>10}{'TFLOP/s':>10}{'GFLOP/img':>11}{'act MiB/img':>13}{'peak MiB':>10}"
    )
    print(header)
    for name, row in rows.items():
        t = statistics.median(row["times"])
        row["median"] = t
        tflops = f"{row['flops'] / t / 1e12:.3f}" if row["flops"] else "-"
        gflop = f"{row['flops'] / args.batch_size / 1e9:.2f}" if row["flops"] else "-"
        act = f"{row['act'] / args.batch_size / 2**20:.2f}" if row["act"] is not None else "-"
        mem = f"{peak[name] / 2**20:.0f}" if name in peak else "-"
        print(f"{name:<22}{t * 1e3:>10.1f}{args.batch_size / t:>10.1f}{tflops:>10}{gflop:>11}{act:>13}{mem:>10}")
    if device.type == "cpu":
        print(f"# peak RSS of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    base = "normflows" if "normflows" in rows else next(iter(rows))
    for name in rows:
        if name != base:
            print(f"# throughput ratio {name} / {base}: {rows[base]['median'] / rows[name]['median']:.3f}")
    print("# warmup (incl. compile) s: " + ", ".join(f"{n} {r['warmup_s']:.1f}" for n, r in rows.items()))
    return rows


if __name__ == "__main__":
    main()
