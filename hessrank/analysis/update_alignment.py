"""Alignment of recorded client *updates* (hypothesis (b) as FedLoRU frames it), with nulls.

Input everywhere: ``updates: dict[int, dict[str, Tensor]]`` — client id → parameter name →
Δ_c = (client's dense effective weights after local training) − (broadcast weights), as the
trainer records them in ``RUN/updates/round_{r:04d}.safetensors`` under keys
``"{client_id}/{param_name}"`` (:func:`load_client_updates`). Weight tensors with ≥ 2 dims are
viewed as matrices (conv: out × in·k·k); vectors are skipped.

Metrics per weight matrix, each next to a null baseline:

    rank-r alignment   D_r = A_r − A_∞, A_r the mean pairwise cosine of the rank-r truncations
                       [Δ_c]_r (as :mod:`hessrank.analysis.alignment` does for gradients), ±
                       leave-one-client-out jackknife. Null: every client's update rotated by
                       independent Haar orthogonal matrices on both sides, Q_c Δ_c P_c — the
                       same singular values, no shared directions.
    subspace overlap   for clients c ≠ c', the mean squared cosine of the principal angles
                       between their top-r left (or right) singular subspaces,
                       ‖U_cᵀ U_c'‖_F² / r ∈ [0, 1] (Björck & Golub 1973). Null: independent
                       uniformly random r-dim subspaces of R^m, mean exactly r/m.
    Hessian overlap    share of update energy in the span of k given orthonormal Hessian
                       eigenvectors E (p × k, flat in ``param_names`` order): ‖Eᵀ δ_c‖²/‖δ_c‖².
                       Null: a uniformly random direction in R^p, mean exactly k/p.

Each row carries the null's mean and SD over ``null_draws`` draws and z = (value − null
mean)/null SD (for D_r the jackknife stderr of the observed value is added in quadrature).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> shared = torch.randn(6, 1, generator=g) @ torch.randn(1, 5, generator=g)
    >>> ups = {c: {"w": shared + 0.1 * torch.randn(6, 5, generator=g)} for c in range(4)}
    >>> float(subspace_overlap(ups, ranks=(1,))["value"].iloc[0]) > 0.9
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hessrank.analysis.alignment import low_rank, matrix_view, pairwise_cosines
from hessrank.analysis.inference import jackknife, offdiag_mean_jackknife

__all__ = [
    "COLUMNS",
    "PAIR_COLUMNS",
    "hessian_overlap",
    "load_client_updates",
    "pair_differences",
    "principal_cosines",
    "random_orthogonal",
    "rank_alignment",
    "subspace_overlap",
    "update_alignment",
]

COLUMNS = ["metric", "layer", "rank", "value", "stderr", "null_mean", "null_sd", "z",
           "num_clients", "shape"]
"""Columns of every metric's table. ``rank``: truncation rank / subspace dim (0 = full)."""

PAIR_COLUMNS = ["layer", "rank", "client_a", "client_b", "value"]
"""Columns of :func:`pair_differences`: one row per (layer, rank, client pair a < b)."""

Updates = Mapping[int, Mapping[str, Tensor]]


def load_client_updates(run_dir: str | Path, round_idx: int) -> dict[int, dict[str, Tensor]]:
    """Read ``run_dir/updates/round_{round_idx:04d}.safetensors`` (keys "client/param")."""
    from safetensors.torch import load_file

    path = Path(run_dir) / "updates" / f"round_{int(round_idx):04d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded client updates at {path}; train with update "
                                "recording on")
    out: dict[int, dict[str, Tensor]] = {}
    for key, t in load_file(str(path)).items():
        cid, sep, name = key.partition("/")
        if not sep or not cid.isdigit():
            raise ValueError(f"{path}: key {key!r} is not 'client_id/param_name'")
        out.setdefault(int(cid), {})[name] = t
    return out


