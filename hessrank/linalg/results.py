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

    value, stderr: (J,); stderr is the sample standard error of the stochastic part (0 where the
    estimate is exact, NaN where fewer than two samples were drawn).
    """

    value: np.ndarray
    stderr: np.ndarray
    num_matvecs: int
    seed: int
    method: str

    def rows(self) -> list[dict]:
        return [
            {"value": _f(v), "stderr": _f(s), "num_matvecs": self.num_matvecs, "seed": self.seed,
             "method": self.method}
            for v, s in zip(self.value, self.stderr)
        ]


@dataclass(frozen=True)
class StableRankResult(_ToDict):
    """srank(H) = ‖H‖_F² / ‖H‖₂² with its ingredients and relatives.

    value, stderr: (J,) stable rank and its delta-method error bar.
    spectral_norm, spectral_norm_error: (J,) max |θ| over Ritz values and its error bound
        min(r, r²/gap) from the Ritz residual r.
    frobenius_sq, frobenius_sq_stderr: (J,) Krylov-deflated estimate of ‖H‖_F².
    trace, trace_stderr: (J,) Krylov-deflated estimate of tr(H), from the same products.
    top_eigenvalues: (J, k) Ritz values by decreasing magnitude.
    top_k_stable_rank: (J,) Σ_{i≤k} θ_i² / θ_1² — a lower bound on the stable rank.
    intrinsic_dimension: (J,) tr(H) / ‖H‖₂ (meaningful for PSD curvature).
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
                }
            )
        return out
