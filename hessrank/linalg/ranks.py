"""Stable rank ‖H‖_F²/‖H‖₂² and relatives, with error bars (docs/design.md §1, §4).

One Lanczos run supplies ‖H‖₂ (max |θ|, with its residual bound), the top eigenvalues, and the
Krylov part of ‖H‖_F² and tr(H); residual probes finish both, the split chosen from the data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.deflated import deflated_estimate, spectral_norm_and_error
from hessrank.linalg.operator import Operator
from hessrank.linalg.results import StableRankResult


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
    num_matvecs: int | None = None,
    seed: int = 0,
    num_probes: int | None = None,
    k_top: int = 10,
    rtol: float | None = None,
    max_matvecs: int = 400,
) -> StableRankResult:
    """srank(H) = ‖H‖_F² / ‖H‖₂² for each stacked symmetric operator.

    One Lanczos run per operator and residual probes (hessrank.linalg.deflated): the split is
    chosen from the data — on a flat spectrum most products become probes, on outliers Lanczos
    runs until they are captured and ‖H‖₂ has converged. ‖H‖₂ = max |θ| over the Ritz values
    (a lower bound that converges fast for the outliers of a Hessian) with its residual bound;
    ‖H‖_F² is the Krylov-deflated estimate (exact on the Krylov space, sampled on its
    complement). Also reports tr(H), the top-k stable rank Σ_{i≤k} θ_i²/θ_1² (a lower bound
    that papers often compute from a handful of eigenvalues) and the intrinsic dimension
    tr(H)/‖H‖₂.

    Args:
        op: operator (J, p, p) or a dense symmetric tensor.
        num_matvecs: fixed budget per stacked operator (≥ 10; default 40 when no ``rtol``).
        seed: seeds every random draw.
        num_probes: fix the split instead: num_matvecs − num_probes Lanczos steps (≥ 2 probes).
        k_top: how many top eigenvalues to keep and use for the top-k stable rank.
        rtol: target relative error: spend products until the estimate is predicted to be
            within rtol of the truth in 90 % of runs (every operator; the sample standard
            error and the likely error of ‖H‖₂, :func:`~hessrank.linalg.deflated.error_quantile`),
            at most ``max_matvecs``; ``reached_rtol`` on the result says which made it. The
            reported ``stderr`` stays the conservative error bar (it can exceed rtol·value).
    Returns:
        :class:`StableRankResult` with error bars (delta method; the ‖H‖_F² part t-widened for
        its probe count) and the matvecs spent.

    Example:
        >>> A = torch.diag(torch.linspace(0.01, 1.0, 300, dtype=torch.float64))
        >>> r = stable_rank(A, rtol=0.05, max_matvecs=300, seed=0)
        >>> bool(r.reached_rtol[0]), bool(abs(r.value[0] / exact_stable_rank(A) - 1) < 0.05)
        (True, True)
    """
    if k_top < 1:
        raise ValueError(f"k_top must be >= 1, got {k_top}")
    if num_matvecs is None and rtol is None:
        num_matvecs = 40
    est = deflated_estimate(op, num_matvecs=num_matvecs, seed=seed, num_probes=num_probes,
                            rtol=rtol, max_matvecs=max_matvecs, target="stable_rank")
    run = est.lanczos
    J = len(est.frobenius_sq)
    lam, lam_err = np.zeros(J), np.zeros(J)
    top = np.full((J, min(k_top, int(est.lanczos_steps.max()))), np.nan)
    for j in range(J):
        theta, _ = run.ritz(j)
        lam[j], lam_err[j], _ = spectral_norm_and_error(run, j)
        t = theta[np.argsort(-np.abs(theta))][: top.shape[1]]
        top[j, : t.size] = t
    if np.any(lam == 0):
        raise ValueError("the operator is zero on the Krylov space: the stable rank is undefined")
    value, err = stable_rank_with_error(est.frobenius_sq, est.frobenius_sq_stderr, lam, lam_err)
    topk = np.nansum(top**2, axis=1) / lam**2
    reached = est.reached_rtol
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
        lanczos_steps=est.lanczos_steps,
        num_probes=est.num_probes,
        dof=est.dof,
        quantile=est.quantile,
        rtol=rtol,
        reached_rtol=reached,
    )


def exact_stable_rank(matrix: Tensor) -> float:
    """‖A‖_F² / ‖A‖₂² of a dense symmetric matrix, by its eigenvalues (for tests and truth)."""
    lam = torch.linalg.eigvalsh(matrix.double())
    return float(lam.pow(2).sum() / lam.abs().max().pow(2))
