"""Replicate-aware planning: variance components from a pilot, replicates × units for a power.

The replicate statistic of :mod:`hessrank.analysis.inference` (d_i = mean over arm a's units −
mean over arm b's, or the mean of one arm) has, with n_a and n_b units per replicate,

    Var(d_i) = σ_b² + σ_a²/n_a + σ_b,arm²/n_b

where σ_b² is the variance *between* replicates (the part no number of units averages away)
and σ_a², σ_b,arm² are the variances between units *within* a replicate, per arm. From a pilot
or a finished study (:func:`variance_components`, method of moments):

    σ_arm² = pooled within-replicate variance of that arm's unit values
    σ_b²   = max(0, s_d² − mean_i(σ_a²/n_a,i + σ_b,arm²/n_b,i))      (s_d²: variance of the d_i)

Power. A row claims *supported* when the one-sided t-test of θ ≤ δ rejects at level α_row/2
(likewise reversed; negligible is the equivalence test). For a claim whose true effect lies δ
beyond its threshold (θ = 2δ for supported, −2δ for reversed, θ = 0 for negligible), with R
replicates, se = √(Var(d_i)/R) and t_c = t_{R−1}⁻¹(1 − level):

    directional   P = 1 − F_{nct}(t_c; R − 1, λ = δ/se)                  (noncentral t)
    equivalence   P = E_s[2Φ((δ − t_c s/√R)·√R/σ_d) − 1]₊,  s² ~ σ_d² χ²_{R−1}/(R − 1)

both exact for normal d_i. :func:`replicates_needed` is the smallest R with both ≥ the power
asked for, at the level of Holm's first step (:func:`claim_level`: α/K over the study's K
rows, each test at half of it) — the conservative end, as Holm's later steps are easier.
Checked against simulation in ``tests/analysis/test_planning.py``.

Example:
    >>> replicates_needed(replicate_variance=1.0, min_effect=1.0, level=0.025)
    13.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import integrate, stats

__all__ = [
    "PLAN_COLUMNS",
    "VarianceComponents",
    "claim_level",
    "plan",
    "power_directional",
    "power_equivalence",
    "replicates_needed",
    "variance_components",
]

MAX_REPLICATES = 100_000
"""The search for :func:`replicates_needed` stops here (returned as is: "more than this")."""

LARGE_DF = 2000
"""Beyond this many degrees of freedom the power formulas use their normal limits."""


@dataclass(frozen=True)
class VarianceComponents:
    """Variance components of one test's replicate statistic (module doc).

    between: σ_b² (NaN with one replicate).  within_a, within_b: the within-replicate
    variance of a unit value per arm (within_b NaN for one arm).  units_a, units_b: the mean
    number of units per replicate per arm.  n_replicates: R of the pilot.
    """

    between: float
    within_a: float
    within_b: float
    units_a: float
    units_b: float
    n_replicates: int

    def replicate_variance(self, units_a: float | None = None,
                           units_b: float | None = None) -> float:
        """Var(d_i) with the given units per replicate (default: the pilot's)."""
        na = self.units_a if units_a is None else float(units_a)
        nb = self.units_b if units_b is None else float(units_b)
        within = _ratio(self.within_a, na)
        if np.isfinite(self.units_b):
            within += _ratio(self.within_b, nb)
        return float(self.between + within)

    @property
    def icc(self) -> float:
        """Share of Var(d_i) at the pilot's units that lies between replicates."""
        total = self.replicate_variance()
        return float(self.between / total) if total > 0 else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _ratio(var: float, n: float) -> float:
    if np.isinf(n):
        return 0.0
    return float(var / n) if np.isfinite(var) else 0.0


def _pooled(groups: list[np.ndarray]) -> float:
    num = sum(float(np.var(g, ddof=1)) * (g.size - 1) for g in groups if g.size >= 2)
    den = sum(g.size - 1 for g in groups if g.size >= 2)
    return num / den if den > 0 else float("nan")


def variance_components(replicates: Sequence[tuple[np.ndarray, np.ndarray | None]]
                        ) -> VarianceComponents:
    """σ_b², σ_a², σ_b,arm² of one test from its replicates' unit values (module doc).

    ``replicates``: per replicate (arm a values, arm b values or None), as
    :func:`hessrank.analysis.inference.replicates_of` gives them.
    """
    reps = [(np.asarray(a, float), None if b is None else np.asarray(b, float))
            for a, b in replicates]
    if not reps:
        raise ValueError("variance components need at least one replicate")
    two = reps[0][1] is not None
    wa = _pooled([a for a, _ in reps])
    wb = _pooled([b for _, b in reps]) if two else float("nan")
    na = np.array([a.size for a, _ in reps], float)
    nb = np.array([b.size for _, b in reps], float) if two else np.array([np.nan])
    R = len(reps)
    between = float("nan")
    if R >= 2:
        d = np.array([a.mean() - (b.mean() if two else 0.0) for a, b in reps])
        noise = np.mean([_ratio(wa, x) for x in na])
        if two:
            noise += np.mean([_ratio(wb, x) for x in nb])
        between = max(0.0, float(d.var(ddof=1)) - float(noise))
    return VarianceComponents(between, wa, wb, float(na.mean()),
                              float(nb.mean()) if two else float("nan"), R)


def claim_level(alpha: float, num_tests: int) -> float:
    """One-sided level of each claim's test at Holm's first step: α / (2K)."""
    if num_tests < 1:
        raise ValueError(f"a family needs at least one test, got {num_tests}")
    return float(alpha) / (2 * int(num_tests))


def power_directional(replicate_variance: float, n_replicates: int, distance: float,
                      level: float) -> float:
    """P(one-sided t-test at ``level`` rejects) when θ lies ``distance`` beyond the null's
    boundary, with R replicates of variance ``replicate_variance`` (noncentral t)."""
    R = int(n_replicates)
    if R < 2:
        return float("nan")
    df = R - 1
    if replicate_variance <= 0:
        return 1.0
    lam = distance / math.sqrt(replicate_variance / R)
    if df > LARGE_DF:  # t → normal: the noncentral t is slow and no different here
        return float(stats.norm.sf(stats.norm.ppf(1 - level) - lam))
    return float(stats.nct.sf(stats.t.ppf(1 - level, df), df, lam))


def power_equivalence(replicate_variance: float, n_replicates: int, min_effect: float,
                      level: float) -> float:
    """P(TOST at ``level`` per side rejects |θ| ≥ δ) when θ = 0 (module doc's integral)."""
    R = int(n_replicates)
    if R < 2:
        return float("nan")
    if replicate_variance <= 0:
        return 1.0
    df = R - 1
    sd_mean = math.sqrt(replicate_variance / R)
    if df > LARGE_DF:  # s ≈ σ_d: the integral collapses to its normal limit
        margin = min_effect / sd_mean - stats.norm.ppf(1 - level)
        return float(max(0.0, 2 * stats.norm.cdf(margin) - 1))
    tc = stats.t.ppf(1 - level, df)
    # reject iff |θ̂| < δ − t_c·s/√R; with u = s/σ_d = √(v/df), v ~ χ²_df
    v_max = df * (min_effect / (tc * sd_mean)) ** 2

    log_norm = -(df / 2) * math.log(2) - math.lgamma(df / 2)

    def inner(v: float) -> float:  # plain math: quad calls it hundreds of times
        if v <= 0:
            return 0.0
        margin = (min_effect - tc * sd_mean * math.sqrt(v / df)) / sd_mean
        density = math.exp(log_norm + (df / 2 - 1) * math.log(v) - v / 2)  # χ²_df
        return math.erf(margin / math.sqrt(2)) * density  # 2Φ(m) − 1 = erf(m/√2)

    value, _ = integrate.quad(inner, 0.0, v_max, limit=200)
    return float(min(1.0, max(0.0, value)))


def replicates_needed(replicate_variance: float, min_effect: float, level: float,
                      power: float = 0.8) -> float:
    """Smallest R ≥ 2 at which both the directional claims (θ = ±2δ) and the equivalence
    claim (θ = 0) reach ``power`` at one-sided ``level`` (module doc); NaN when the variance
    is unknown, :data:`MAX_REPLICATES` when even that many do not suffice.

    The search starts from the normal approximation R ≈ Var·((z_{1−level} + z_q)/δ)²
    (q = (1 + power)/2, the equivalence test's need, which exceeds the directional one) and
    settles the exact t answer by bisection, a few evaluations whatever R is."""
    if not (np.isfinite(replicate_variance) and min_effect > 0):
        return float("nan")

    def enough(R: int) -> bool:
        return (power_directional(replicate_variance, R, min_effect, level) >= power
                and power_equivalence(replicate_variance, R, min_effect, level) >= power)

    z = stats.norm.ppf(1 - level) + stats.norm.ppf((1 + power) / 2)
    guess = replicate_variance * (z / min_effect) ** 2
    if guess >= MAX_REPLICATES:
        return float(MAX_REPLICATES)
    hi = max(2, math.ceil(guess))
    lo = 1  # enough(1) is False: R = 1 has no test
    while not enough(hi):  # the t quantile and the spread of s ask for more than the guess
        if hi >= MAX_REPLICATES:
            return float(MAX_REPLICATES)
        lo, hi = hi, min(MAX_REPLICATES, hi + max(2, hi // 4))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return float(hi)


PLAN_COLUMNS = [
    "hypothesis", "phase", "min_effect", "n_replicates", "units_a", "units_b", "between",
    "within_a", "within_b", "icc", "power_now", "units_factor", "replicates_needed",
]
"""Columns of :func:`plan`: one row per (hypothesis, phase, units_factor)."""


def plan(rows: Sequence[dict], components: Sequence[VarianceComponents], *, alpha: float,
         power: float = 0.8, units_factors: Sequence[float] = (1, 2, 4, math.inf)):
    """Replicates × units per replicate for ``power`` at δ under the study's multiplicity.

    ``rows``: per test a dict with hypothesis, phase and min_effect; ``components``: its
    :class:`VarianceComponents`. For each test and each factor f of ``units_factors`` (units
    per replicate = f × the pilot's; inf: unlimited), the replicates needed at Holm's
    first-step level (:func:`claim_level` with K = len(rows)); ``power_now`` is the power of
    the directional claims at the pilot's own R and units. Returns a DataFrame
    (:data:`PLAN_COLUMNS`).
    """
    import pandas as pd

    level = claim_level(alpha, len(rows))
    out = []
    for row, vc in zip(rows, components):
        delta = float(row["min_effect"])
        now = power_directional(vc.replicate_variance(), vc.n_replicates, delta, level)
        for f in units_factors:
            var = vc.replicate_variance(vc.units_a * f, vc.units_b * f)
            out.append({"hypothesis": row["hypothesis"], "phase": row["phase"],
                        "min_effect": delta, "n_replicates": vc.n_replicates,
                        "units_a": vc.units_a, "units_b": vc.units_b, "between": vc.between,
                        "within_a": vc.within_a, "within_b": vc.within_b, "icc": vc.icc,
                        "power_now": now, "units_factor": f,
                        "replicates_needed": replicates_needed(var, delta, level, power)})
    return pd.DataFrame(out, columns=PLAN_COLUMNS)
