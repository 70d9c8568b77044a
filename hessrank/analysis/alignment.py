"""Gradient alignment across clients, full and rank-r (hypothesis (b) of docs/design.md).

For a weight matrix W (a conv kernel viewed as out × (in·k·k)) and client gradients
G_c = ∇_W L_c(θ), the alignment at rank r is the mean pairwise cosine similarity

    A_r = (2 / (K(K−1))) Σ_{c<c'} ⟨[G_c]_r, [G_c']_r⟩_F / (‖[G_c]_r‖_F ‖[G_c']_r‖_F)

where [G]_r = U_r Σ_r V_rᵀ is the best rank-r approximation (truncated SVD; Eckart & Young
1936) and [G]_∞ = G. Hypothesis (b) says A_r > A_∞ for small r. The error bar is the
leave-one-client-out jackknife (clients are the independent units; pairs are not).

Example:
    >>> g = {"w": [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([3.0, -1.0]))]}
    >>> alignment_from_gradients(g, ranks=(1, None))["value"].round(6).tolist()
    [1.0, 0.8]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from hessrank.curvature import LossFn, ParameterSpace
from hessrank.curvature.data import as_batches

__all__ = [
    "alignment_from_gradients",
    "client_gradients",
    "gradient_alignment",
    "low_rank",
    "matrix_view",
    "pairwise_cosines",
]

COLUMNS = ["layer", "rank", "value", "stderr", "min", "max", "num_clients", "shape"]


def matrix_view(g: Tensor) -> Tensor:
    """A parameter-shaped tensor as a matrix: (out, rest) — conv (o, i, k, k) → (o, i·k·k)."""
    if g.ndim < 2:
        raise ValueError(f"a weight matrix needs >= 2 dimensions, got shape {tuple(g.shape)}")
    return g.reshape(g.shape[0], -1)


def low_rank(G: Tensor, r: int | None) -> Tensor:
    """Best rank-r approximation U_r Σ_r V_rᵀ of a matrix (r None or ≥ min(m, n): G itself)."""
    if r is None or r >= min(G.shape):
        return G
    if r < 1:
        raise ValueError(f"rank must be >= 1 or None (full), got {r}")
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(G.dtype)


def pairwise_cosines(mats: Sequence[Tensor]) -> np.ndarray:
    """K×K matrix of Frobenius cosine similarities (NaN where a matrix is zero)."""
    X = torch.stack([m.reshape(-1).double() for m in mats])
    norms = X.norm(dim=1)
    C = (X @ X.T) / (norms[:, None] * norms[None, :])
    C[norms == 0, :] = float("nan")
    C[:, norms == 0] = float("nan")
    return C.cpu().numpy()


def _mean_offdiag(C: np.ndarray, keep: np.ndarray) -> float:
    sub = C[np.ix_(keep, keep)]
    iu = np.triu_indices(sub.shape[0], k=1)
    return float(np.nanmean(sub[iu])) if iu[0].size else float("nan")


def _summary(C: np.ndarray) -> tuple[float, float, float, float]:
    """Mean pairwise cosine, its leave-one-client-out jackknife stderr, min and max."""
    K = C.shape[0]
    all_ = np.ones(K, dtype=bool)
    mean = _mean_offdiag(C, all_)
    iu = np.triu_indices(K, k=1)
    pairs = C[iu]
    lo = float(np.nanmin(pairs)) if pairs.size else float("nan")
    hi = float(np.nanmax(pairs)) if pairs.size else float("nan")
    if K < 3:
        return mean, float("nan"), lo, hi
    loo = np.array([_mean_offdiag(C, np.arange(K) != i) for i in range(K)])
    se = math.sqrt((K - 1) / K * float(np.sum((loo - loo.mean()) ** 2)))
    return mean, se, lo, hi


def alignment_from_gradients(
    grads: Mapping[str, Sequence[Tensor]], ranks: Iterable[int | None] = (1, 2, 4, 8, None)
) -> pd.DataFrame:
    """Alignment table from per-client gradient matrices.

    Args:
        grads: layer name → one gradient per client (any shape with ≥ 2 dims, see
            :func:`matrix_view`); at least two clients.
        ranks: truncation ranks; None means the full gradient.
    Returns:
        DataFrame with columns layer, rank (0 = full gradient), value (mean pairwise cosine),
        stderr (jackknife over clients; NaN for fewer than 3), min, max (over pairs),
        num_clients, shape (the matrix view "m×n"). Ranks above min(m, n) are kept and equal
        the full gradient.
    """
    ranks = list(ranks)
    rows = []
    for layer, gs in grads.items():
        if len(gs) < 2:
            raise ValueError(f"alignment needs >= 2 clients, layer {layer!r} has {len(gs)}")
        mats = [matrix_view(g) for g in gs]
        m, n = mats[0].shape
        for r in ranks:
            C = pairwise_cosines([low_rank(G, r) for G in mats])
            mean, se, lo, hi = _summary(C)
            rows.append({"layer": layer, "rank": 0 if r is None else int(r), "value": mean,
                         "stderr": se, "min": lo, "max": hi, "num_clients": len(gs),
                         "shape": f"{m}x{n}"})
    return pd.DataFrame(rows, columns=COLUMNS)


def client_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    client_data: Sequence,
    layers: Sequence[str] | None = None,
    *,
    mode: str = "eval",
    batch_size: int | None = None,
) -> dict[str, list[Tensor]]:
    """∇_W L_c(θ) for each client c and each selected weight (default: every ≥2-d parameter)."""
    named = dict(model.named_parameters())
    if layers is None:
        layers = [n for n, t in named.items() if t.ndim >= 2 and t.requires_grad]
        if not layers:
            raise ValueError("the model has no weight matrices (parameters with >= 2 dims)")
    else:
        layers = list(layers)
        matrices = [n for n, t in named.items() if t.ndim >= 2]
        for n in layers:
            if n not in named or named[n].ndim < 2:
                raise ValueError(
                    f"unknown weight matrix {n!r}; valid names: {', '.join(matrices)}"
                )
    out: dict[str, list[Tensor]] = {n: [] for n in layers}
    space = ParameterSpace(model, params=layers, mode=mode)
    for c, data in enumerate(client_data):
        try:
            batches = as_batches(data, dtype=space.dtype, device=space.device,
                                 batch_size=batch_size)
            space.check_losses(loss_fn, batches)
        except (ValueError, TypeError) as err:
            raise type(err)(f"client {c}: {err}") from err
        g = None
        for x, y, w in zip(batches.inputs, batches.targets, batches.weights):
            gb = space.gradient(loss_fn, x, y)
            g = gb.mul_(w) if g is None else g.add_(gb, alpha=w)
        for n, t in space.unflatten(g).items():
            out[n].append(t)
    return out


def gradient_alignment(
    model: nn.Module,
    loss_fn: LossFn,
    client_data: Sequence,
    ranks: Iterable[int | None] = (1, 2, 4, 8, None),
    layers: Sequence[str] | None = None,
    *,
    mode: str = "eval",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Per weight matrix and rank, the mean pairwise cosine of client gradients (module doc).

    Args:
        model: the global model at the weights under study.
        loss_fn: batch-mean loss.
        client_data: one (inputs, targets) pair (or iterable of batches) per client; ≥ 2.
        ranks: truncation ranks r (None: full gradient).
        layers: parameter names of weight matrices (default every parameter with ≥ 2 dims).
        mode: "eval" or "train" network mode.
        batch_size: split each client's data into batches (same gradient, less memory).
    Returns:
        See :func:`alignment_from_gradients`.
    """
    if len(client_data) < 2:
        raise ValueError(f"alignment needs >= 2 clients, got {len(client_data)}")
    grads = client_gradients(model, loss_fn, client_data, layers, mode=mode,
                             batch_size=batch_size)
    return alignment_from_gradients(grads, ranks)
