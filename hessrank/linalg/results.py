"""Frozen result records: a value, its error bar, diagnostics and the matvecs spent.

Arrays carry one entry per stacked operator (leading axis J). ``rows()`` flattens a result into
one dict per stacked operator for tidy tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from torch import Tensor


def _f(x) -> float:
    return float(x)


def _at(x, j):
    """Entry j of a per-operator array, as plain Python; None stays None."""
    if x is None:
        return None
    v = np.asarray(x)[j]
    return v.item() if isinstance(v, np.generic) else v


def _diagnostics(r, j: int) -> dict:
    """The error-bar diagnostics every estimate carries (t quantile, precision target)."""
    dof = _at(r.dof, j)
    return {
        "dof": None if dof is None else _f(dof),
        "quantile": None if r.quantile is None else _f(_at(r.quantile, j)),
        "num_probes": None if r.num_probes is None else int(_at(r.num_probes, j)),
        "rtol": r.rtol,
        "reached_rtol": None if r.reached_rtol is None else bool(_at(r.reached_rtol, j)),
    }


class _ToDict:
    """``to_dict()``: every field as plain Python (arrays to nested lists, tensors dropped)."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                continue
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


@dataclass(frozen=True)
class EigenResult(_ToDict):
    """Ritz pairs from Lanczos.

    eigenvalues: (J, k) Ritz values ordered by ``which``.
    eigenvectors: (J, p, k) Ritz vectors, or None if not requested.
    residual_norms: (J, k) ‖H s − θ s‖ = β_m |e_mᵀ y| for each Ritz pair.
    converged: (J, k) residual ≤ tol · max |θ|.
    """

    eigenvalues: np.ndarray
    residual_norms: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    seed: int
    which: str
    eigenvectors: Tensor | None = field(default=None, repr=False)

    def rows(self) -> list[dict]:
        return [
            {
                "eigenvalues": self.eigenvalues[j].tolist(),
                "residual_norms": self.residual_norms[j].tolist(),
                "converged": bool(self.converged[j].all()),
                "num_matvecs": self.num_matvecs,
                "seed": self.seed,
            }
            for j in range(self.eigenvalues.shape[0])
        ]


@dataclass(frozen=True)
class TraceResult(_ToDict):
    """A trace-like scalar per stacked operator (tr(H), ‖H‖_F² = tr(H²), ...).

    value, stderr: (J,). ``stderr`` is the sample standard error of the stochastic part widened
    by quantile / 2, quantile = t_{0.9875}(dof), so that value ± 2·stderr is the Student-t 97.5%
    interval for ``dof`` degrees of freedom (probes − 1): with a handful of probes the normal
    quantile is too narrow. It is floored by a bound on the probe variance where a few probes
    can miss outliers (hessrank.linalg.sampling, .deflated). 0 where the estimate is exact.
    dof, quantile: (J,) degrees of freedom and t_{0.9875}(dof) (NaN where no error bar).
    rtol: the precision target the estimator spent products for (None: fixed budget);
    reached_rtol: (J,) whether the predicted 90 % error quantile ≤ rtol was reached within
        the budget.
    num_probes: (J,) probes behind the stochastic part (0 where exact).
    """

    value: np.ndarray
    stderr: np.ndarray
    num_matvecs: int
    seed: int
    method: str
    dof: np.ndarray | None = None
    quantile: np.ndarray | None = None
    num_probes: np.ndarray | None = None
    rtol: float | None = None
    reached_rtol: np.ndarray | None = None

    def rows(self) -> list[dict]:
        return [
            {"value": _f(v), "stderr": _f(s), "num_matvecs": self.num_matvecs, "seed": self.seed,
             "method": self.method, **_diagnostics(self, j)}
            for j, (v, s) in enumerate(zip(self.value, self.stderr))
        ]


