"""Estimator families and quantities: the one registry behind ``--quantities`` (docs/design.md,
analysis).

A *family* is one estimator call on one unit of work; a *quantity* is a set of table rows one
family's result gives. Each :class:`Family` entry carries what every stage needs:

- the planner: :attr:`Family.settings` (the choices that determine its numbers; hashed into
  the ``settings`` column and the unit keys), :attr:`Family.per_group` (one unit per (round,
  subject group), or one per round over the clients) and :attr:`Family.products` (the
  progress estimate);
- the executor: :attr:`Family.estimate` (run on a unit's stacked operator; the result has
  ``rows()``, one dict per stacked operator) or :attr:`Family.per_round` (run on the model and
  the clients' data, rows directly), and :attr:`Family.densities` (the raw SLQ tridiagonals
  the store keeps);
- the command line: the names and :attr:`Quantity.help` texts (``hessrank analyze --help``).

The registry (the families, then the quantities, in help order):

    stable-rank   family "lanczos" (:func:`hessrank.linalg.stable_rank`): srank ± stderr, plus
                  the top-k stable rank Σ_{i≤k} θ_i²/θ_1² and the intrinsic dimension tr(H)/‖H‖₂
    top-eig       family "lanczos": the top Ritz values by magnitude, k = 1..10 (signed); the
                  stderr of k = 1 is the error bound from its Ritz residual
    trace         family "lanczos": tr(H)          frobenius   family "lanczos": ‖H‖_F²
    density       family "density" (SLQ): the entropy effective rank exp(−Σ q log q),
                  q = |λ|/Σ|λ|; the raw tridiagonals go to the store
    alignment     family "alignment": mean pairwise cosine of client gradients per weight
                  matrix and truncation rank (:mod:`hessrank.analysis.alignment`)

One family runs once per unit however many of its quantities are asked for. Adding a family
or a quantity is one entry here (and, for a new estimator, its function in ``linalg``).

This module imports only the standard library at module level, so ``hessrank analyze
--help`` can list the quantities without importing torch; the estimator calls import their
numerics when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.analysis.settings import AnalysisSettings

__all__ = [
    "FAMILIES",
    "QUANTITIES",
    "Family",
    "Quantity",
    "estimate",
    "families_of",
    "parse_quantities",
    "quantity_rows",
    "table_quantities",
]

K_TOP = 10
"""Top eigenvalues kept per operator (top-eig rows, top-k stable rank)."""

Row = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """An estimator family: one call per unit of work (module docstring).

    name: the family's name (the ``family`` of a settings hash).
    help: one line for the documentation.
    settings: ``settings(s)`` → the dict of everything that determines the family's numbers
        under :class:`~hessrank.analysis.settings.AnalysisSettings` ``s`` (hashed).
    products: ``products(s, J)`` → estimated products for a stack of J operators.
    estimate: ``estimate(op, s, seed)`` → a result with ``rows()`` (operator families).
    per_round: ``per_round(model, task, client_data, s)`` → rows with quantity, k, layer,
        value, stderr, matvecs (families computed once per round over the clients).
    densities: ``densities(result)`` → per stacked operator (alpha, beta, dim, matvecs, seed)
        of the SLQ tridiagonals the store keeps, or None.
    """

    name: str
    help: str
    settings: Callable[[AnalysisSettings], dict[str, Any]]
    products: Callable[[AnalysisSettings, int], int]
    estimate: Callable[[Any, AnalysisSettings, int], Any] | None = None
    per_round: Callable[..., list[Row]] | None = None
    densities: Callable[[Any], list[tuple[Any, Any, int, int, int]]] | None = None

    @property
    def per_group(self) -> bool:
        """One unit per (round, subject group) on a stacked operator (else one per round)."""
        return self.per_round is None


@dataclass(frozen=True)
class Quantity:
    """A quantity of ``--quantities``: its estimator family, its help text and its rows from
    one ``rows()`` entry (a dict of the estimator result for one stacked operator)."""

    name: str
    family: str
    help: str
    rows: Callable[[Row], list[Row]]
    produces: tuple[str, ...] = ()
    """Names in the table's ``quantity`` column (default: ``name``)."""

    def __post_init__(self) -> None:
        if not self.produces:
            object.__setattr__(self, "produces", (self.name,))


# ---- the families ---------------------------------------------------------------------------
def _common(s: AnalysisSettings) -> dict[str, Any]:
    return {"seed": s.seed, "probe_streams": "per-round-group",
            "params": list(s.params) if s.params else None,
            "batch_size": s.batch_size, "dtype": s.dtype, "mode": s.mode}


def _lanczos_settings(s: AnalysisSettings) -> dict[str, Any]:
    return {**_common(s), "family": "lanczos", "curvature": s.curvature,
            "matvecs": s.matvecs, "rtol": s.rtol,
            "max_matvecs": s.max_matvecs if s.rtol is not None else None}


def _lanczos(op: Any, s: AnalysisSettings, seed: int) -> Any:
    from hessrank.linalg import stable_rank  # numerics when a unit runs: keeps --help fast

    if s.rtol is None:
        return stable_rank(op, num_matvecs=s.matvecs, seed=seed, k_top=K_TOP)
    # a target error: products until the estimate is predicted to be within rtol in 90 % of
    # runs, at most max_matvecs (the fixed budget ``matvecs`` does not apply)
    return stable_rank(op, rtol=s.rtol, max_matvecs=s.max_matvecs, seed=seed, k_top=K_TOP)


