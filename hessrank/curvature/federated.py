"""FederatedOperator: every client's curvature matrix and the server's, as one (K+1, p, p) stack.

With client losses L_c (mean over client c's n_c samples) and weights w_c (default n_c/N), the
server loss is L = Σ_c w_c L_c, so for the Hessian, the GGN and the Fisher alike C = Σ_c w_c C_c
exactly. A product of the stack is

    out[c] = C_c V[c],   out[K] = Σ_c w_c C_c V[K],

composed from the members of one curvature operator per client that
:mod:`hessrank.curvature.protocol` declares (they share one parameter space). For a
non-additive curvature (K-FAC) the server's products come from the operator its class builds
from the clients' (``combine``), not from Σ_c w_c C_c. Two strategies, chosen by a
deterministic rule and recorded in ``route``:

- "stacked": all clients' products in one batched call over equal-size padded units
  (:mod:`hessrank.curvature.stacked`, :meth:`CurvatureOperator.unit_linearization`), whatever
  K is; the server's products from the pooled data when w_c = n_c/N (one plain pass), else a
  second pass over the units. Needs independent samples (no BatchNorm in train mode), a
  per-sample-mean loss (checked against a plain gradient), kept linearizations (cache not
  turned off, ``hvp`` not "fwd-rev") and one unit's linearization within ``cache_budget_mb``.
- "per-client": client c's operator pushes its own tangents and the server's as one block of
  2k (one pass over its data per product, data never pooled); a non-additive curvature pushes
  its own only, and the combined server operator the server's.

With ``process_group=`` (each rank holds a shard of every client's data) both strategies
compute this rank's share of every product — unit scales and batch weights use the clients'
sample counts over all ranks — and the whole (J, p, k) stack is summed by **one all-reduce per
block product** (J·p·k floats); every rank takes the same strategy (stacked only if it applies
on all of them).

"auto" takes "stacked" whenever it applies (measured 0.71 / 0.55 of K + 1 separate analyses
at K = 10 / 20 against 1.10 / 1.33 for per-client, ``docs/performance.md``), else
"per-client"; ``strategy_reason`` says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from hessrank.curvature.base import all_reduce_sum, check_finite_product
from hessrank.curvature.data import Batches
from hessrank.curvature.params import LossFn, OnParameterSpace
from hessrank.curvature.protocol import ClientOperator, CombinableOperator, UnitOperator
from hessrank.curvature.registry import curvature_class
from hessrank.curvature.stacked import Units, couples_samples, make_units, plan_unit_size
from hessrank.data.inputs import cat_inputs, slice_inputs
from hessrank.data.task import Task

STRATEGIES = ("auto", "stacked", "per-client")


class FederatedOperator(OnParameterSpace):
    """Stacked operator of J = K + 1 curvature matrices: clients 0..K−1, then the server.

    Args:
        model: the global model at the weights under study.
        loss_fn: a :class:`~hessrank.data.task.Task` or a batch-mean ``loss_fn(outputs,
            targets)``.
        client_data: one ``data`` argument per client (pair or iterable of batches).
        curvature: a registered name ("hessian", "ggn", "fisher", "kfac";
            :mod:`hessrank.curvature.registry`) or a class implementing
            :class:`~hessrank.curvature.protocol.ClientOperator`.
        weights: w_c for the server loss (default n_c / N; must be ≥ 0 and sum to 1).
        strategy: "auto", "stacked" or "per-client" (module docstring).
        **operator_kwargs: for every client's operator (params, mode, cache, block, hvp,
            batch_size, cache_budget_mb, check_determinism, kind, seed, ...). With "stacked",
            ``batch_size`` caps the unit size and ``cache_budget_mb`` the kept linearizations.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Task | LossFn,
        client_data: Sequence[Iterable | tuple],
        curvature: str | type[ClientOperator] = "hessian",
        weights: Sequence[float] | None = None,
        *,
        strategy: str = "auto",
        **operator_kwargs,
    ) -> None:
        cls = curvature_class(curvature) if isinstance(curvature, str) else curvature
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if len(client_data) == 0:
            raise ValueError("client_data is empty: need at least one client")
        kw = {k: v for k, v in operator_kwargs.items() if k not in ("params", "mode")}
        self.clients: list[ClientOperator] = []
        for c, data in enumerate(client_data):
            try:
                if c == 0:
                    op = cls(model, loss_fn, data, **operator_kwargs)
                else:
                    op = cls(model, loss_fn, data, **{**kw, "check_determinism": False},
                             space=self.clients[0].space)
            except (ValueError, TypeError) as err:
                raise type(err)(f"client {c}: {err}") from err
            self.clients.append(op)
        first = self.clients[0]
        if not isinstance(first, ClientOperator):
            raise TypeError(f"{cls.__name__} does not implement the ClientOperator protocol "
                            "(hessrank.curvature.protocol)")
        self.space, self.task = first.space, first.task
        self.client_sizes = [op.num_samples for op in self.clients]
        total = sum(self.client_sizes)
        w = [n / total for n in self.client_sizes] if weights is None else [float(x) for x in
                                                                              weights]
        if len(w) != len(self.clients):
            raise ValueError(f"got {len(w)} weights for {len(self.clients)} clients")
        if min(w) < 0 or abs(sum(w) - 1.0) > 1e-9:
            raise ValueError(f"weights must be >= 0 and sum to 1, got sum {sum(w):.6g}")
        self.weights = w
        self.process_group = operator_kwargs.get("process_group")
        self.num_matvecs = 0
        self._checked = not operator_kwargs.get("check_determinism", True)
        self._units: Units | None = None
        self._groups: list[tuple[int, int]] = []
        self._closures: list = []
        self._server: ClientOperator | None = None
        route = {"curvature": first.curvature, "strategy": "per-client", **{
            k: v for k, v in first.route.items() if k != "curvature"}}
        if not first.additive:
            if not isinstance(first, CombinableOperator):
                raise TypeError(f"{cls.__name__} is not additive and has no combine(): the "
                                "server's operator cannot be built from the clients'")
            self._server = cls.combine(self.clients, self.weights)
        if strategy == "per-client" or not first.additive:
            if strategy == "stacked":
                raise ValueError(f"strategy='stacked' cannot be used: {first.curvature} is "
                                 "not additive (its server operator is combined from the "
                                 "clients')")
            reason = "requested" if strategy == "per-client" else (
                f"auto: rule ({first.curvature} is not additive: per-client products and a "
                "combined server operator)")
        else:
            why = self._agreed(self._plan_stacked(operator_kwargs))
            if not why:
                self._build_server(operator_kwargs)
            if why and strategy == "stacked":
                raise ValueError(f"strategy='stacked' cannot be used: {why}")
            reason = ("requested" if strategy == "stacked" else
                      f"auto: rule ({why})" if why else "auto: rule (stacked applies)")
            if not why:
                u = self._units
                route.update(strategy="stacked", units=u.num_units, unit_size=u.unit_size,
                             groups=len(self._groups), unit_mb=self._unit_mb,
                             pooled_server=self._server is not None)
        route["reason"] = reason
        self.route = route

    # ---- the stacked strategy ---------------------------------------------------------------
    def _plan_stacked(self, kw: dict) -> str:
        """Lay out the units; return "" when the stacked strategy applies, else why not."""
        first, s = self.clients[0], self.space
        if not isinstance(first, UnitOperator):
            return f"{type(first).__name__} has no unit linearizations"
        if not first.route["cache"] or first.route.get("hvp") == "fwd-rev":
            return "uncached products were requested (cache=False or hvp='fwd-rev')"
        if couples_samples(s.model, s.mode):
            return ("BatchNorm in train mode normalizes with batch statistics, so a client's "
                    "samples cannot be split into units")
        act, p, elt = first.activations_per_sample(), s.dim, s.element_size
        m = plan_unit_size(self.client_sizes, act, p, kw.get("batch_size"))
        unit_mb = (4 * act * m + 3 * p) * elt / 2**20
        budget = first.cache_budget_mb
        if kw.get("cache", "auto") == "auto" and unit_mb > budget:
            return f"one unit's linearization (~{unit_mb:.0f} MB) exceeds cache_budget_mb"
        units = make_units([op.batches for op in self.clients], m, totals=self.client_sizes,
                           dtype=s.dtype)
        U = units.num_units
        step = U if kw.get("cache") is True else max(1, min(U, int(budget // unit_mb)))
        groups = [(a, min(a + step, U)) for a in range(0, U, step)]
        try:
            why = self._check_per_sample_mean(units)
        except (RuntimeError, TypeError, ValueError) as err:  # an op without a vmap rule, ...
            return f"the model or loss cannot be evaluated per unit under vmap ({err})"
        if why:
            return why
        self._units, self._groups, self._unit_mb = units, groups, unit_mb
        self._closures = [None] * len(groups)
        return ""

    def _agreed(self, why: str) -> str:
        """Under a process group every rank must take the same strategy (the server's
        operator is built collectively): the stacked one only if it applies on every rank."""
        if self.process_group is None:
            return why
        flag = all_reduce_sum(torch.tensor([1.0 if why else 0.0], dtype=torch.float64),
                              self.process_group)
        if why or float(flag) == 0.0:
            return why
        self._units, self._groups, self._closures = None, [], []
        return "it does not apply on every rank (the ranks' data differ)"

    def _build_server(self, kw: dict) -> None:
        """The server's operator on the pooled data when w_c = n_c/N (else its products come
        from a second pass over the units)."""
        total = sum(self.client_sizes)
        if all(abs(w - n / total) <= 1e-12 for w, n in zip(self.weights, self.client_sizes)):
            pooled = Batches(
                (cat_inputs([x for op in self.clients for x in op.batches.inputs]),),
                (torch.cat([y for op in self.clients for y in op.batches.targets]),))
            bs = kw.get("batch_size")
            data = pooled if bs is None else pooled_pairs(pooled, bs)
            self._server = self.clients[0].with_data(data)

    def _check_per_sample_mean(self, units: Units) -> str:
        """Where a client is cut or padded, its gradient from the units must equal its plain
        gradient (the loss must be a mean of per-sample losses)."""
        counts = torch.bincount(units.owner, minlength=len(self.clients)).tolist()
        cut = [c for c, (u, n) in enumerate(zip(counts, self.client_sizes))
               if u > 1 or n < units.unit_size]
        if not cut:
            return ""
        c = max(cut, key=lambda i: (counts[i], -self.client_sizes[i]))
        rows = (units.owner == c).nonzero()[:, 0]
        part = units.slice(int(rows[0]), int(rows[-1]) + 1)
        g_units = self.clients[0].units_gradient(*part.args()).sum(0)
        g = self.clients[c].gradient(reduce=False)  # this rank's share, like the units
        tol = 1e-10 if self.dtype == torch.float64 else 1e-4
        diff = float((g_units - g).norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny))
        if diff > tol:
            return (f"loss_fn is not a mean of per-sample losses: client {c}'s gradient from "
                    f"padded units differs from its plain gradient by {diff:.1e} (relative)")
        return ""

    def _unit_products(self, i: int, R: Tensor) -> Tensor:
        if self._closures[i] is None:
            a, b = self._groups[i]
            self._closures[i] = self.clients[0].unit_linearization(*self._units.slice(a, b).args())
        return self._closures[i](R)

    def _matmat_stacked(self, V: Tensor) -> Tensor:
        J, p, k = V.shape
        out = torch.zeros(J, p, k, dtype=self.dtype, device=self.device)
        owner = self._units.owner
        w = torch.tensor(self.weights, dtype=self.dtype, device=self.device)
        for j in range(k):
            R = V[:-1, :, j].contiguous()
            for i, (a, b) in enumerate(self._groups):
                idx = owner[a:b]
                out[:-1, :, j].index_add_(0, idx, self._unit_products(i, R.index_select(0, idx)))
                if self._server is None:
                    hv = self._unit_products(i, V[-1, :, j].expand(b - a, -1).contiguous())
                    out[-1, :, j] += w.index_select(0, idx) @ hv
        if self._server is not None:
            out[-1] = self._server.apply_rows(self.space.rows(V[-1]), reduce=False).T
        return out

    def _matmat_clients(self, V: Tensor) -> Tensor:
        J, p, k = V.shape
        out = torch.empty(J, p, k, dtype=self.dtype, device=self.device)
        if not self.clients[0].additive:  # own tangents; the combined server operator
            for c, op in enumerate(self.clients):
                out[c] = op.apply_rows(V[c].T.contiguous(), reduce=False).T
            out[-1] = self._server.apply_rows(V[-1].T.contiguous(), reduce=False).T
            return out
        server = None
        for c, op in enumerate(self.clients):
            # own and server tangents; this rank's share (one all-reduce of the stack follows)
            hv = op.apply_rows(torch.cat([V[c].T, V[-1].T], dim=0), reduce=False)
            out[c] = hv[:k].T
            server = hv[k:].mul_(self.weights[c]) if server is None else server.add_(
                hv[k:], alpha=self.weights[c])
        out[-1] = server.T
        return out

    # ---- operator protocol ------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self.route["strategy"]

    @property
    def strategy_reason(self) -> str:
        return self.route["reason"]

    @property
    def curvature(self) -> str:
        return self.route["curvature"]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self.space.dim
        return (self.num_clients + 1, p, p)

    @property
    def subject_names(self) -> list[str]:
        return [f"client{c}" for c in range(self.num_clients)] + ["server"]

    def matmat(self, V: Tensor) -> Tensor:
        """V (K+1, p, k) → (K+1, p, k): clients' own products and the server's weighted sum."""
        J, p, _ = self.shape
        if V.ndim != 3 or V.shape[0] != J or V.shape[1] != p:
            raise ValueError(f"expected V of shape ({J}, {p}, k), got {tuple(V.shape)}")
        V = V.to(dtype=self.dtype, device=self.device)
        if self._units is None:
            out = self._matmat_clients(V)
        else:
            if not self._checked:
                first = self.clients[0]
                with first.context():
                    self.space.check_determinism(self.task, first.batches.inputs[0],
                                                 first.batches.targets[0])
            out = self._matmat_stacked(V)
        # distributed: one all-reduce of the whole (J, p, k) stack per block product
        check_finite_product(all_reduce_sum(out, self.process_group), self.curvature)
        self._checked = True
        self.num_matvecs += V.shape[2]
        return out


def pooled_pairs(pooled: Batches, batch_size: int) -> list[tuple]:
    """The pooled data re-cut into batches of ``batch_size``."""
    x, y = pooled.inputs[0], pooled.targets[0]
    return [(slice_inputs(x, a, a + batch_size), y[a:a + batch_size])
            for a in range(0, int(y.shape[0]), batch_size)]
