"""Reversible backprop through a level's K flow steps: activation memory O(1) in depth.

A flow step is invertible, so the backward pass need not find its input in memory: it rebuilds it from
the step's output. This is the RevNet idea (Gomez et al., 2017, "The Reversible Residual Network:
Backpropagation Without Storing Activations", section 4 and algorithm 1) and i-RevNet's (Jacobsen et al.,
2018), applied to Glow's steps (Kingma & Dhariwal, 2018, table 1); openai/glow used gradient
checkpointing instead.

:class:`ReversibleSteps` runs the K steps of a level without autograd and keeps only the level's output
(``ctx.save_for_backward``, where a saved-tensors hook sees it). Its backward walks the steps from the last:

1. the coupling's ``NN(y_a)`` is evaluated once, with gradients. Since ``y_a = x_a``, the same call serves
   the inverse (the shift and scale that rebuild ``x_b``) and the backward (its graph), so one step's
   backward costs one NN forward and one NN backward on top of the no-grad forward: the FLOPs of
   ``torch.utils.checkpoint`` over the NNs (``memory_saving="recompute"``), with none of the flow state kept;
2. the 1x1 convolution and ActNorm are inverted without gradients (W^-1 in float64, DESIGN.md rule 2),
   then recomputed forward with gradients from the rebuilt input (cheap: they are per-pixel linear maps);
3. the step's gradients come from two ``torch.autograd.grad`` calls (coupling, then ActNorm + 1x1 conv) and
   are returned as the Function's input gradients, so autograd, DDP's hooks and the optimizer see ordinary
   parameter gradients.

The backward re-enters the forward's autocast state for the recomputed forward ops (not for their gradients):
under bf16 the NN recomputed in backward is the bf16 NN of the forward, so the inverse rebuilds what the
forward computed (DESIGN.md rule 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layers import FlowStep

RunStep = Callable[[FlowStep, Tensor], tuple[Tensor, Tensor]]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def step_parameters(step: FlowStep) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """A step's trainable parameters in the order the Function takes them: (ActNorm + permutation, coupling)."""
    return _trainable(step.actnorm) + _trainable(step.permute), _trainable(step.coupling)


def _grads(outputs, inputs, grad_outputs) -> list[Tensor | None]:
    """d(outputs . grad_outputs)/d(inputs); outputs without a graph (an additive coupling's logdet) are left out."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    outputs, grad_outputs = zip(*pairs)
    return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))


def _not_leaf(t: Tensor) -> Tensor:
    """A view of the leaf ``t``: what modules see in the backward's recomputation. Module trackers (torch's
    FlopCounterMode) hook their inputs, and a hook on a leaf fails inside ``torch.autograd.grad``."""
    return t.view_as(t)


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def step_backward(step: FlowStep, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, autocast=nullcontext):
    """Rebuild the input x of ``step`` from its output y and backprop (grad_y, grad_logdet) through the step.

    ``autocast()`` is the forward's autocast context: the recomputed forward ops run under it, the gradient
    computations outside it (as in a plain backward: autocast would run e.g. the LU products' backward in bf16).
    Returns (x, grad_x, parameter gradients in :func:`step_parameters` order). Runs with gradients enabled.
    """
    coupling, split = step.coupling, step.coupling.split
    flow_params, coupling_params = step_parameters(step)
    y_a, y_b = y[:, :split].detach(), y[:, split:]
    x_a = y_a.requires_grad_()
    with autocast():  # NN(y_a) once, with gradients: for the inverse (its values) and the backward (its graph)
        shift, scale = coupling._shift_and_scale(_not_leaf(x_a))
    with torch.no_grad():  # invert the step: coupling, then 1x1 conv, then ActNorm
        u_b = coupling._uncouple(y_b, shift, scale)
        u = torch.cat([y_a, u_b], dim=1)
        x = step.actnorm.inverse(step.permute.inverse(u)[0])[0]

    # the coupling's backward, from its rebuilt input (x_a, u_b)
    u_b = u_b.requires_grad_()
    with autocast():
        out_b = coupling._couple(u_b, shift, scale)
        ld_coupling = coupling._logdet(scale, u_b)
    grad_b = [grad_y[:, split:], grad_logdet]
    g_xa, g_ub, *g_coupling = _grads([out_b, ld_coupling], [x_a, u_b, *coupling_params], grad_b)
    g_u = torch.cat([grad_y[:, :split] + _or_zeros(g_xa, x_a), _or_zeros(g_ub, u_b)], dim=1)  # y_a = x_a: both paths

    # ActNorm and the 1x1 conv, recomputed forward from the rebuilt x
    x = x.requires_grad_()
    with autocast():
        a, ld_actnorm = step.actnorm(_not_leaf(x))
        u_again, ld_permute = step.permute(a)
    g_x, *g_flow = _grads([u_again, ld_actnorm + ld_permute], [x, *flow_params], [g_u, grad_logdet])
    return x.detach(), _or_zeros(g_x, x), g_flow + g_coupling


class ReversibleSteps(torch.autograd.Function):
    """``(h, logdet, steps, run, *parameters) -> (h after the K steps, logdet plus theirs)``, keeping only the
    output. The steps' log-determinants are added to ``logdet`` (B,) one by one, in the order of the plain loop,
    so the loss is bit-identical to the plain forward's.

    ``parameters`` are the steps' trainable parameters (:func:`step_parameters`, step by step): passed in so
    that their gradients leave the backward as ordinary input gradients. ``run(step, h)`` runs one step
    forward (eager or compiled); the backward runs eager.
    """

    @staticmethod
    def forward(ctx, h: Tensor, logdet: Tensor, steps: Sequence[FlowStep], run: RunStep, *parameters: Tensor):
        ctx.steps = steps  # modules, not tensors: the only tensor kept is the saved output
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for step in steps:  # autograd is off inside Function.forward: nothing is kept
            h, ld = run(step, h)
            logdet = logdet + ld
        ctx.save_for_backward(h)
        return h, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor, grad_logdet: Tensor):
        (y,) = ctx.saved_tensors
        grad_h = torch.zeros_like(y) if grad_h is None else grad_h
        grad_logdet = y.new_zeros(y.shape[0]) if grad_logdet is None else grad_logdet
        device, enabled, dtype = ctx.autocast

        def autocast():
            return torch.autocast(device, dtype=dtype) if enabled else nullcontext()

        per_step = []
        with torch.enable_grad():
            for step in reversed(ctx.steps):
                y, grad_h, grads = step_backward(step, y, grad_h, grad_logdet, autocast)
                per_step.append(grads)
        parameter_grads = [g for grads in reversed(per_step) for g in grads]
        grad_h = grad_h if ctx.needs_input_grad[0] else None
        return grad_h, grad_logdet if ctx.needs_input_grad[1] else None, None, None, *parameter_grads


def reversible_steps(steps: Sequence[FlowStep], h: Tensor, logdet: Tensor, run: RunStep) -> tuple[Tensor, Tensor]:
    """Run ``steps`` on ``h`` (B, C, H, W) with reversible backprop -> (output (B, C, H, W), logdet (B,) plus the
    steps' log-determinants)."""
    parameters = [p for step in steps for group in step_parameters(step) for p in group]
    return ReversibleSteps.apply(h, logdet, steps, run, *parameters)
