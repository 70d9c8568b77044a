"""Stable rank ‖H‖_F²/‖H‖₂² and relatives, with error bars (DESIGN.md §1, §4).

One Lanczos run supplies ‖H‖₂ (max |θ|, with a residual-based error bound), the top
eigenvalues, and the Krylov part of ‖H‖_F² and tr(H); a few residual probes finish both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.lanczos import ritz, spectral_norm_error
from hessrank.linalg.operator import Operator
from hessrank.linalg.results import StableRankResult
from hessrank.linalg.trace import deflated_estimate


def stable_rank_with_error(
    frobenius_sq: np.ndarray,
    frobenius_sq_stderr: np.ndarray,
    spectral_norm: np.ndarray,
    spectral_norm_error: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """srank = F / λ² and its delta-method error sqrt((σ_F/λ²)² + (2F σ_λ/λ³)²)."""
    F, lam = np.asarray(frobenius_sq, float), np.asarray(spectral_norm, float)
    value = F / lam**2
    err = np.sqrt((frobenius_sq_stderr / lam**2) ** 2 + (2 * F * spectral_norm_error / lam**3) ** 2)
    return value, err


def stable_rank(
    op: Operator | Tensor,
    *,
    num_matvecs: int = 40,
    seed: int = 0,
    num_probes: int | None = None,
    k_top: int = 10,
) -> StableRankResult:
    """srank(H) = ‖H‖_F² / ‖H‖₂² for each stacked symmetric operator.

    Spends m = num_matvecs − s Lanczos steps and s residual probes (s defaults to a quarter of the
    budget). ‖H‖₂ = max |θ| over the Ritz values — a lower bound that converges fast for the
    outliers of a Hessian; ‖H‖_F² is the Krylov-deflated estimate (exact on the Krylov space,
    sampled on its complement). Also reports tr(H), the top-k stable rank Σ_{i≤k} θ_i²/θ_1²
    (a lower bound that papers often compute from a handful of eigenvalues) and the intrinsic
    dimension tr(H)/‖H‖₂.

    Args:
        op: operator (J, p, p) or a dense symmetric tensor.
        num_matvecs: total products per stacked operator (≥ 4).
        seed: seeds every random draw.
        num_probes: residual probes (default max(2, num_matvecs/4)).
        k_top: how many top eigenvalues to keep and use for the top-k stable rank.
    Returns:
        :class:`StableRankResult` with error bars (delta method) and the matvecs spent.
    """
    if k_top < 1:
        raise ValueError(f"k_top must be >= 1, got {k_top}")
    if num_matvecs < 4:
        raise ValueError(
            f"stable_rank needs num_matvecs >= 4 (Lanczos steps plus 2 residual probes), "
            f"got {num_matvecs}"
        )
    est = deflated_estimate(op, num_matvecs=num_matvecs, seed=seed, num_probes=num_probes)
    theta, _, resid = ritz(est.krylov)
    theta, resid = theta[:, 0].numpy(), resid[:, 0].numpy()  # (J, m)
    order = np.argsort(-np.abs(theta), axis=1)
    top = np.take_along_axis(theta, order, axis=1)[:, :k_top]
    lam = np.abs(top[:, 0])
    lam_err = spectral_norm_error(theta, resid)
    if np.any(lam == 0):
        raise ValueError("the operator is zero on the Krylov space: the stable rank is undefined")
    value, err = stable_rank_with_error(est.frobenius_sq, est.frobenius_sq_stderr, lam, lam_err)
    topk = np.sum(top**2, axis=1) / lam**2
    return StableRankResult(
        value=value,
        stderr=err,
        spectral_norm=lam,
        spectral_norm_error=lam_err,
        frobenius_sq=est.frobenius_sq,
        frobenius_sq_stderr=est.frobenius_sq_stderr,
        trace=est.trace,
        trace_stderr=est.trace_stderr,
        top_eigenvalues=top,
        top_k_stable_rank=topk,
        intrinsic_dimension=est.trace / lam,
        num_matvecs=est.num_matvecs,
        seed=int(seed),
    )


def exact_stable_rank(matrix: Tensor) -> float:
    """‖A‖_F² / ‖A‖₂² of a dense symmetric matrix, by its eigenvalues (for tests and truth)."""
    lam = torch.linalg.eigvalsh(matrix.double())
    return float(lam.pow(2).sum() / lam.abs().max().pow(2))
