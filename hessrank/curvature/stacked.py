"""The layout of the federated operator's batched strategy: clients as equal-size padded units.

K clients share the weights θ but not their data. Cut client c's n_c samples into chunks of m
(the last one padded), one *unit* u per chunk, U units in all, and give every unit its own copy
θ_u = θ. With the unit loss

    L_u(θ_u) = (1/n_c) Σ_{i ∈ u, i real} ℓ_i(θ_u)        (c the owner of u)

the client loss is L_c = Σ_{u ∈ c} L_u, so any curvature matrix that is a sum over samples
(Hessian, GGN, Fisher) is C_c = Σ_{u ∈ c} C_u, and the curvature of Σ_u L_u(θ_u) in
Θ = (θ_u)_u is block diagonal with blocks C_u: one product with the rows (v_{c(u)})_u returns
every C_u v_{c(u)} at once (:meth:`CurvatureOperator.unit_linearization`) — one batched call
instead of K small calls dominated by per-call overhead.

The padded rows are copies of a real row whose outputs are detached, so they add a constant
to L_u and nothing to its derivatives; ``loss_fn`` must be a per-sample mean (true of
cross-entropy and MSE with ``reduction="mean"``). Units are independent only when samples
are: BatchNorm in train mode couples a client's samples and cannot use this layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from hessrank.curvature.data import Batches
from hessrank.data.inputs import cat_inputs, first_tensor, map_inputs


@dataclass(frozen=True)
class Units:
    """Clients' samples laid out as U units of m rows.

    inputs: the input structure with (U, m, ...) tensors; targets (U, m, *y); keep (U, m)
    marks real rows; scale (U,) is m / n_c (the unit's batch mean → its share of the client
    mean); owner (U,) the client.
    """

    inputs: object
    targets: Tensor
    keep: Tensor
    scale: Tensor
    owner: Tensor

    @property
    def num_units(self) -> int:
        return int(self.owner.shape[0])

    @property
    def unit_size(self) -> int:
        return int(self.keep.shape[1])

    def slice(self, start: int, stop: int) -> Units:
        return Units(map_inputs(lambda t: t[start:stop], self.inputs), self.targets[start:stop],
                     self.keep[start:stop], self.scale[start:stop], self.owner[start:stop])

    def args(self) -> tuple:
        """(inputs, targets, keep, scale), the arguments of the unit methods of operators."""
        return self.inputs, self.targets, self.keep, self.scale


def plan_unit_size(sizes: Sequence[int], sample_cost: float, unit_cost: float,
                   max_size: int | None = None) -> int:
    """The chunk size m that minimizes U(m)·(m·sample_cost + unit_cost), U(m) = Σ ⌈n_c/m⌉.

    ``sample_cost``: work per padded sample (activation entries); ``unit_cost``: work per unit
    (its own gradient and product rows, p entries). Small m wastes less on padding but gives
    every unit a p-sized row; ties go to the larger m (fewer, larger matrix products).
    """
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every client needs at least one sample, got sizes {list(sizes)}")
    top = max(sizes) if max_size is None else max(1, min(max(sizes), int(max_size)))
    best, best_cost = top, math.inf
    for m in range(top, 0, -1):
        units = sum(-(-n // m) for n in sizes)
        cost = units * (m * sample_cost + unit_cost)
        if cost < best_cost * (1 - 1e-12):
            best, best_cost = m, cost
    return best


def _pad(t: Tensor, m: int) -> Tensor:
    r = int(t.shape[0])
    return t if r == m else torch.cat([t, t[:1].expand(m - r, *t.shape[1:])])


def make_units(clients: Sequence[Batches], m: int, totals: Sequence[int] | None = None,
               dtype: torch.dtype | None = None) -> Units:
    """Concatenate each client's batches, cut them into chunks of m, pad the last chunk with
    copies of its first row (masked out by ``keep``). ``totals``: each client's sample count
    over all ranks when ``clients`` hold this rank's shards (scale m / total; default: the
    local count). ``dtype``: of the scales, the model's (default: the inputs' when floating,
    else torch's default; token ids must not round m / n to float32 under a float64 model)."""
    xs, ys, keeps, scales, owners = [], [], [], [], []
    for c, b in enumerate(clients):
        x, y = cat_inputs(list(b.inputs)), torch.cat(b.targets)
        local = int(y.shape[0])
        n = local if totals is None else int(totals[c])
        for s in range(0, local, m):
            r = min(m, local - s)
            xs.append(map_inputs(lambda t, s=s: _pad(t[s:s + m], m), x))
            ys.append(_pad(y[s:s + m], m))
            keep = torch.zeros(m, dtype=torch.bool, device=y.device)
            keep[:r] = True
            keeps.append(keep)
            scales.append(m / n)
            owners.append(c)
    leaves, spec = pytree.tree_flatten(xs[0])
    cols = [pytree.tree_flatten(x)[0] for x in xs]
    stacked = [torch.stack([col[i] for col in cols]) if isinstance(leaf, Tensor) else leaf
               for i, leaf in enumerate(leaves)]
    ref = first_tensor(clients[0].inputs[0])
    scale_dtype = dtype if dtype is not None else (
        ref.dtype if torch.is_floating_point(ref) else torch.get_default_dtype())
    return Units(pytree.tree_unflatten(stacked, spec), torch.stack(ys), torch.stack(keeps),
                 torch.tensor(scales, dtype=scale_dtype, device=ref.device),
                 torch.tensor(owners, dtype=torch.long, device=ref.device))


def couples_samples(model: nn.Module, mode: str) -> bool:
    """Whether a forward pass mixes samples of a batch (BatchNorm normalizing with batch
    statistics, i.e. in train mode), so a client's batch cannot be cut into units."""
    norm = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    return mode == "train" and any(isinstance(m, norm) for m in model.modules())