def _density_settings(s: AnalysisSettings) -> dict[str, Any]:
    return {**_common(s), "family": "density", "curvature": s.curvature,
            "probes": s.density_probes, "steps": s.density_steps or s.matvecs}


@dataclass(frozen=True)
class DensityEstimate:
    """An SLQ density with its entropy effective rank, as rows like the linalg results'."""

    density: Any  # hessrank.linalg.DensityResult
    effective_rank: Any
    effective_rank_stderr: Any

    def rows(self) -> list[Row]:
        return [{"effective_rank": float(v), "effective_rank_stderr": float(s),
                 "num_matvecs": self.density.num_matvecs, "seed": self.density.seed}
                for v, s in zip(self.effective_rank, self.effective_rank_stderr)]


def _density(op: Any, s: AnalysisSettings, seed: int) -> DensityEstimate:
    from hessrank.linalg import spectral_density  # numerics when a unit runs: keeps --help fast

    d = spectral_density(op, num_probes=s.density_probes,
                         lanczos_steps=s.density_steps or s.matvecs, seed=seed)
    return DensityEstimate(d, *d.effective_rank())


def _density_tridiagonals(res: DensityEstimate) -> list[tuple[Any, Any, int, int, int]]:
    import numpy as np  # only when a unit runs: keeps --help fast

    d = res.density
    return [(np.asarray(d.alpha[j]), np.asarray(d.beta[j]), d.dim, d.num_matvecs, d.seed)
            for j in range(len(d.alpha))]


def _alignment_settings(s: AnalysisSettings) -> dict[str, Any]:
    ranks = [0 if r is None else r for r in s.alignment_ranks]
    return {**_common(s), "family": "alignment", "ranks": ranks}


def _alignment(model: Any, task: Any, client_data: Any, s: AnalysisSettings) -> list[Row]:
    # the alignment metrics import torch: loaded when a unit runs, which keeps --help fast
    from hessrank.analysis.alignment import gradient_alignment
    from hessrank.curvature.params import select_params

    layers = None
    if s.params:
        named = dict(model.named_parameters())
        layers = [n for n in select_params(model, s.params) if named[n].ndim >= 2]
    table = gradient_alignment(model, task, client_data, ranks=list(s.alignment_ranks),
                               layers=layers, mode=s.mode, batch_size=s.batch_size)
    return [{"quantity": "alignment", "k": int(t.rank), "layer": str(t.layer),
             "value": float(t.value), "stderr": float(t.stderr), "matvecs": 0}
            for t in table.itertuples()]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lanczos", "one Lanczos run plus residual probes per stacked operator "
           "(hessrank.linalg.stable_rank)", _lanczos_settings,
           lambda s, J: J * s.matvecs, estimate=_lanczos),
    Family("density", "stochastic Lanczos quadrature (hessrank.linalg.spectral_density)",
           _density_settings, lambda s, J: J * s.density_probes * (s.density_steps or s.matvecs),
           estimate=_density, densities=_density_tridiagonals),
    Family("alignment", "client-gradient alignment per weight matrix and truncation rank",
           _alignment_settings, lambda s, J: 1, per_round=_alignment),
)}
"""The estimator families, in the order their units are planned within a round."""


# ---- the quantities -------------------------------------------------------------------------
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
    Quantity("stable-rank", "lanczos", "‖H‖_F²/‖H‖₂² ± stderr, with the top-k stable rank "
             "and the intrinsic dimension tr(H)/‖H‖₂", _stable_rank_rows,
             ("stable-rank", "top-k-stable-rank", "intrinsic-dimension")),
    Quantity("top-eig", "lanczos", f"the top {K_TOP} eigenvalues by magnitude", _top_eig_rows),
    Quantity("trace", "lanczos", "tr(H) ± stderr",
             lambda r: [_r("trace", r["trace"], r["trace_stderr"], r["num_matvecs"])]),
    Quantity("frobenius", "lanczos", "‖H‖_F² ± stderr",
             lambda r: [_r("frobenius", r["frobenius_sq"], r["frobenius_sq_stderr"],
                           r["num_matvecs"])]),
    Quantity("density", "density", "SLQ spectral density: its entropy effective rank in "
             "the table, its tridiagonals in the store",
             lambda r: [_r("effective-rank", r["effective_rank"], r["effective_rank_stderr"],
                           r["num_matvecs"])], ("effective-rank",)),
    Quantity("alignment", "alignment", "mean pairwise cosine of client gradients, rank-r "
             "truncated vs full", lambda r: []),  # rows come from Family.per_round
)}
"""The quantities, in the order they are listed in help texts."""


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


def families_of(quantities: Sequence[str]) -> list[Family]:
    """The families the quantities need, in registry order."""
    wanted = {QUANTITIES[q].family for q in quantities}
    return [f for name, f in FAMILIES.items() if name in wanted]


def table_quantities(quantities: Sequence[str]) -> set[str]:
    """Values of the table's ``quantity`` column that ``quantities`` select."""
    return {name for q in quantities for name in QUANTITIES[q].produces}


def quantity_rows(names: Sequence[str], result: Any) -> list[list[Row]]:
    """Per stacked operator j, the rows of ``names`` from ``result.rows()[j]``."""
    qs = [QUANTITIES[n] for n in names]
    return [[row for q in qs for row in q.rows(entry)] for entry in result.rows()]


def estimate(family: str, op: Any, settings: AnalysisSettings, seed: int) -> Any:
    """Run operator family ``family`` on a stacked operator; the result has ``rows()``."""
    f = FAMILIES[family]
    if f.estimate is None:
        raise ValueError(f"family {family!r} has no operator estimator")
    return f.estimate(op, settings, seed)
