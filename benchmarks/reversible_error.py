"""How exact is reversible backprop (``memory_saving="invert"``)? Reconstruction and gradient errors.

For each level, the K steps run forward (float32, or under ``--precision bf16-mixed``) recording every step's
true input; then the backward's own code (:func:`glow_lightning.flow.reversible.step_backward`) rebuilds the
inputs from the level's output, step by step, and the error of the rebuilt level input (after all K inverses)
is reported, absolute and relative to the input's largest value. Also the gradient of the invert backward
against the plain one (same weights, same batch): the largest per-parameter error relative to that parameter's
largest gradient, and the relative L2 error of the whole gradient vector. Measured at initialisation (ActNorm
initialised from data) and after ``--train-steps`` Adam steps on smooth synthetic images.

    python benchmarks/reversible_error.py --levels 3 --steps-per-level 32 --hidden-channels 64 --train-steps 300
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glow_lightning.flow import Glow  # noqa: E402
from glow_lightning.flow.layers import squeeze  # noqa: E402
from glow_lightning.flow.reversible import step_backward  # noqa: E402
from glow_lightning.module import make_optimizer  # noqa: E402


def smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images with structure (bilinear-upsampled 4x4 noise plus fine noise), 8-bit, uniformly dequantized."""
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    x = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)
    pixels = torch.floor(x * 255.999)
    return (pixels + torch.rand(pixels.shape, generator=generator)) / 256


def reconstruction_errors(flow: Glow, x: torch.Tensor, autocast) -> list[tuple[float, float]]:
    """Per level: (max |rebuilt - true| of the level's input after its K inverses, the same / max |true|)."""
    errors = []
    with torch.no_grad(), autocast():
        h = x - 0.5
        for level, steps in enumerate(flow.steps):
            h = squeeze(h)
            level_input = h
            for step in steps:
                h, _ = step(h)
            y = h
            with torch.enable_grad():
                for step in reversed(steps):
                    y, _, _ = step_backward(step, y, torch.zeros_like(y), y.new_zeros(y.shape[0]))
            err = (y.float() - level_input.float()).abs().max().item()
            errors.append((err, err / level_input.abs().max().item()))
            if level < flow.levels - 1:
                h = h[:, : flow.kept_channels[level]]
    return errors


def gradients(flow: Glow, x: torch.Tensor, mode, autocast) -> dict[str, torch.Tensor]:
    flow.memory_saving = mode
    flow.zero_grad(set_to_none=True)
    with autocast():
        loss = flow.bits_per_dim(x).mean()
    loss.backward()
    flow.memory_saving = False
    return {n: p.grad.clone() for n, p in flow.named_parameters()}


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str:
    """The worst parameter's max|g - g_ref| / max|g_ref|, its name, and the whole vector's relative L2 error."""
    per_param = {n: ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in reference.items()}
    worst = max(per_param, key=per_param.get)
    flat_ref = torch.cat([g.flatten() for g in reference.values()])
    flat = torch.cat([grads[n].flatten() for n in reference])
    total = ((flat - flat_ref).norm() / flat_ref.norm()).item()
    return f"max per-parameter {per_param[worst]:.2e} (of its max |grad|, {worst}), whole vector {total:.2e} (rel. L2)"


def report(name: str, flow: Glow, x: torch.Tensor, autocast) -> None:
    """Reconstruction errors, and the invert gradient against the plain one; for scale, the plain gradient's own
    change when the input moves by one float32 ulp (the float32 conditioning of each gradient)."""
    flow.train()
    rec = reconstruction_errors(flow, x, autocast)
    plain = gradients(flow, x, False, autocast)
    inv = gradients(flow, x, "invert", autocast)
    nudged = gradients(flow, torch.nextafter(x, torch.full_like(x, 2.0)), False, autocast)
    levels = "; ".join(f"level {i + 1}: {a:.2e} abs, {r:.2e} rel" for i, (a, r) in enumerate(rec))
    print(f"{name}: rebuilt level inputs after K inverses: {levels}")
    print(f"{name}: gradient invert vs plain: {compare(inv, plain)}")
    print(f"{name}: for scale, plain with the input 1 ulp up vs plain: {compare(nudged, plain)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--steps-per-level", type=int, default=32)
    p.add_argument("--hidden-channels", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if args.precision == "bf16-mixed":

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    flow = Glow(in_channels=3, image_size=args.image_size, levels=args.levels, steps_per_level=args.steps_per_level,
                hidden_channels=args.hidden_channels)  # fmt: skip
    flow.initialize(smooth_images(64, args.image_size, generator))
    probe = smooth_images(args.batch_size, args.image_size, generator)
    print(f"# L={args.levels} K={args.steps_per_level} width={args.hidden_channels} batch={args.batch_size} "
          f"precision {args.precision}, torch {torch.__version__}")  # fmt: skip
    report("init", flow, probe, autocast)

    optimizer = make_optimizer("adam", flow.parameters(), lr=args.lr)
    flow.memory_saving = "invert"  # train with the reversible backward itself
    for i in range(args.train_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (i + 1) / args.warmup_steps)
        with autocast():
            loss = flow.bits_per_dim(smooth_images(args.batch_size, args.image_size, generator)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % 50 == 0 or i + 1 == args.train_steps:
            print(f"# step {i + 1}: train bits/dim {loss.item():.3f}")
    flow.memory_saving = False
    if not math.isfinite(loss.item()):
        raise SystemExit("training diverged")
    report(f"after {args.train_steps} Adam steps", flow, probe, autocast)


if __name__ == "__main__":
    main()