def _matrices(updates: Updates, layers: Sequence[str] | None) -> dict[str, list[Tensor]]:
    ids = sorted(updates)
    if len(ids) < 2:
        raise ValueError(f"update alignment needs >= 2 clients, got {len(ids)}")
    names = layers if layers is not None else [
        n for n, t in updates[ids[0]].items() if t.ndim >= 2]
    out = {}
    for n in names:
        missing = [c for c in ids if n not in updates[c]]
        if missing:
            raise ValueError(f"clients {missing} have no update of {n!r}")
        out[n] = [matrix_view(updates[c][n]).double() for c in ids]
    if not out:
        raise ValueError("the updates hold no weight matrices (tensors with >= 2 dims)")
    return out


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-distributed n×n orthogonal matrix (QR of a Gaussian, signs fixed by diag R)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def _row(metric, layer, rank, value, stderr, null, k, shape) -> dict:
    null = np.asarray(null, dtype=float)
    mean = float(null.mean()) if null.size else float("nan")
    sd = float(null.std(ddof=1)) if null.size > 1 else float("nan")
    spread = math.hypot(sd, stderr) if np.isfinite(stderr) else sd
    z = (value - mean) / spread if spread and np.isfinite(spread) and spread > 0 else float("nan")
    return {"metric": metric, "layer": layer, "rank": int(rank), "value": float(value),
            "stderr": float(stderr), "null_mean": mean, "null_sd": sd, "z": float(z),
            "num_clients": k, "shape": f"{shape[0]}x{shape[1]}"}


def _diff_alignment(mats: Sequence[Tensor], r: int) -> tuple[float, float]:
    D = pairwise_cosines([low_rank(G, r) for G in mats]) - pairwise_cosines(mats)
    return offdiag_mean_jackknife(D)


def rank_alignment(updates: Updates, ranks: Sequence[int] = (1, 2, 4, 8), *,
                   layers: Sequence[str] | None = None, null_draws: int = 20,
                   seed: int = 0) -> pd.DataFrame:
    """D_r = A_r − A_∞ of client updates per weight matrix and rank, against the rotation
    null (module doc). Ranks ≥ min(m, n) are skipped (the truncation is the identity)."""
    rows = []
    gen = torch.Generator().manual_seed(int(seed))
    for layer, mats in _matrices(updates, layers).items():
        m, n = mats[0].shape
        rotated = [[random_orthogonal(m, gen) @ G @ random_orthogonal(n, gen) for G in mats]
                   for _ in range(null_draws)]
        for r in ranks:
            if r >= min(m, n):
                continue
            value, se = _diff_alignment(mats, r)
            null = [_diff_alignment(rot, r)[0] for rot in rotated]
            rows.append(_row("rank-alignment", layer, r, value, se, null, len(mats), (m, n)))
    return pd.DataFrame(rows, columns=COLUMNS)


