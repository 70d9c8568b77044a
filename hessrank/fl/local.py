"""Client-side local training: mini-batch SGD over one client's data (McMahan et al., 2017).

Every algorithm's client step goes through :func:`local_sgd` (FeDLRT's coefficient steps
through :func:`batch_indices`), so batching, shuffling and the optimizer are identical across
FedAvg, FedProx, FedLoRA, FedLoRU and their variants and SCAFFOLD.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grad_norm_

from hessrank.fl.protocol import ClientData, NonFiniteError

if TYPE_CHECKING:
    from hessrank.data.task import Task

__all__ = ["LocalResult", "batch_indices", "local_sgd"]


@dataclass(frozen=True)
class LocalResult:
    """What one call of :func:`local_sgd` did.

    mean_loss: mean over the steps of the mini-batch loss (each a batch mean), before each step.
    num_steps: optimizer steps taken. seconds: wall-clock time of the loop.
    """

    mean_loss: float
    num_steps: int
    seconds: float


def batch_indices(
    n: int, batch_size: int, *, epochs: int, steps: int, generator: torch.Generator
) -> list[Tensor]:
    """Index tensors of the mini-batches of one client's local training.

    With ``steps > 0``: exactly ``steps`` batches of ``min(batch_size, n)`` indices, read in order
    from a sequence of fresh permutations of range(n) (a permutation's tail shorter than a batch
    is dropped, a new permutation starts). Otherwise ``epochs`` passes, each a fresh permutation
    cut into batches of ``batch_size`` (the last one may be smaller). Every permutation is
    ``torch.randperm(n, generator=generator)``, so the batches are a function of the
    generator's state.
    """
    if n < 1:
        raise ValueError("a client with no samples cannot train; check the partition's min size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[Tensor] = []
    if steps > 0:
        b = min(batch_size, n)
        perm, pos = torch.randperm(n, generator=generator), 0
        while len(out) < steps:
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=generator), 0
            out.append(perm[pos : pos + b])
            pos += b
        return out
    if epochs < 1:
        raise ValueError(f"need local_epochs >= 1 or local_steps >= 1, got {epochs} and {steps}")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out


@torch.no_grad()
def _sgd_step(
    params: list[nn.Parameter],
    buffers: list[Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
    correction: Sequence[Tensor] | None = None,
) -> None:
    """One SGD step in place, the same arithmetic as ``torch.optim.SGD`` (see local_sgd), with
    ``correction[i]`` added to parameter i's gradient (SCAFFOLD) when given."""
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        g = p.grad
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        if correction is not None:
            g = g.add(correction[i])
        if momentum != 0.0:
            if buffers[i] is None:
                buffers[i] = g.detach().clone()
            else:
                buffers[i].mul_(momentum).add_(g)
            g = buffers[i]
        p.add_(g, alpha=-lr)


def local_sgd(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    data: ClientData,
    task: Task,
    *,
    lr: float,
    batch_size: int,
    epochs: int = 1,
    steps: int = 0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    penalty: Callable[[], Tensor] | None = None,
    correction: Sequence[Tensor] | None = None,
    max_grad_norm: float = 0.0,
    stochastic: bool = False,
) -> LocalResult:
    """Train ``params`` of ``model`` in place by SGD on ``data`` (model in train mode).

    Each step minimizes the batch-mean loss L_B = ``task(task.forward(model, x_b), y_b)``
    (+ ``penalty()``, FedProx's proximal term) by the update of ``torch.optim.SGD(lr,
    momentum, weight_decay)`` (no dampening, no Nesterov), with a constant ``correction``
    c_p added to each parameter's gradient (SCAFFOLD's c − c_i; none by default):
        g ← clip(∇L_B) + wd·θ + c_p;  m ← g (first step) or μ·m + g;  θ ← θ − lr·m,
    written out here because ``torch.optim`` imports torch._dynamo on its first step (seconds
    of start-up). clip (``max_grad_norm`` = c > 0) is ``torch.nn.utils.clip_grad_norm_`` over
    ``params``: every gradient times min(1, c / (‖∇L_B‖₂ + 1e-6)), the 2-norm taken over all
    of them together; c = 0 leaves the gradient alone. The momentum buffer is fresh for every
    call, i.e. for every round. Batches come from :func:`batch_indices`. Parameters not in
    ``params`` get no update (their gradients are not even computed).

    ``stochastic``: the forward pass draws random numbers (low-rank dropout). One seed is
    then drawn from ``generator`` after the batches, and the loop runs with torch's global
    RNG seeded by it and restored afterwards, so the masks are a function of the generator's
    state and the global RNG is left as it was. Without it nothing more is drawn.
    """
    params = list(params)
    start = time.perf_counter()
    batches = batch_indices(
        data.size, batch_size, epochs=epochs, steps=steps, generator=generator
    )
    if stochastic:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [data.inputs.device] if data.inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _loop(model, params, data, task, batches, lr, momentum, weight_decay,
                         penalty, correction, max_grad_norm, start)  # fmt: skip
    return _loop(model, params, data, task, batches, lr, momentum, weight_decay, penalty,
                 correction, max_grad_norm, start)  # fmt: skip


def _loop(
    model: nn.Module,
    params: list[nn.Parameter],
    data: ClientData,
    task: Task,
    batches: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    penalty: Callable[[], Tensor] | None,
    correction: Sequence[Tensor] | None,
    max_grad_norm: float,
    start: float,
) -> LocalResult:
    """The steps of :func:`local_sgd` over ``batches``."""
    trainable = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in trainable)
    buffers: list[Tensor | None] = [None] * len(params)
    model.train()
    total = 0.0
    try:
        for step, idx in enumerate(batches):
            for p in params:
                p.grad = None
            loss = task(task.forward(model, data.inputs[idx]), data.targets[idx])
            if penalty is not None:
                loss = loss + penalty()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"client {data.client_id} got a non-finite loss ({value}) at local step "
                    f"{step + 1} of {len(batches)}", client_id=data.client_id,
                )  # fmt: skip
            loss.backward()
            if max_grad_norm > 0.0:
                clip_grad_norm_(params, max_grad_norm)
            _sgd_step(params, buffers, lr, momentum, weight_decay, correction)
            total += value
    finally:
        for p in params:
            p.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
    return LocalResult(total / len(batches), len(batches), time.perf_counter() - start)
