"""FederatedHessian: every client's Hessian and the server's, stacked as one (K+1, p, p) operator.

With client losses L_c (mean over client c's n_c samples) and weights w_c (default n_c/N), the
server loss is L = Σ_c w_c L_c, so H = Σ_c w_c H_c exactly. A product of the stack is

    out[c] = H_c V[c],   out[K] = Σ_c w_c H_c V[K],

computed from the clients' data (the server's data is their union). Two strategies
(``strategy=``):

- "stacked": all clients at once as equal-size padded units with their own parameter copies
  (:mod:`hessrank.curvature.stacked`): one kept linearization for all clients, and the clients'
  products are one batched tangent pass over the N samples, whatever K is. The server's
  products come from a kept linearization of the pooled data when w_c = n_c/N (the server loss
  is then the pooled mean: one plain tangent pass, faster than a batched one), else from a
  second pass over the units. Needs samples that do not interact (no BatchNorm in train
  mode), a per-sample-mean loss and memory for the linearizations (two when pooled).
- "per-client": one :class:`HessianOperator` per client; one pass over client c's data pushes
  both its own tangents and the server's as a block of 2k (the data is read once per product,
  never pooled). K calls per product: on small clients each call is dominated by fixed
  per-call costs.

"auto" keeps "per-client" unless "stacked" applies, fits ``cache_budget_mb`` and times at
least 10 % faster per product (:meth:`FederatedHessian.choose_strategy`; the stacked products
use batched matrix products that run slower per sample than one big product, so they win
only where the K small calls are dominated by per-call costs — ``docs/performance.md``).
``strategy_reason`` says what decided.
Estimators run on the stack unchanged and advance the K + 1 recurrences in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from hessrank.curvature.data import Batches, as_batches
from hessrank.curvature.operator import HessianOperator, LossFn
from hessrank.curvature.stacked import (
    StackedClientHessians,
    couples_samples,
    make_units,
    plan_unit_size,
)

_STRATEGIES = ("auto", "stacked", "per-client")
_STRATEGY_CHOICE: dict[tuple, tuple[str, str]] = {}


class _NotFinite(ValueError):
    """A client's loss is NaN/inf: bad data, reported as such (never a reason to fall back)."""