def pair_differences(updates: Updates, ranks: Sequence[int] = (1, 2, 4, 8), *,
                     layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Per weight matrix, rank r and client pair (a, b), a < b, the paired difference

        D_r(a, b) = cos([Δ_a]_r, [Δ_b]_r) − cos(Δ_a, Δ_b)

    whose mean over pairs is :func:`rank_alignment`'s D_r = A_r − A_∞ (the input of the
    study's ``alignment`` hypotheses). Ranks ≥ min(m, n) are skipped; pairs with a zero
    update (NaN cosine) are dropped."""
    rows = []
    ids = sorted(updates)
    for layer, mats in _matrices(updates, layers).items():
        full = pairwise_cosines(mats)
        iu = np.triu_indices(len(mats), k=1)
        for r in ranks:
            if r >= min(mats[0].shape):
                continue
            D = pairwise_cosines([low_rank(G, r) for G in mats]) - full
            for i, j in zip(*iu):
                if np.isfinite(D[i, j]):
                    rows.append({"layer": layer, "rank": int(r), "client_a": ids[i],
                                 "client_b": ids[j], "value": float(D[i, j])})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def principal_cosines(A: Tensor, B: Tensor) -> Tensor:
    """Cosines of the principal angles between span(A) and span(B) (columns), descending:
    the singular values of Q_Aᵀ Q_B."""
    QA, _ = torch.linalg.qr(A.double())
    QB, _ = torch.linalg.qr(B.double())
    return torch.linalg.svdvals(QA.T @ QB).clamp(max=1.0)


def _top(G: Tensor, r: int, side: str) -> Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :r] if side == "left" else Vh[:r].T


def _mean_pair_overlap(bases: Sequence[Tensor], r: int) -> np.ndarray:
    K = len(bases)
    O = np.full((K, K), np.nan)
    for i in range(K):
        for j in range(i + 1, K):
            O[i, j] = O[j, i] = float((principal_cosines(bases[i], bases[j]) ** 2).sum()) / r
    return O


def subspace_overlap(updates: Updates, ranks: Sequence[int] = (1, 2, 4, 8), *,
                     side: str = "left", layers: Sequence[str] | None = None,
                     null_draws: int = 20, seed: int = 0) -> pd.DataFrame:
    """Mean over client pairs of ‖U_cᵀU_c'‖_F²/r for the top-r singular subspaces of their
    updates (``side`` "left": column space, out-dim; "right": row space, in-dim), ± client
    jackknife, against random r-dim subspaces (null mean exactly r/dim)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, got {side!r}")
    rows = []
    gen = torch.Generator().manual_seed(int(seed))
    for layer, mats in _matrices(updates, layers).items():
        m, n = mats[0].shape
        dim = m if side == "left" else n
        for r in ranks:
            if r >= min(m, n):
                continue
            value, se = offdiag_mean_jackknife(
                _mean_pair_overlap([_top(G, r, side) for G in mats], r))
            null = []
            for _ in range(null_draws):
                rand = [torch.randn(dim, r, generator=gen, dtype=torch.float64)
                        for _ in mats]
                null.append(offdiag_mean_jackknife(_mean_pair_overlap(rand, r))[0])
            rows.append(_row(f"subspace-overlap-{side}", layer, r, value, se, null, len(mats),
                             (m, n)))
    return pd.DataFrame(rows, columns=COLUMNS)


def hessian_overlap(updates: Updates, eigenvectors: Tensor, param_names: Sequence[str], *,
                    null_draws: int = 200, seed: int = 0) -> pd.DataFrame:
    """Share of each client's update energy in span(E), E (p × k) orthonormal Hessian
    eigenvectors flat over ``param_names`` (in that order): mean over clients ± client
    jackknife, against uniformly random directions (null mean k/p)."""
    E = eigenvectors.double()
    if E.ndim != 2:
        raise ValueError(f"eigenvectors must be a (p, k) matrix, got shape {tuple(E.shape)}")
    p, k = E.shape
    shares = []
    for c in sorted(updates):
        try:
            u = torch.cat([updates[c][n].reshape(-1).double() for n in param_names])
        except KeyError as err:
            raise ValueError(f"client {c} has no update of {err.args[0]!r}") from None
        if u.numel() != p:
            raise ValueError(f"the updates of {list(param_names)} have {u.numel()} entries, "
                             f"the eigenvectors {p}")
        shares.append(float((E.T @ u).square().sum() / u.square().sum()))
    value, se = jackknife(np.array(shares))
    gen = torch.Generator().manual_seed(int(seed))
    g = torch.randn(null_draws, len(shares), p, generator=gen, dtype=torch.float64)
    null = ((g @ E).square().sum(-1) / g.square().sum(-1)).mean(-1).numpy()
    return pd.DataFrame([_row("hessian-overlap", ",".join(param_names), k, value, se, null,
                              len(shares), (p, k))], columns=COLUMNS)


def update_alignment(updates: Updates, ranks: Sequence[int] = (1, 2, 4, 8), *,
                     layers: Sequence[str] | None = None, null_draws: int = 20,
                     seed: int = 0) -> pd.DataFrame:
    """All matrix metrics of one round's updates in one table: rank alignment and left/right
    subspace overlap (Hessian overlap needs eigenvectors: :func:`hessian_overlap`)."""
    parts = [rank_alignment(updates, ranks, layers=layers, null_draws=null_draws, seed=seed),
             subspace_overlap(updates, ranks, side="left", layers=layers,
                              null_draws=null_draws, seed=seed + 1),
             subspace_overlap(updates, ranks, side="right", layers=layers,
                              null_draws=null_draws, seed=seed + 2)]
    return pd.concat(parts, ignore_index=True)
