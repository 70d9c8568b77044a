"""Exact dense Hessian of a small model's mean loss by ``torch.func.hessian`` (tests, truth)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd

from hessrank.curvature.attention import attention_kernel
from hessrank.curvature.data import as_batches
from hessrank.curvature.params import LossFn, ParameterSpace
from hessrank.data.task import Task, as_task


def dense_hessian(
    model: nn.Module,
    loss_fn: Task | LossFn,
    data: Iterable | tuple,
    params: Sequence[str] | None = None,
    mode: str = "eval",
) -> Tensor:
    """H = Σ_b (n_b/N) ∇²L_b(θ) as a dense (p, p) tensor, θ flat in ``params`` order.

    Costs p Hessian-vector products' worth of memory and time: meant for models with at most a
    few thousand parameters (tests, exact mode). Independent of the operators' product code so
    that it can serve as the reference (it shares only the parameter space). ``loss_fn`` is a
    task or a plain batch-mean loss; scaled-dot-product attention runs on torch's math kernel
    (the only one with second derivatives on the CPU).

    In ``mode="eval"`` it is ``jacfwd(grad(loss))``: forward-mode columns of the gradient's
    Jacobian. Not ``torch.func.hessian`` (``jacfwd(jacrev(loss))``): in torch 2.13 it is wrong
    on models with ``F.layer_norm`` — 0.68 off on a 15-parameter example and 2.5e-2 on a tiny
    attention model, where finite differences of the gradient, ``torch.autograd`` and
    ``jacfwd(grad)`` agree to 1e-15 (jacrev's ``vmap`` over the one-row vjp of a scalar loss
    takes the layer-norm backward's batching rule; ``tests/curvature/test_tasks.py``). In
    ``mode="train"`` it is
    ``torch.autograd.functional.hessian``: with BatchNorm on batch statistics, torch 2.13's
    ``torch.func.hessian`` (and ``jacrev(jacrev(...))``) returned an asymmetric matrix that
    disagreed with finite differences of the gradient by ~3e-2 on a small BN net, while
    Hessian-vector products and classic autograd agreed with them (to 5e-10 and 4e-17).
    """
    space = ParameterSpace(model, params, mode)
    task = as_task(loss_fn)
    theta = space.vector()
    batches = as_batches(data, dtype=theta.dtype, device=theta.device)

    def flat_loss(flat: Tensor, x, y: Tensor) -> Tensor:
        return space.loss(task, space.tangents(flat), x, y)

    H = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    with space.mode_context(), attention_kernel("math"):
        for x, y, w in zip(batches.inputs, batches.targets, batches.weights):
            if mode == "eval":
                Hb = jacfwd(grad(flat_loss))(theta, x, y)
            else:
                Hb = torch.autograd.functional.hessian(partial(flat_loss, x=x, y=y), theta)
            H.add_(Hb, alpha=w)
    return (H + H.T) / 2
