"""Quantity → estimator → rows: the registry behind ``--quantities`` (docs/design.md §6).

Each quantity names the estimator *family* that computes it and turns one entry of that
estimator result's own ``rows()`` (one dict per stacked operator) into table rows
(quantity, k, value, stderr, matvecs):

    stable-rank   family "lanczos" (:func:`hessrank.linalg.stable_rank`): srank ± stderr, plus
                  the top-k stable rank Σ_{i≤k} θ_i²/θ_1² and the intrinsic dimension tr(H)/‖H‖₂
    top-eig       family "lanczos": the top Ritz values by magnitude, k = 1..10 (signed); the
                  stderr of k = 1 is the error bound from its Ritz residual
    trace         family "lanczos": tr(H)          frobenius   family "lanczos": ‖H‖_F²
    density       family "density" (SLQ): the entropy effective rank exp(−Σ q log q),
                  q = |λ|/Σ|λ|; the raw tridiagonals go to the store
    alignment     family "alignment": mean pairwise cosine of client gradients per weight
                  matrix and truncation rank (:mod:`hessrank.analysis.alignment`)

One family runs once per unit however many of its quantities are asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hessrank.linalg import DensityResult, spectral_density, stable_rank

__all__ = [
    "FAMILIES",
    "QUANTITIES",
    "DensityEstimate",
    "Quantity",
    "estimate",
    "parse_quantities",
    "quantity_rows",
]

K_TOP = 10
"""Top eigenvalues kept per operator (top-eig rows, top-k stable rank)."""

Row = dict[str, Any]


@dataclass(frozen=True)
class Quantity:
    """A quantity of ``--quantities``: its estimator family and its rows from one ``rows()``
    entry (a dict of the estimator result for one stacked operator)."""

    name: str
    family: str
    rows: Callable[[Row], list[Row]]
    produces: tuple[str, ...] = ()
    """Names in the table's ``quantity`` column (default: ``name``)."""

    def __post_init__(self) -> None:
        if not self.produces:
            object.__setattr__(self, "produces", (self.name,))


def _r(quantity: str, value: Any, stderr: Any, matvecs: Any, k: int = 0) -> Row:
    return {"quantity": quantity, "k": int(k), "value": float(value), "stderr": float(stderr),
            "matvecs": int(matvecs)}


def _stable_rank_rows(r: Row) -> list[Row]:
    n, nan = r["num_matvecs"], float("nan")
    return [_r("stable-rank", r["stable_rank"], r["stable_rank_stderr"], n),
            _r("top-k-stable-rank", r["top_k_stable_rank"], nan, n, k=len(r["top_eigenvalues"])),
            _r("intrinsic-dimension", r["intrinsic_dimension"], nan, n)]


def _top_eig_rows(r: Row) -> list[Row]:
    nan = float("nan")
    return [_r("top-eig", lam, r["spectral_norm_error"] if i == 0 else nan, r["num_matvecs"],
               k=i + 1) for i, lam in enumerate(r["top_eigenvalues"])]


QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("stable-rank", "lanczos", _stable_rank_rows,
             ("stable-rank", "top-k-stable-rank", "intrinsic-dimension")),
    Quantity("top-eig", "lanczos", _top_eig_rows),
    Quantity("trace", "lanczos",
             lambda r: [_r("trace", r["trace"], r["trace_stderr"], r["num_matvecs"])]),
    Quantity("frobenius", "lanczos",
             lambda r: [_r("frobenius", r["frobenius_sq"], r["frobenius_sq_stderr"],
                           r["num_matvecs"])]),
    Quantity("density", "density",
             lambda r: [_r("effective-rank", r["effective_rank"], r["effective_rank_stderr"],
                           r["num_matvecs"])], ("effective-rank",)),
    Quantity("alignment", "alignment", lambda r: []),  # rows come from the alignment table
)}
"""The registry, in the order quantities are listed in help texts."""

FAMILIES = ("lanczos", "density", "alignment")


def parse_quantities(spec: str | Sequence[str]) -> list[str]:
    """Quantity names from "stable-rank,top-eig" or a sequence; ValueError on unknown ones."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [q.strip() for q in items if q.strip()]
    valid = ", ".join(QUANTITIES)
    if not names:
        raise ValueError(f"no quantities given; valid quantities: {valid}")
    for q in names:
        if q not in QUANTITIES:
            raise ValueError(f"unknown quantity {q!r}; valid quantities: {valid}")
    return list(dict.fromkeys(names))


def quantity_rows(names: Sequence[str], result: Any) -> list[list[Row]]:
    """Per stacked operator j, the rows of ``names`` from ``result.rows()[j]``."""
    qs = [QUANTITIES[n] for n in names]
    return [[row for q in qs for row in q.rows(entry)] for entry in result.rows()]


@dataclass(frozen=True)
class DensityEstimate:
    """An SLQ density with its entropy effective rank, as rows like the linalg results'."""

    density: DensityResult
    effective_rank: np.ndarray
    effective_rank_stderr: np.ndarray

    @classmethod
    def of(cls, density: DensityResult) -> DensityEstimate:
        erank, se = density.effective_rank()
        return cls(density, erank, se)

    def rows(self) -> list[Row]:
        return [{"effective_rank": float(v), "effective_rank_stderr": float(s),
                 "num_matvecs": self.density.num_matvecs, "seed": self.density.seed}
                for v, s in zip(self.effective_rank, self.effective_rank_stderr)]


def estimate(family: str, op: Any, *, matvecs: int, seed: int, rtol: float | None = None,
             max_matvecs: int = 400, density_probes: int = 4,
             density_steps: int | None = None) -> Any:
    """Run one estimator family on a stacked operator; the result has ``rows()``."""
    if family == "lanczos":
        if rtol is None:
            return stable_rank(op, num_matvecs=matvecs, seed=seed, k_top=K_TOP)
        # a precision target: products until the relative stderr is below rtol, at most
        # max_matvecs (the fixed budget ``matvecs`` does not apply)
        return stable_rank(op, rtol=rtol, max_matvecs=max_matvecs, seed=seed, k_top=K_TOP)
    if family == "density":
        return DensityEstimate.of(spectral_density(
            op, num_probes=density_probes, lanczos_steps=density_steps or matvecs, seed=seed))
    raise ValueError(f"family {family!r} has no operator estimator")