class FederatedHessian:
    """Stacked operator of J = K + 1 Hessians: clients 0..K−1, then the server (index K).

    Args:
        model: the global model at the weights under study.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``.
        client_data: one ``data`` argument per client (pair or iterable of batches).
        weights: w_c for the server loss (default n_c / N; must be ≥ 0 and sum to 1).
        strategy: "auto", "stacked" or "per-client" (module docstring).
        **operator_kwargs: as for :class:`HessianOperator` (params, mode, hvp, block, cache,
            batch_size, cache_budget_mb, check_determinism). With "stacked", ``batch_size``
            caps the unit size and ``cache_budget_mb`` the kept linearizations; hvp="fwd-rev"
            or cache=False ask for uncached products, which only "per-client" has.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        client_data: Sequence[Iterable | tuple[Tensor, Tensor]],
        weights: Sequence[float] | None = None,
        *,
        strategy: str = "auto",
        **operator_kwargs,
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if len(client_data) == 0:
            raise ValueError("client_data is empty: need at least one client")
        # the first client's operator validates the model, params and mode, owns the private
        # module twin and the parameter copy that every client shares (same weights)
        try:
            first = HessianOperator(model, loss_fn, client_data[0], **operator_kwargs)
        except ValueError as err:
            raise ValueError(f"client 0: {err}") from err
        self._first = first
        batches = [first.batches]
        for c, data in enumerate(client_data[1:], start=1):
            try:
                batches.append(as_batches(data, dtype=first.dtype, device=first.device,
                                          batch_size=operator_kwargs.get("batch_size")))
            except (ValueError, TypeError) as err:
                raise type(err)(f"client {c}: {err}") from err
        sizes = [b.num_samples for b in batches]
        if weights is None:
            total = sum(sizes)
            weights = [n / total for n in sizes]
        w = [float(x) for x in weights]
        if len(w) != len(batches):
            raise ValueError(f"got {len(w)} weights for {len(batches)} clients")
        if min(w) < 0 or abs(sum(w) - 1.0) > 1e-9:
            raise ValueError(f"weights must be >= 0 and sum to 1, got sum {sum(w):.6g}")
        self.weights = w
        self.client_sizes = sizes
        self.param_names = first.param_names
        self.loss_fn = loss_fn
        self.num_matvecs = 0
        self._ready = False
        self.clients: list[HessianOperator] = []
        self._stacked: StackedClientHessians | None = None
        self._server: HessianOperator | None = None  # stacked + size weights: pooled server
        self.strategy, self.strategy_reason = "per-client", ""
        self._model, self._client_data, self._kwargs = model, client_data, operator_kwargs
        if strategy == "per-client":
            self.strategy_reason = "requested"
        else:
            reason = self._try_stacked(batches, operator_kwargs)
            if reason and strategy == "stacked":
                raise ValueError(f"strategy='stacked' cannot be used: {reason}")
            if reason:
                self.strategy_reason = f"auto: {reason}"
            elif strategy == "stacked":
                self.strategy, self.strategy_reason = "stacked", "requested"
            else:
                self.choose_strategy()
        if self.strategy == "per-client":
            self._build_clients()

    # ---- strategy ----------------------------------------------------------------------------
    def _try_stacked(self, batches: list[Batches], kw: dict) -> str:
        """Set up the stacked products; return "" on success or why they do not apply."""
        first = self._first
        if kw.get("cache", "auto") is False or kw.get("hvp", "auto") == "fwd-rev":
            return "uncached products were requested (cache=False or hvp='fwd-rev')"
        if couples_samples(first.model, first.mode):
            return ("BatchNorm in train mode normalizes with batch statistics, so a client's "
                    "samples cannot be split into units")
        elt = first.element_size
        act, p = first.activations_per_sample(), first.shape[1]
        m = plan_unit_size(self.client_sizes, act, p, kw.get("batch_size"))
        units = make_units(batches, m)
        unit_mb = (4 * act * m + 3 * p) * elt / 2**20
        budget = float(kw.get("cache_budget_mb", 2048.0))
        if kw.get("cache", "auto") == "auto" and unit_mb > budget:
            return f"one unit's linearization (~{unit_mb:.0f} MB) exceeds cache_budget_mb"
        max_units = None if kw.get("cache") is True else max(1, int(budget // unit_mb))
        stacked = StackedClientHessians(first.model, self.loss_fn, first._params, first._fixed,
                                        units, len(batches), max_units=max_units,
                                        unit_mb=unit_mb)
        try:
            reason = self._check_stacked(stacked, batches)
        except _NotFinite:
            raise
        except (RuntimeError, TypeError, ValueError) as err:  # an op without a vmap rule, ...
            return f"the model or loss cannot be evaluated per unit under vmap ({err})"
        if reason:
            return reason
        self._stacked = stacked
        dev, dt = first.device, first.dtype
        self._weights_t = torch.tensor(self.weights, dtype=dt, device=dev)
        total = sum(self.client_sizes)
        if all(abs(w - n / total) <= 1e-12 for w, n in zip(self.weights, self.client_sizes)):
            # size weights: the server loss is the pooled mean, whose own linearization gives
            # H V[K] in one plain (unbatched) tangent pass, faster than one over the units
            pooled = (torch.cat([x for b in batches for x in b.inputs]),
                      torch.cat([y for b in batches for y in b.targets]))  # re-cut by batch_size
            server = HessianOperator(self._model, self.loss_fn, pooled,
                                     **{**kw, "check_determinism": False})
            self._share_weights(server)
            self._server = server
        return ""

    def _share_weights(self, op: HessianOperator) -> None:
        """Point ``op`` at the first client's module twin and parameter copy (same weights)."""
        first = self._first
        op.model, op._needs_mode = first.model, first._needs_mode
        op._params, op._fixed = first._params, first._fixed

    def _check_stacked(self, stacked: StackedClientHessians, batches: list[Batches]) -> str:
        """Finite loss on every client, and — where a client is cut or padded — its gradient
        from the units equal to a plain gradient (the loss must be a per-sample mean)."""
        first, units = self._first, stacked.units
        with torch.no_grad(), first._mode():
            losses = torch.func.vmap(stacked._unit_loss)(
                {n: t.expand(units.num_units, *t.shape) for n, t in first._params.items()},
                units.inputs, units.targets, units.keep, units.scale)
        bad = ~torch.isfinite(losses)
        if bad.any():
            c = int(units.owner[bad.nonzero()[0, 0]])
            raise _NotFinite(
                f"client {c}: the loss is not finite (weights are finite): check that client's "
                "inputs/targets and the model's numerics")
        counts = torch.bincount(units.owner, minlength=len(batches)).tolist()
        cut = [c for c, (u, n) in enumerate(zip(counts, self.client_sizes))
               if u > 1 or n < units.unit_size]
        if not cut:
            return ""
        c = max(cut, key=lambda i: (counts[i], -self.client_sizes[i]))
        rows = (units.owner == c).nonzero()[:, 0]
        a, b = int(rows[0]), int(rows[-1]) + 1
        with first._mode():
            g_units = stacked.unit_gradients(a, b)
            g_units = torch.cat([g_units[n].sum(0).reshape(-1) for n in first.param_names])
            g = first.gradient_on(torch.cat(batches[c].inputs), torch.cat(batches[c].targets))
        tol = 1e-10 if first.dtype == torch.float64 else 1e-4
        diff = float((g_units - g).norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny))
        if diff > tol:
            return (f"loss_fn is not a mean of per-sample losses: client {c}'s gradient from "
                    f"padded units differs from its plain gradient by {diff:.1e} (relative)")
        return ""

    def choose_strategy(self, repeats: int = 5, margin: float = 0.1) -> str:
        """Time a product of the stack both ways and keep the faster ("auto").

        Rule, as for :meth:`HessianOperator.calibrate`: "per-client" is the default and
        "stacked" the challenger; after one warm-up product each (which builds the kept
        linearizations), both are timed in interleaved rounds until each has ``repeats``
        timings and 0.25 s in total (at most 25 rounds), each judged by its fastest round, and
        "stacked" wins only when that is ≥ ``margin`` (10 %) below the default's. Nothing is
        timed when one per-client product takes over 5 s (compute-bound: per-call costs, the
        thing stacking saves, are negligible there; the timing would cost ≥ 50 s). The choice
        is remembered per (model class, parameter shapes, client sizes, input shape, dtype,
        mode), so the checkpoints of a trajectory are timed once. The losing route's
        linearizations are dropped (both are held while timing).
        """
        first = self._first
        key = (type(first.model).__name__, tuple(first._shapes), tuple(self.client_sizes),
               tuple(first.batches.inputs[0].shape[1:]), first.dtype, first.mode)
        if key in _STRATEGY_CHOICE:
            self.strategy, why = _STRATEGY_CHOICE[key]
            self.strategy_reason = f"{why} (remembered)"
        else:
            self._build_clients()
            self._prepare_clients(2)
            J, p, _ = self.shape
            gen = torch.Generator().manual_seed(0)
            V = torch.randn(J, p, 1, generator=gen, dtype=torch.float64).to(self.dtype)
            routes = {"per-client": self._matmat_clients, "stacked": self._matmat_stacked}
            t0 = time.perf_counter()
            routes["per-client"](V)
            routes["stacked"](V)  # warm-ups, building both routes' linearizations
            t1 = time.perf_counter()
            routes["per-client"](V)
            once = time.perf_counter() - t1
            if once > 5.0:
                best, why = "per-client", f"auto: one product takes {once:.1f} s, not timed"
            else:
                times: dict[str, list[float]] = {r: [] for r in routes}
                for r in range(25):
                    for name in (("per-client", "stacked") if r % 2 else ("stacked",
                                                                          "per-client")):
                        t0 = time.perf_counter()
                        routes[name](V)
                        times[name].append(time.perf_counter() - t0)
                    if r + 1 >= repeats and min(sum(t) for t in times.values()) >= 0.25:
                        break
                low = {name: min(t) for name, t in times.items()}
                best = "stacked" if low["stacked"] <= (1 - margin) * low["per-client"] else (
                    "per-client")
                why = (f"auto: timed {1e3 * low['stacked']:.1f} ms stacked vs "
                       f"{1e3 * low['per-client']:.1f} ms per-client per product")
            _STRATEGY_CHOICE[key] = (best, why)
            self.strategy, self.strategy_reason = best, why
        if self.strategy == "stacked":
            self.clients = [first]  # drop the other clients' operators and linearizations
        else:
            self._stacked = self._server = None
        return self.strategy

    def _build_clients(self) -> None:
        if len(self.clients) == self.num_clients:
            return
        first, kw = self._first, self._kwargs
        self.clients = [first]
        for c, data in enumerate(self._client_data[1:], start=1):
            try:
                op = HessianOperator(self._model, self.loss_fn, data, **kw)
            except ValueError as err:
                raise ValueError(f"client {c}: {err}") from err
            self._share_weights(op)
            self.clients.append(op)

    # ---- operator protocol -------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self._first.shape[1]
        return (self.num_clients + 1, p, p)

    @property
    def dtype(self) -> torch.dtype:
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def subject_names(self) -> list[str]:
        return [f"client{c}" for c in range(self.num_clients)] + ["server"]

    @property
    def settings(self) -> dict[str, object]:
        """The strategy in use and, per client, the product settings (after calibration)."""
        if self._stacked is not None:
            s = self._stacked
            return {"strategy": "stacked", "units": s.units.num_units,
                    "unit_size": s.units.unit_size, "groups": len(s.groups),
                    "mode": self._first.mode}
        return {"strategy": "per-client", **self._first.settings}

    def _prepare(self, k: int) -> None:
        """Settle the product strategy once. Stacked: the determinism check. Per-client:
        client 0 decides the "auto" hvp and block choice (one calibration, not K), each client
        still decides its own cache."""
        if self._ready:
            return
        first = self._first
        if self._stacked is not None:
            if first._check_determinism and not first._ready:  # (a timed choice ran it)
                first._determinism_check()
        else:
            self._prepare_clients(k)
        self._ready = True

    def _prepare_clients(self, k: int) -> None:
        first = self._first
        first._prepare(k)
        for op in self.clients[1:]:
            if op._hvp == "auto":
                op._hvp = first._hvp
            if op._block == "auto":
                op._block = first._block
            op._prepare(k)

    def matmat(self, V: Tensor) -> Tensor:
        """V (K+1, p, k) → (K+1, p, k): clients' own products and the server's weighted sum."""
        J, p, _ = self.shape
        if V.ndim != 3 or V.shape[0] != J or V.shape[1] != p:
            raise ValueError(f"expected V of shape ({J}, {p}, k), got {tuple(V.shape)}")
        k = V.shape[2]
        self._prepare(2 * k)
        V = V.to(dtype=self.dtype, device=self.device)
        out = self._matmat_stacked(V) if self._stacked is not None else self._matmat_clients(V)
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise FloatingPointError(
                "a Hessian-vector product has NaN/inf entries; the loss is not twice "
                "differentiable at these weights or overflows in this dtype"
            )
        self.num_matvecs += k
        return out

    def _matmat_stacked(self, V: Tensor) -> Tensor:
        s, J, k = self._stacked, V.shape[0], V.shape[2]
        out = torch.empty(J, V.shape[1], k, dtype=self.dtype, device=self.device)
        with self._first._mode():
            for j in range(k):
                out[:-1, :, j] = s.apply(V[:-1, :, j].contiguous())
                if self._server is None:
                    out[-1, :, j] = s.apply_shared(V[-1, :, j], self._weights_t)
        if self._server is not None:
            out[-1] = self._server.apply_block(V[-1])
        return out

    def _matmat_clients(self, V: Tensor) -> Tensor:
        J, p, k = V.shape
        out = torch.empty(J, p, k, dtype=self.dtype, device=self.device)
        server = None
        for c, op in enumerate(self.clients):
            rows = torch.cat([V[c].T, V[-1].T], dim=0)  # (2k, p): own and server tangents
            hv = op._apply_rows(rows)  # one data pass over client c
            op.num_matvecs += 2 * k
            out[c] = hv[:k].T
            if server is None:
                server = hv[k:].mul_(self.weights[c])
            else:
                server.add_(hv[k:], alpha=self.weights[c])
        out[-1] = server.T
        return out