@dataclass(frozen=True)
class StableRankResult(_ToDict):
    """srank(H) = ‖H‖_F² / ‖H‖₂² with its ingredients and relatives.

    value, stderr: (J,) stable rank and its delta-method error bar
        sqrt((σ_F/λ²)² + (2F σ_λ/λ³)²), with σ_F the t-widened stderr of ‖H‖_F² (see
        :class:`TraceResult`) and σ_λ the spectral-norm error below.
    spectral_norm, spectral_norm_error: (J,) max |θ| over Ritz values and its residual bound
        r = β_m|e_mᵀ s| (some eigenvalue lies within r of θ), floored at the round-off
        eps·max|θ|·sqrt(p) of the operator's dtype.
    frobenius_sq, frobenius_sq_stderr: (J,) Krylov-deflated estimate of ‖H‖_F².
    trace, trace_stderr: (J,) Krylov-deflated estimate of tr(H), from the same products.
    top_eigenvalues: (J, k) Ritz values by decreasing magnitude, k = min(k_top, most Lanczos
        steps); NaN for an operator of a stack that took fewer steps than k.
    top_k_stable_rank: (J,) Σ_{i≤k} θ_i² / θ_1² — a lower bound on the stable rank.
    intrinsic_dimension: (J,) tr(H) / ‖H‖₂ (meaningful for PSD curvature).
    lanczos_steps, num_probes: (J,) how each operator's budget was split (chosen adaptively
        from the Frobenius mass the Krylov space captured, unless ``num_probes`` was given).
    dof, quantile: (J,) degrees of freedom of the probe part and t_{0.9875}(dof).
    rtol, reached_rtol: the target relative error (None: fixed budget) and whether the
        predicted 90 % error quantile ≤ rtol was reached within ``max_matvecs``.
    """

    value: np.ndarray
    stderr: np.ndarray
    spectral_norm: np.ndarray
    spectral_norm_error: np.ndarray
    frobenius_sq: np.ndarray
    frobenius_sq_stderr: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray
    top_eigenvalues: np.ndarray
    top_k_stable_rank: np.ndarray
    intrinsic_dimension: np.ndarray
    num_matvecs: int
    seed: int
    lanczos_steps: np.ndarray | None = None
    num_probes: np.ndarray | None = None
    dof: np.ndarray | None = None
    quantile: np.ndarray | None = None
    rtol: float | None = None
    reached_rtol: np.ndarray | None = None

    def rows(self) -> list[dict]:
        out = []
        for j in range(self.value.shape[0]):
            out.append(
                {
                    "stable_rank": _f(self.value[j]),
                    "stable_rank_stderr": _f(self.stderr[j]),
                    "spectral_norm": _f(self.spectral_norm[j]),
                    "spectral_norm_error": _f(self.spectral_norm_error[j]),
                    "frobenius_sq": _f(self.frobenius_sq[j]),
                    "frobenius_sq_stderr": _f(self.frobenius_sq_stderr[j]),
                    "trace": _f(self.trace[j]),
                    "trace_stderr": _f(self.trace_stderr[j]),
                    "top_k_stable_rank": _f(self.top_k_stable_rank[j]),
                    "intrinsic_dimension": _f(self.intrinsic_dimension[j]),
                    "top_eigenvalues": self.top_eigenvalues[j].tolist(),
                    "num_matvecs": self.num_matvecs,
                    "seed": self.seed,
                    "lanczos_steps": None if self.lanczos_steps is None
                    else int(self.lanczos_steps[j]),
                    **_diagnostics(self, j),
                }
            )
        return out


@dataclass(frozen=True)
class DiagonalResult(_ToDict):
    """diag(H) per stacked operator.

    value, stderr: (J, p) estimate of each diagonal entry and its standard error (widened by
    t_{0.9875}(dof) / 2 like :class:`TraceResult`).
    dof, quantile: (J,) degrees of freedom of the per-entry error bar and t_{0.9875}(dof).
    """

    value: np.ndarray
    stderr: np.ndarray
    num_matvecs: int
    seed: int
    method: str
    dof: np.ndarray | None = None
    quantile: np.ndarray | None = None

    def rows(self) -> list[dict]:
        """One row per stacked operator with summaries (the full vectors are in ``value``)."""
        return [
            {"diagonal_sum": _f(np.sum(self.value[j])),
             "diagonal_mean_stderr": _f(np.sqrt(np.mean(self.stderr[j] ** 2))),
             "num_matvecs": self.num_matvecs, "seed": self.seed, "method": self.method,
             "dof": None if self.dof is None else _f(_at(self.dof, j)),
             "quantile": None if self.quantile is None else _f(_at(self.quantile, j))}
            for j in range(self.value.shape[0])
        ]
