"""Every client's Hessian product in one tangent pass: clients as equal-size padded units.

K clients share the weights θ but not their data. Cut client c's n_c samples into chunks of m
(the last one padded), one *unit* u per chunk, U units in all, and give every unit its own copy
θ_u = θ of the parameters. With the unit loss

    L_u(θ_u) = (1/n_c) Σ_{i ∈ u, i real} ℓ_i(θ_u)        (c the owner of u)

the client loss is L_c = Σ_{u ∈ c} L_u, so H_c = Σ_{u ∈ c} ∇²L_u. The map Θ = (θ_u)_u ↦
(∇L_u(θ_u))_u has a block-diagonal Jacobian with blocks ∇²L_u, so one ``vjp`` of it with the
cotangent rows (v_{c(u)})_u returns every H_u v_{c(u)} at once: a single call, batched matrix
products over the units, instead of K small calls that are dominated by per-call overhead.

The padded rows are copies of a real row whose outputs are detached, so they add a constant
to L_u and nothing to its derivatives; ``loss_fn`` must be a per-sample mean (true of
cross-entropy and MSE with ``reduction="mean"``), which :class:`StackedClientHessians` checks
against a plain gradient on one client before use. Units are independent only when samples
are: BatchNorm in train mode couples a client's samples and cannot use this layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from hessrank.curvature.data import Batches

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Units:
    """Clients' samples laid out as U units of m rows.

    inputs (U, m, *x), targets (U, m, *y); keep (U, m) marks real rows; scale (U,) is m / n_c
    (turns the unit's batch mean into its share of the client mean); owner (U,) the client.
    """

    inputs: Tensor
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
        return Units(self.inputs[start:stop], self.targets[start:stop], self.keep[start:stop],
                     self.scale[start:stop], self.owner[start:stop])


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


def make_units(clients: Sequence[Batches], m: int) -> Units:
    """Concatenate each client's batches, cut them into chunks of m, pad the last chunk with
    copies of its first row (masked out by ``keep``)."""
    xs, ys, keeps, scales, owners = [], [], [], [], []
    for c, b in enumerate(clients):
        x, y = torch.cat(b.inputs), torch.cat(b.targets)
        n = int(y.shape[0])
        for s in range(0, n, m):
            xu, yu = x[s:s + m], y[s:s + m]
            r = int(yu.shape[0])
            keep = torch.zeros(m, dtype=torch.bool, device=y.device)
            keep[:r] = True
            if r < m:
                xu = torch.cat([xu, xu[:1].expand(m - r, *xu.shape[1:])])
                yu = torch.cat([yu, yu[:1].expand(m - r, *yu.shape[1:])])
            xs.append(xu)
            ys.append(yu)
            keeps.append(keep)
            scales.append(m / n)
            owners.append(c)
    ref = clients[0].inputs[0]
    scale_dtype = ref.dtype if torch.is_floating_point(ref) else torch.get_default_dtype()
    return Units(torch.stack(xs), torch.stack(ys), torch.stack(keeps),
                 torch.tensor(scales, dtype=scale_dtype, device=ref.device),
                 torch.tensor(owners, dtype=torch.long, device=ref.device))


def couples_samples(model: nn.Module, mode: str) -> bool:
    """Whether a forward pass mixes samples of a batch (BatchNorm normalizing with batch
    statistics, i.e. in train mode), so a client's batch cannot be cut into units."""
    norm = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    return mode == "train" and any(isinstance(m, norm) for m in model.modules())


class StackedClientHessians:
    """Products with all K client Hessians through one kept linearization per unit group.

    Args:
        model: module to evaluate (already fixed in its mode; not modified).
        loss_fn: batch-mean loss, a mean of per-sample terms.
        params: {name: θ tensor} differentiated, in flat-vector order.
        fixed: other parameters and buffers passed to ``functional_call`` unchanged.
        units: the clients' data as padded units (:func:`make_units`).
        num_clients: K.
        max_units: units per kept linearization (memory); groups run one after another.
        unit_mb: the estimated memory of one unit's linearization (kept for reports).

    :meth:`apply` maps tangent rows R (K, p) to (H_c R[c])_c, and :meth:`apply_shared` a
    single tangent v (p,) to Σ_c w_c H_c v. The linearizations are built on first use.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor],
                 fixed: dict[str, Tensor], units: Units, num_clients: int,
                 max_units: int | None = None, unit_mb: float | None = None) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.params, self.fixed = params, fixed
        self.names = list(params)
        self._shapes = [params[n].shape for n in self.names]
        self._offsets = [0]
        for s in self._shapes:
            self._offsets.append(self._offsets[-1] + math.prod(s))
        self.p = self._offsets[-1]
        self.units = units
        self.num_clients = num_clients
        self.unit_mb = unit_mb
        U = units.num_units
        step = U if max_units is None else max(1, min(U, int(max_units)))
        self.groups = [(a, min(a + step, U)) for a in range(0, U, step)]
        self._closures: list[Callable | None] = [None] * len(self.groups)

    def _unit_loss(self, theta: dict[str, Tensor], x: Tensor, y: Tensor, keep: Tensor,
                   scale: Tensor) -> Tensor:
        """L_u = (m/n_c) · loss_fn over the unit, padded rows' outputs detached."""
        out = functional_call(self.model, (theta, self.fixed), (x,))
        mask = keep.reshape(-1, *([1] * (out.ndim - 1)))
        return self.loss_fn(torch.where(mask, out, out.detach()), y) * scale

    def unit_gradients(self, start: int, stop: int) -> dict[str, Tensor]:
        """{name: (U_g, *shape)}: ∇L_u for the units [start, stop) (no graph kept)."""
        g = self.units.slice(start, stop)
        theta = {n: t.expand(stop - start, *t.shape) for n, t in self.params.items()}
        return vmap(grad(self._unit_loss))(theta, g.inputs, g.targets, g.keep, g.scale)

    def _closure(self, i: int) -> Callable:
        if self._closures[i] is None:
            a, b = self.groups[i]
            g = self.units.slice(a, b)
            theta = {n: t.expand(b - a, *t.shape) for n, t in self.params.items()}
            fn = lambda th: vmap(grad(self._unit_loss))(  # noqa: E731
                th, g.inputs, g.targets, g.keep, g.scale)
            _, self._closures[i] = vjp(fn, theta)
        return self._closures[i]

    def _unit_products(self, i: int, rows: Tensor) -> Tensor:
        """(U_g, p) tangent rows of group i → (U_g, p) rows H_u rows[u]."""
        n, o = rows.shape[0], self._offsets
        tangents = {name: rows[:, o[j]:o[j + 1]].reshape(n, *s)
                    for j, (name, s) in enumerate(zip(self.names, self._shapes))}
        out = self._closure(i)(tangents)[0]
        return torch.cat([out[name].reshape(n, -1) for name in self.names], dim=1)

    def apply(self, R: Tensor) -> Tensor:
        """(K, p) → (K, p): row c is H_c R[c]."""
        out = torch.zeros_like(R)
        owner = self.units.owner
        for i, (a, b) in enumerate(self.groups):
            hv = self._unit_products(i, R.index_select(0, owner[a:b]))
            out.index_add_(0, owner[a:b], hv)
        return out

    def apply_shared(self, v: Tensor, weights: Tensor) -> Tensor:
        """(p,) → (p,): Σ_c weights[c] H_c v."""
        out = torch.zeros_like(v)
        owner = self.units.owner
        for i, (a, b) in enumerate(self.groups):
            hv = self._unit_products(i, v.expand(b - a, -1).contiguous())
            out.add_(weights.index_select(0, owner[a:b]) @ hv)
        return out
