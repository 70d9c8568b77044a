"""Exact dense Hessian of a small model's mean loss by ``torch.func.hessian`` (tests, truth)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

from hessrank.curvature.data import as_batches
from hessrank.curvature.operator import (
    LossFn,
    check_finite_params,
    functional_model,
    module_mode,
    select_params,
)


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable | tuple[Tensor, Tensor],
    params: Sequence[str] | None = None,
    mode: str = "eval",
) -> Tensor:
    """H = Σ_b (n_b/N) ∇²L_b(θ) as a dense (p, p) tensor, θ flat in ``params`` order.

    Costs p Hessian-vector products' worth of memory and time: meant for models with at most a
    few thousand parameters (tests, exact mode). Independent of :class:`HessianOperator`'s
    product code so that it can serve as the reference.

    In ``mode="eval"`` it is ``torch.func.hessian``. In ``mode="train"`` it is
    ``torch.autograd.functional.hessian``: with BatchNorm on batch statistics, torch 2.13's
    ``torch.func.hessian`` (and ``jacrev(jacrev(...))``) returned an asymmetric matrix that
    disagreed with finite differences of the gradient by ~3e-2 on a small BN net, while
    Hessian-vector products and classic autograd agreed with them (to 5e-10 and 4e-17).
    """
    names = select_params(model, params)
    check_finite_params(model)
    model = functional_model(model, mode)
    named = dict(model.named_parameters())
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    fixed = {n: t.detach() for n, t in named.items() if n not in names}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})
    batches = as_batches(data, dtype=theta.dtype, device=theta.device)

    def flat_loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, (p, fixed), (x,)), y)

    H = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    with module_mode(model, mode):
        for x, y, w in zip(batches.inputs, batches.targets, batches.weights):
            if mode == "eval":
                Hb = hessian(flat_loss)(theta, x, y)
            else:
                Hb = torch.autograd.functional.hessian(partial(flat_loss, x=x, y=y), theta)
            H.add_(Hb, alpha=w)
    return (H + H.T) / 2
