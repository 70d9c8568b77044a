"""FederatedHessian: every client's Hessian and the server's, stacked as one (K+1, p, p) operator.

With client losses L_c (mean over client c's n_c samples) and weights w_c (default n_c/N), the
server loss is L = Σ_c w_c L_c, so H = Σ_c w_c H_c exactly. One pass over client c's data
pushes *both* client c's own tangents and the server's tangents through one block product —
the primal work (and with caching, the linearization) is shared and the data is read once:

    out[c] = H_c V[c],   out[K] = Σ_c w_c H_c V[K].

Estimators run on it unchanged and advance the K + 1 recurrences in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from hessrank.curvature.operator import HessianOperator, LossFn


class FederatedHessian:
    """Stacked operator of J = K + 1 Hessians: clients 0..K−1, then the server (index K).

    Args:
        model: the global model at the weights under study.
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``.
        client_data: one ``data`` argument per client (pair or iterable of batches).
        weights: w_c for the server loss (default n_c / N; must be ≥ 0 and sum to 1).
        **operator_kwargs: passed to each client's :class:`HessianOperator` (params, mode,
            hvp, block, cache, batch_size, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        client_data: Sequence[Iterable | tuple[Tensor, Tensor]],
        weights: Sequence[float] | None = None,
        **operator_kwargs,
    ) -> None:
        if len(client_data) == 0:
            raise ValueError("client_data is empty: need at least one client")
        self.clients: list[HessianOperator] = []
        for c, data in enumerate(client_data):
            try:
                self.clients.append(HessianOperator(model, loss_fn, data, **operator_kwargs))
            except ValueError as err:
                raise ValueError(f"client {c}: {err}") from err
        sizes = [op.num_samples for op in self.clients]
        if weights is None:
            total = sum(sizes)
            weights = [n / total for n in sizes]
        w = [float(x) for x in weights]
        if len(w) != len(self.clients):
            raise ValueError(f"got {len(w)} weights for {len(self.clients)} clients")
        if min(w) < 0 or abs(sum(w) - 1.0) > 1e-9:
            raise ValueError(f"weights must be >= 0 and sum to 1, got sum {sum(w):.6g}")
        self.weights = w
        self.client_sizes = sizes
        first = self.clients[0]
        for op in self.clients[1:]:
            # one private module twin and one parameter copy for all clients (same weights)
            op.model, op._needs_mode = first.model, first._needs_mode
            op._params, op._fixed = first._params, first._fixed
        self.param_names = first.param_names
        self._ready = False
        self.num_matvecs = 0

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self.clients[0].shape[1]
        return (self.num_clients + 1, p, p)

    @property
    def dtype(self) -> torch.dtype:
        return self.clients[0].dtype

    @property
    def device(self) -> torch.device:
        return self.clients[0].device

    @property
    def subject_names(self) -> list[str]:
        return [f"client{c}" for c in range(self.num_clients)] + ["server"]

    def _prepare(self, k: int) -> None:
        """Settle every client's product strategy once: client 0 decides the "auto" hvp and
        block choice (one calibration, not K), each client still decides its own cache."""
        if self._ready:
            return
        first = self.clients[0]
        first._prepare(k)
        for op in self.clients[1:]:
            if op._hvp == "auto":
                op._hvp = first._hvp
            if op._block == "auto":
                op._block = first._block
            op._prepare(k)
        self._ready = True

    def matmat(self, V: Tensor) -> Tensor:
        """V (K+1, p, k) → (K+1, p, k): clients' own products and the server's weighted sum."""
        J, p, _ = self.shape
        if V.ndim != 3 or V.shape[0] != J or V.shape[1] != p:
            raise ValueError(f"expected V of shape ({J}, {p}, k), got {tuple(V.shape)}")
        k = V.shape[2]
        self._prepare(2 * k)
        V = V.to(dtype=self.dtype, device=self.device)
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
        self.num_matvecs += k
        return out
