"""Inference at the right level: replicate statistics, minimum-effect and equivalence tests,
multiplicity, verdicts.

A *hypothesis* is a difference of means, estimated per training *phase* (docs/design.md §6):

    client − server          per client c: srank(H_c) − srank(H)            (paired, one arm)
    n_small − n_large        mean over draws of size n_s − mean over draws of size n_l
    aligned_r − aligned_full per layer: A_r − A_∞                           (paired, one arm)

Evidence is nested: replicates (independent training runs: seed, partition, probes) hold
*units* (clients, subset draws, layers), and a unit is seen at several rounds. Rounds of one
run are not independent, so within a phase each unit's rounds are averaged first. The
statistic of replicate i is

    d_i = mean_{u ∈ arm a} x̄_u − mean_{u ∈ arm b} x̄_u          (x̄_u: phase mean of unit u)

and the estimate is θ̂ = mean_i d_i (replicates weigh equally). The replicates are the
independent evidence, so the default (``method = "t"``, :func:`replicate_t`) is the t-test on
the d_i with R − 1 degrees of freedom: se = sd(d_i)/√R, exact p-values (no resampling floor).
It was chosen by measurement, not by name: ``experiments/benchmarks/bench_inference.py``
simulates studies with a replicate effect over replicate counts, unit counts and shares of
variance between replicates, and ``experiments/benchmarks/results/inference.md`` holds the
coverage and false-positive rate of every candidate in every cell. The alternatives stay
available: ``bootstrap-t`` (:func:`bootstrap_t`), ``percentile`` (:func:`cluster_bootstrap`,
the default before that measurement) and ``mixedlm`` (:func:`mixed_model`).

Verdicts (δ > 0: the minimum effect, stated in the spec before the run, in the units of the
difference after the transform). Three one-sided tests per row, each at α/2:

    supported     rejects H0: θ ≤ +δ                       (the effect exceeds δ)
    reversed      rejects H0: θ ≥ −δ                       (the effect is below −δ)
    negligible    TOST rejects H0: |θ| ≥ δ (both θ ≤ −δ and θ ≥ +δ rejected)
    inconclusive  none of them, after the multiplicity adjustment

Running each test at α/2 makes a row's verdict readable from one interval: supported iff its
(1 − α) interval lies above +δ, reversed iff below −δ, negligible iff inside (−δ, +δ); a
false verdict needs that interval to miss θ, so a row errs with probability ≤ α. The row's
p-value is twice the smallest of its three one-sided p-values (:class:`Claim`).

Multiplicity: the rows of one study (hypotheses × phases) form one family, adjusted by Holm
(family-wise error, default) or Benjamini–Hochberg (``statsmodels`` ``multipletests``); a
row gets its claim when its adjusted p-value is below α. Each row carries two intervals: the
marginal (1 − α) interval (``ci_low``, ``ci_high``) and the adjusted one, at the level the
procedure decided that row at (:func:`adjusted_levels`: α/(K − j + 1) at Holm's step j); the
verdict is read from the adjusted one.

Planning columns (:mod:`hessrank.analysis.planning`): replicates needed for 80 % power
from the observed between- and within-replicate variances.

Example:
    >>> rng = np.random.default_rng(0)
    >>> reps = [(rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 20)) for _ in range(6)]
    >>> r = replicate_t(reps)
    >>> r.n_replicates, r.df, bool(r.interval(0.95)[0] > 0)
    (6, 5.0, True)
    >>> verdict(r, min_effect=0.1)
    'supported'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from hessrank.analysis import planning

__all__ = [
    "ADJUSTMENTS",
    "COLUMN_DOCS",
    "HYPOTHESES_COLUMNS",
    "METHODS",
    "UNIT_COLUMNS",
    "VERDICTS",
    "Claim",
    "Inference",
    "Phase",
    "adjust_pvalues",
    "adjusted_levels",
    "alignment_units",
    "assign_phases",
    "bootstrap_t",
    "claim",
    "client_server_units",
    "client_vs_server_summary",
    "cluster_bootstrap",
    "decide",
    "default_phases",
    "infer_one",
    "jackknife",
    "mixed_model",
    "offdiag_mean_jackknife",
    "phase_unit_means",
    "phases_by_loss",
    "replicate_statistics",
    "replicate_t",
    "replicates_of",
    "subset_size_units",
    "test_hypotheses",
    "transform_values",
    "update_alignment_units",
    "verdict",
]

VERDICTS = ("supported", "reversed", "negligible", "inconclusive")

COLUMN_DOCS = {
    "hypothesis": "the hypothesis's name in the spec",
    "phase": "the training phase (its rounds: round_lo to round_hi)",
    "round_lo": "first analyzed round in the phase",
    "round_hi": "last analyzed round in the phase",
    "num_rounds": "analyzed rounds in the phase; each unit's rounds are averaged first "
                  "(rounds of one run are not independent evidence)",
    "n_replicates": "R, the replicates with data in every arm (independent training runs)",
    "n_units": "units (clients, subset draws, layers) summed over replicates and arms",
    "min_effect": "δ, the smallest effect that matters, fixed in the spec before the run "
                  "(in the units of the transformed difference)",
    "alpha": "the family's level: family-wise error (holm) or false discovery rate (bh)",
    "adjust": "the multiplicity adjustment over all rows of the study (holm or bh)",
    "method": "how θ and its uncertainty were estimated: t = t-test on the replicate "
              "statistics with R − 1 degrees of freedom (the default); bootstrap-t, "
              "percentile (two-stage cluster bootstrap), mixedlm (statsmodels MixedLM)",
    "sampling_unit": "replicate: the replicates are the sample (the verdict speaks for the "
                     "training recipe); unit: one replicate only, its units are the sample "
                     "(the verdict speaks for that one run)",
    "transform": "applied to each value before the difference (log: a difference of logs, "
                 "i.e. a log ratio)",
    "estimate": "θ̂, the mean over replicates of the replicate statistic d_i = mean(arm a) − "
                "mean(arm b) (or mean(arm a) for a paired difference)",
    "stderr": "standard error of θ̂ (t: sd(d_i)/√R)",
    "df": "degrees of freedom of the t reference (R − 1; inf: normal; empty: bootstrap)",
    "ci_low": "marginal (1 − alpha) interval, lower end (this row alone, no adjustment)",
    "ci_high": "marginal (1 − alpha) interval, upper end",
    "confidence_adjusted": "the confidence of the adjusted interval: 1 − the level at which "
                           "the multiplicity procedure decided this row (Holm: α/(K − j + 1) "
                           "at its step j of K; bh: α·r/K with r rejections)",
    "ci_low_adjusted": "adjusted interval, lower end: the verdict is read from it (above +δ: "
                       "supported; below −δ: reversed; inside ±δ: negligible)",
    "ci_high_adjusted": "adjusted interval, upper end",
    "p_supported": "one-sided p-value of H0: θ ≤ +δ (unadjusted)",
    "p_reversed": "one-sided p-value of H0: θ ≥ −δ (unadjusted)",
    "p_negligible": "equivalence (TOST) p-value of H0: |θ| ≥ δ, the larger of the two "
                    "one-sided p-values (unadjusted)",
    "p_value": "the row's p-value: twice the smallest of p_supported, p_reversed, "
               "p_negligible (each test runs at α/2), capped at 1",
    "p_adjusted": "p_value adjusted over all rows of the study (adjust); the row gets its "
                  "claim when p_adjusted < alpha",
    "verdict": "supported, reversed, negligible or inconclusive: the four verdicts",
    "replicates_needed": "replicates for 80 % power at this study's units per replicate, "
                         "from this row's between- and within-replicate variances, at "
                         "Holm's first-step level α/K (hessrank.analysis.planning); empty "
                         "with one replicate",
    "replicates_needed_unlimited_units": "the same with unlimited units per replicate (the "
                                         "between-replicate variance alone): no number of "
                                         "units per replicate brings the need below it",
}
"""Every column of ``hypotheses.csv`` written by :func:`test_hypotheses`, in order, with what
it means (the sidecar README of a study is generated from it)."""

HYPOTHESES_COLUMNS = list(COLUMN_DOCS)
"""Columns of :func:`test_hypotheses` (the study adds its grid columns after them)."""

UNIT_COLUMNS = ["replicate", "round", "arm", "unit", "value"]
"""Columns of a *units frame*: one value per (replicate, round, arm, unit); arm "a" or "b"."""


# ---- phases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """A training phase: rounds r with lo ≤ r/last < hi (hi = 1 includes the last round).

    With ``absolute=True``, lo and hi are rounds instead of fractions (both inclusive).
    """

    name: str
    lo: float
    hi: float
    absolute: bool = False

    def contains(self, r: int, last: int) -> bool:
        if self.absolute:
            return self.lo <= r <= self.hi
        f = r / last if last > 0 else 0.0
        return self.lo <= f < self.hi or (self.hi >= 1.0 and f >= 1.0)


def default_phases() -> list[Phase]:
    """Early / middle / late: thirds of the rounds [0, 1/3), [1/3, 2/3), [2/3, 1]."""
    return [Phase("early", 0.0, 1 / 3), Phase("middle", 1 / 3, 2 / 3), Phase("late", 2 / 3, 1.0)]


def assign_phases(rounds: Sequence[int], phases: Sequence[Phase],
                  last: int | None = None) -> dict[str, list[int]]:
    """Phase name → the rounds (of ``rounds``) in it; ``last`` defaults to max(rounds)."""
    rs = sorted({int(r) for r in rounds})
    last = max(rs) if last is None and rs else (last or 0)
    return {p.name: [r for r in rs if p.contains(r, last)] for p in phases}


def phases_by_loss(rounds: Sequence[int], losses: Sequence[float],
                   edges: Sequence[float] = (1 / 3, 2 / 3)) -> list[Phase]:
    """Phases by training progress q_r = (L_0 − L_r)/(L_0 − min L) instead of round fraction.

    Phase k holds the rounds with edges[k−1] ≤ q_r < edges[k] (q = 1 in the last); returned as
    absolute round ranges (a phase no round falls in is dropped). Names: early, middle, late
    for two edges, else phase0, phase1, …
    """
    r = np.asarray(rounds, dtype=int)
    loss = np.asarray(losses, dtype=float)
    order = np.argsort(r)
    r, loss = r[order], loss[order]
    span = loss[0] - np.nanmin(loss)
    q = (loss[0] - loss) / span if span > 0 else np.zeros_like(loss)
    bounds = [-np.inf, *edges, np.inf]
    names = (["early", "middle", "late"] if len(edges) == 2
             else [f"phase{k}" for k in range(len(bounds) - 1)])
    out = []
    for k, name in enumerate(names):
        inside = r[(q >= bounds[k]) & (q < bounds[k + 1])]
        if inside.size:
            out.append(Phase(name, float(inside.min()), float(inside.max()), absolute=True))
    return out


# ---- units frames from a tidy analysis table ------------------------------------------------
def _with_replicate(table: pd.DataFrame) -> pd.DataFrame:
    return table if "replicate" in table.columns else table.assign(replicate=0)


def transform_values(v: pd.Series, transform: str) -> pd.Series:
    """identity, or log (positive values only): applied before a difference is taken."""
    if transform == "identity":
        return v
    if transform == "log":
        if (v <= 0).any():
            raise ValueError("transform 'log' needs positive values; use transform 'identity'")
        return np.log(v)
    raise ValueError(f"unknown transform {transform!r}; use identity or log")


def client_server_units(table: pd.DataFrame, quantity: str = "stable-rank",
                        transform: str = "identity") -> pd.DataFrame:
    """Units frame of client − server: per (replicate, round, client) the paired difference
    f(x_client) − f(x_server), arm "a", unit = client name (f: the transform)."""
    t = _with_replicate(table)
    t = t[(t["quantity"] == quantity) & (t["k"] == 0 if "k" in t else True)]
    t = t.assign(value=transform_values(t["value"].astype(float), transform))
    server = t[t["subject_kind"] == "server"].set_index(["replicate", "round"])["value"]
    clients = t[t["subject_kind"] == "client"]
    if server.empty or clients.empty:
        raise ValueError(f"client − server needs rows of {quantity!r} for the server and clients")
    s = server.reindex(pd.MultiIndex.from_frame(clients[["replicate", "round"]])).to_numpy()
    out = pd.DataFrame({"replicate": clients["replicate"].to_numpy(),
                        "round": clients["round"].to_numpy(), "arm": "a",
                        "unit": clients["subject"].to_numpy(),
                        "value": clients["value"].to_numpy() - s})
    return out.dropna(subset=["value"])[UNIT_COLUMNS]


def subset_size_units(table: pd.DataFrame, small: int, large: int | str,
                      quantity: str = "stable-rank", transform: str = "identity",
                      kind: str = "subset") -> pd.DataFrame:
    """Units frame of n_small − n_large: arm "a" the draws of size ``small``, arm "b" those of
    size ``large`` (or the server when ``large == "server"``); unit = subject name (a draw sees
    the same indices at every round, so its rounds are one unit). ``kind`` selects the subject
    kind of the arms (e.g. a nested-subset kind from :mod:`hessrank.analysis.controls`)."""
    t = _with_replicate(table)
    t = t[t["quantity"] == quantity]
    t = t.assign(value=transform_values(t["value"].astype(float), transform))
    a = t[(t["subject_kind"] == kind) & (t["subject_size"] == int(small))]
    if large == "server":
        b = t[t["subject_kind"] == "server"]
    else:
        b = t[(t["subject_kind"] == kind) & (t["subject_size"] == int(large))]
    if a.empty or b.empty:
        raise ValueError(f"n{small} − n{large} needs {quantity!r} rows of {kind} subjects of "
                         f"both sizes; the table has sizes "
                         f"{sorted(t.loc[t['subject_kind'] == kind, 'subject_size'].unique())}")
    frames = [pd.DataFrame({"replicate": x["replicate"].to_numpy(), "round": x["round"].to_numpy(),
                            "arm": arm, "unit": x["subject"].to_numpy(),
                            "value": x["value"].to_numpy()}) for arm, x in (("a", a), ("b", b))]
    return pd.concat(frames, ignore_index=True)[UNIT_COLUMNS]


def alignment_units(table: pd.DataFrame, rank: int, quantity: str = "alignment") -> pd.DataFrame:
    """Units frame of A_r − A_full: per (replicate, round, layer) the paired difference of the
    alignment at truncation rank ``rank`` and at k = 0 (full), arm "a", unit = layer."""
    t = _with_replicate(table)
    t = t[t["quantity"] == quantity]
    key = ["replicate", "round", "layer"]
    full = t[t["k"] == 0].set_index(key)["value"]
    low = t[t["k"] == int(rank)]
    if full.empty or low.empty:
        raise ValueError(f"A_{rank} − A_full needs {quantity!r} rows at k={rank} and k=0")
    f = full.reindex(pd.MultiIndex.from_frame(low[key])).to_numpy()
    out = pd.DataFrame({"replicate": low["replicate"].to_numpy(), "round": low["round"].to_numpy(),
                        "arm": "a", "unit": low["layer"].to_numpy(),
                        "value": low["value"].to_numpy() - f})
    return out.dropna(subset=["value"])[UNIT_COLUMNS]


def update_alignment_units(pairs: pd.DataFrame, rank: int,
                           layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Units frame of A_r − A_full of recorded client *updates*, unit = client.

    ``pairs`` holds :data:`hessrank.analysis.update_alignment.PAIR_COLUMNS` plus replicate
    and round: D_r(a, b) per client pair. Pairs are not independent (pair (a, b) and (a, c)
    share client a), clients are: the value of client c at a round is the mean of D_r(c, c')
    over its partners c' and over the chosen weight matrices (all by default), arm "a". The
    mean over clients equals the mean over pairs when every pair is present, so the estimate
    is A_r − A_full, and the bootstrap resamples the independent level.
    """
    p = _with_replicate(pairs)
    p = p[p["rank"] == int(rank)]
    if layers is not None:
        p = p[p["layer"].isin(list(layers))]
    if p.empty:
        raise ValueError(f"A_{rank} − A_full of updates needs pair rows at rank {rank}"
                         + (f" for layers {list(layers)}" if layers is not None else ""))
    both = pd.concat([p.rename(columns={"client_a": "unit"}).drop(columns="client_b"),
                      p.rename(columns={"client_b": "unit"}).drop(columns="client_a")])
    out = both.groupby(["replicate", "round", "unit"], as_index=False)["value"].mean()
    out["unit"] = "client" + out["unit"].astype(int).astype(str)
    return out.assign(arm="a")[UNIT_COLUMNS]


def phase_unit_means(units: pd.DataFrame, rounds: Sequence[int]) -> pd.DataFrame:
    """Average each (replicate, arm, unit) over the given rounds (rounds are not independent)."""
    sub = units[units["round"].isin([int(r) for r in rounds])]
    return sub.groupby(["replicate", "arm", "unit"], as_index=False)["value"].mean()


# ---- replicate statistics ---------------------------------------------------------------------
Replicates = Sequence[tuple[np.ndarray, "np.ndarray | None"]]
"""Per replicate: (values of arm a, values of arm b or None), one value per unit (already
averaged over the rounds of a phase)."""


def _clean(replicates: Replicates) -> list[tuple[np.ndarray, np.ndarray | None]]:
    reps = [(np.asarray(a, dtype=float), None if b is None else np.asarray(b, dtype=float))
            for a, b in replicates]
    reps = [(a, b) for a, b in reps if a.size and (b is None or b.size)]
    if not reps:
        raise ValueError("inference needs at least one replicate with units in every arm")
    return reps


def replicate_statistics(replicates: Replicates) -> np.ndarray:
    """d_i = mean(a_i) − mean(b_i) (or mean(a_i) for one arm), one per replicate."""
    return np.array([a.mean() - (0.0 if b is None else b.mean()) for a, b in _clean(replicates)])


def _num_units(reps) -> int:
    return int(sum(a.size + (0 if b is None else b.size) for a, b in reps))


# ---- one test's inference, whatever the method ------------------------------------------------
@dataclass(frozen=True)
class Inference:
    """The estimate θ̂ of one test and what every verdict needs from it (module doc).

    estimate: θ̂ = mean_i d_i.  stderr: its standard error (method's own; for the bootstrap
    methods the SD of the replicate statistics / √R).  df: degrees of freedom of the t
    reference (R − 1 for ``t``; Welch's for one replicate; inf for ``mixedlm``; NaN for the
    bootstrap methods, which use their resampled distribution).  sampling_unit: "replicate",
    or "unit" when a single replicate forces inference over its units (then the result speaks
    for that run only).  draws: the bootstrap distribution (θ* for ``percentile``, t* for
    ``bootstrap-t``), None otherwise.
    """

    method: str
    estimate: float
    stderr: float
    df: float
    n_replicates: int
    n_units: int
    sampling_unit: str = "replicate"
    num_resamples: int = 0
    seed: int = 0
    draws: np.ndarray | None = field(default=None, repr=False, compare=False)

    # one-sided p-values --------------------------------------------------------------------
    def p_above(self, theta0: float) -> float:
        """p-value of H0: θ ≤ θ0 against θ > θ0 (small: evidence that θ exceeds θ0)."""
        return self._one_sided(float(theta0), upper=True)

    def p_below(self, theta0: float) -> float:
        """p-value of H0: θ ≥ θ0 against θ < θ0."""
        return self._one_sided(float(theta0), upper=False)

    def p_two_sided(self, theta0: float = 0.0) -> float:
        """2 · min(p_above, p_below), at most 1: the smallest α whose (1 − α) interval
        excludes θ0."""
        return min(1.0, 2 * min(self.p_above(theta0), self.p_below(theta0)))

    def interval(self, confidence: float) -> tuple[float, float]:
        """Two-sided interval at ``confidence`` (equal tails)."""
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        tail = (1 - confidence) / 2
        if self.method == "percentile":
            lo, hi = np.quantile(self.draws, [tail, 1 - tail], method="inverted_cdf")
            return float(lo), float(hi)
        if self.method == "bootstrap-t":
            q_lo, q_hi = np.quantile(self.draws, [tail, 1 - tail], method="inverted_cdf")
            return (float(self.estimate - q_hi * self.stderr),
                    float(self.estimate - q_lo * self.stderr))
        q = _t_quantile(1 - tail, self.df)
        half = q * self.stderr if self.stderr > 0 else 0.0
        return float(self.estimate - half), float(self.estimate + half)

    def _one_sided(self, theta0: float, upper: bool) -> float:
        if not np.isfinite(self.estimate):
            return float("nan")
        if self.method == "percentile":  # share of θ* on the null side, +1 (never 0)
            d = self.draws
            k = np.sum(d <= theta0) if upper else np.sum(d >= theta0)
            return float((k + 1) / (d.size + 1))
        if self.stderr == 0 or not np.isfinite(self.stderr):
            if self.estimate == theta0 or not np.isfinite(self.stderr):
                return 1.0
            return 0.0 if (self.estimate > theta0) == upper else 1.0
        t_obs = (self.estimate - theta0) / self.stderr
        if self.method == "bootstrap-t":  # share of t* at least as extreme, +1
            d = self.draws
            k = np.sum(d >= t_obs) if upper else np.sum(d <= t_obs)
            return float((k + 1) / (d.size + 1))
        return float(_t_sf(t_obs, self.df) if upper else _t_sf(-t_obs, self.df))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "draws"}


def _t_sf(x: float, df: float) -> float:
    return float(stats.norm.sf(x) if np.isinf(df) else stats.t.sf(x, df))


def _t_quantile(q: float, df: float) -> float:
    return float(stats.norm.ppf(q) if np.isinf(df) else stats.t.ppf(q, df))


# ---- the methods ------------------------------------------------------------------------------
def replicate_t(replicates: Replicates) -> Inference:
    """The t-test on replicate statistics (the default; chosen by
    ``experiments/benchmarks/results/inference.md``).

    With R ≥ 2 replicates: θ̂ = mean d_i, se = sd(d_i)/√R, reference t with R − 1 degrees of
    freedom. Exact when the d_i are normal with one variance (a balanced design), whatever
    the share of variance between replicates; units inside a replicate enter only through
    d_i, so their number and their correlation do not matter.

    With one replicate the replicate level cannot be seen: the units of that replicate are
    the sample (one arm: one-sample t over units, df = n − 1; two arms: Welch's t), and
    ``sampling_unit`` says "unit": the result describes that run, not the training recipe.
    """
    reps = _clean(replicates)
    R, n_units = len(reps), _num_units(reps)
    if R >= 2:
        d = replicate_statistics(reps)
        return Inference("t", float(d.mean()), float(d.std(ddof=1) / math.sqrt(R)),
                         float(R - 1), R, n_units)
    a, b = reps[0]
    if a.size < 2 or (b is not None and b.size < 2):
        nan = float("nan")
        return Inference("t", float(a.mean() - (0 if b is None else b.mean())), nan, nan, 1,
                         n_units, "unit")
    va = a.var(ddof=1) / a.size
    if b is None:
        return Inference("t", float(a.mean()), float(math.sqrt(va)), float(a.size - 1), 1,
                         n_units, "unit")
    vb = b.var(ddof=1) / b.size
    se2 = va + vb
    df = se2**2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if se2 > 0 else float("nan")
    return Inference("t", float(a.mean() - b.mean()), float(math.sqrt(se2)), float(df), 1,
                     n_units, "unit")


def bootstrap_t(replicates: Replicates, *, num_resamples: int = 4000,
                seed: int = 0) -> Inference:
    """Studentized cluster bootstrap (bootstrap-t; Davison & Hinkley 1997, §5.2.1).

    Whole replicates are resampled with replacement (a replicate's units travel with it, so
    only d_i matters): t* = (θ̂* − θ̂) / se* with se* = sd(d*)/√R; the interval is
    [θ̂ − q*_{1−a/2} se, θ̂ − q*_{a/2} se] and the one-sided p-value of θ ≤ θ0 is
    (#{t* ≥ (θ̂ − θ0)/se} + 1)/(B + 1). A resample of R copies of one replicate has se* = 0
    and t* = ±∞ (kept: it is part of the resampling distribution). Needs R ≥ 2.
    """
    reps = _clean(replicates)
    R = len(reps)
    if R < 2:
        raise ValueError("bootstrap-t resamples replicates and needs at least 2; use method 't'")
    _check_resamples(num_resamples)
    d = replicate_statistics(reps)
    est, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(R))
    rng = np.random.default_rng(seed)
    star = d[rng.integers(0, R, size=(int(num_resamples), R))]
    mean = star.mean(axis=1)
    se_star = star.std(axis=1, ddof=1) / math.sqrt(R)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = (mean - est) / se_star
    t_star[np.isnan(t_star)] = 0.0  # 0/0: a resample equal to the data's mean, no spread
    return Inference("bootstrap-t", est, se, float("nan"), R, _num_units(reps),
                     num_resamples=int(num_resamples), seed=int(seed), draws=t_star)


def _check_resamples(num_resamples: int) -> None:
    if int(num_resamples) < 100:
        raise ValueError(f"num_resamples must be >= 100, got {num_resamples}")


_CHUNK = 1 << 22  # resampled indices held at once by the two-stage bootstrap


def _resampled_means(values: np.ndarray, shape: tuple[int, int],
                     rng: np.random.Generator) -> np.ndarray:
    """Means of ``shape`` independent with-replacement resamples of ``values``."""
    n = values.size
    if n == 1:
        return np.full(shape, float(values[0]))
    out = np.empty(shape)
    rows = max(1, _CHUNK // (shape[1] * n))  # bounded memory for many replicates and units
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        idx = rng.integers(0, n, size=(stop - start, shape[1], n))
        out[start:stop] = values[idx].mean(axis=-1)
    return out


def cluster_bootstrap(replicates: Replicates, *, num_resamples: int = 4000,
                      seed: int = 0) -> Inference:
    """Two-stage percentile bootstrap (Davison & Hinkley 1997, §3.8): the former default,
    kept as an option (``method = "percentile"``).

    Draw R replicates with replacement, then inside every drawn replicate its units with
    replacement, arm by arm; θ* is the mean of the drawn replicates' statistics. The interval
    is the percentile interval of θ*, the one-sided p-value of θ ≤ θ0 is
    (#{θ* ≤ θ0} + 1)/(B + 1) (never below 1/(B + 1)). Measured in
    ``experiments/benchmarks/results/inference.md``: it undercovers when replicates differ
    (resampling R of R replicates underestimates their spread by (R − 1)/R, and the percentile
    interval of a few clusters is too short) and overcovers when they do not (the unit stage
    counts the within-replicate variance twice).
    """
    reps = _clean(replicates)
    _check_resamples(num_resamples)
    rng = np.random.default_rng(seed)
    R, B = len(reps), int(num_resamples)
    d = replicate_statistics(reps)
    # slot j of bootstrap sample b holds replicate pick[b, j], with its own unit resample:
    # only the picked (replicate, slot) pairs are drawn
    pick = rng.integers(0, R, size=(B, R)) if R > 1 else np.zeros((B, 1), dtype=int)
    slots = np.empty(pick.shape)
    for i, (a, b) in enumerate(reps):
        chosen = pick == i
        count = int(chosen.sum())
        if count == 0:
            continue
        means = _resampled_means(a, (count, 1), rng)[:, 0]
        if b is not None:
            means -= _resampled_means(b, (count, 1), rng)[:, 0]
        slots[chosen] = means
    theta = slots.mean(axis=1)
    return Inference("percentile", float(d.mean()), float(theta.std(ddof=1)), float("nan"), R,
                     _num_units(reps), "replicate" if R > 1 else "unit", B, int(seed), theta)


def mixed_model(replicates: Replicates) -> Inference:
    """Linear mixed model with units nested in replicates (statsmodels ``MixedLM``, REML).

    One arm: x_ij = θ + b_i + e_ij with b_i ~ N(0, σ_b²), e_ij ~ N(0, σ_w²). Two arms:
    x_ij = μ + θ·[j in arm a] + b_i + c_i·[j in arm a] + e_ij (a random replicate effect on the
    difference too). θ̂ and its Wald standard error as statsmodels reports them, with a normal
    reference (df = inf). Needs R ≥ 2; a fit that fails gives NaN.
    """
    import statsmodels.formula.api as smf

    reps = _clean(replicates)
    R = len(reps)
    if R < 2:
        raise ValueError("the mixed model needs at least 2 replicates; use method 't'")
    rows = []
    for i, (a, b) in enumerate(reps):
        rows += [(i, 1.0, v) for v in a]
        if b is not None:
            rows += [(i, 0.0, v) for v in b]
    frame = pd.DataFrame(rows, columns=["replicate", "in_a", "value"])
    two_arms = reps[0][1] is not None
    formula = "value ~ in_a" if two_arms else "value ~ 1"
    term = "in_a" if two_arms else "Intercept"
    nan = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes: a failed fit is reported as NaN
        try:
            model = smf.mixedlm(formula, frame, groups=frame["replicate"],
                                re_formula="~in_a" if two_arms else "1")
            fit = model.fit(reml=True)
            est, se = float(fit.fe_params[term]), float(fit.bse_fe[term])
        except (np.linalg.LinAlgError, ValueError):
            est, se = nan, nan
    if not np.isfinite(se):
        est, se = nan, nan
    return Inference("mixedlm", est, se, float("inf"), R, _num_units(reps))


METHODS = ("t", "bootstrap-t", "percentile", "mixedlm")
"""Values of ``method`` (:func:`infer_one`); ``t`` is the default."""


def infer_one(replicates: Replicates, method: str = "t", *, num_resamples: int = 4000,
              seed: int = 0) -> Inference:
    """:class:`Inference` of one test by ``method`` (:data:`METHODS`)."""
    if method == "t":
        return replicate_t(replicates)
    if method == "bootstrap-t":
        return bootstrap_t(replicates, num_resamples=num_resamples, seed=seed)
    if method == "percentile":
        return cluster_bootstrap(replicates, num_resamples=num_resamples, seed=seed)
    if method == "mixedlm":
        return mixed_model(replicates)
    raise ValueError(f"unknown inference method {method!r}; valid: {', '.join(METHODS)}")


def jackknife(values: np.ndarray, statistic=np.mean) -> tuple[float, float]:
    """Leave-one-out jackknife: (statistic of all units, its jackknife stderr).

    stderr² = (n−1)/n Σ_i (s_(−i) − s̄_(·))²; NaN for fewer than 3 units.
    """
    v = np.asarray(values)
    n = len(v)
    full = float(statistic(v))
    if n < 3:
        return full, float("nan")
    loo = np.array([statistic(np.delete(v, i, axis=0)) for i in range(n)], dtype=float)
    return full, float(math.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))


def offdiag_mean_jackknife(D: np.ndarray) -> tuple[float, float]:
    """Mean of the off-diagonal pairs of a symmetric K×K matrix and its leave-one-*client*-out
    jackknife stderr (clients are the independent units, pairs are not); NaN for K < 3."""
    D = np.asarray(D, dtype=float)
    K = D.shape[0]

    def mean(keep: np.ndarray) -> float:
        sub = D[np.ix_(keep, keep)]
        iu = np.triu_indices(len(keep), k=1)
        return float(np.nanmean(sub[iu])) if iu[0].size else float("nan")

    full = mean(np.arange(K))
    if K < 3:
        return full, float("nan")
    loo = np.array([mean(np.delete(np.arange(K), i)) for i in range(K)])
    return full, float(math.sqrt((K - 1) / K * np.sum((loo - loo.mean()) ** 2)))


# ---- claims, multiplicity, verdicts -----------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """The three one-sided tests of one row against its minimum effect δ (module doc).

    p_supported: H0 θ ≤ +δ.  p_reversed: H0 θ ≥ −δ.  p_negligible: TOST of H0 |θ| ≥ δ, the
    larger of the p-values of θ ≤ −δ and θ ≥ +δ.  claim: the one of the three with the smallest
    p-value.  p_value = min(1, 2 · that p-value): each test is run at α/2, so the row makes
    its claim exactly when its (1 − α) interval lies above +δ, below −δ or inside ±δ.
    """

    p_supported: float
    p_reversed: float
    p_negligible: float
    claim: str
    p_value: float


def claim(result: Inference, min_effect: float) -> Claim:
    """The :class:`Claim` of one test against δ = ``min_effect`` > 0."""
    if not min_effect > 0:
        raise ValueError(f"min_effect must be > 0 (state the smallest effect that matters), "
                         f"got {min_effect}")
    d = float(min_effect)
    p = {"supported": result.p_above(d), "reversed": result.p_below(-d),
         "negligible": max(result.p_above(-d), result.p_below(d))}
    if not all(np.isfinite(v) for v in p.values()):
        return Claim(*p.values(), "inconclusive", float("nan"))
    best = min(p, key=p.get)
    return Claim(p["supported"], p["reversed"], p["negligible"], best, min(1.0, 2 * p[best]))


def adjust_pvalues(pvalues: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjusted p-values across the tests of one study: "holm" (family-wise error, Holm 1979)
    or "bh" (false discovery rate, Benjamini & Hochberg 1995). NaN stays NaN (and does not
    count as a test). With p_(1) ≤ … ≤ p_(K):

        holm   p̃_(j) = max_{i ≤ j} min(1, (K − i + 1) p_(i))
        bh     p̃_(j) = min_{i ≥ j} min(1, K p_(i) / i)

    (statsmodels' ``multipletests`` gives the same numbers, checked in the tests; it runs
    ``gc.collect()`` on every call, which costs seconds in a study's many families.)
    """
    if method not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {method!r}; use holm or bh")
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    K = ok.size
    if K == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ps = p[order]
    i = np.arange(1, K + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (K - i + 1) * ps))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, K * ps / i)[::-1])[::-1]
    out[order] = adj
    return out


ADJUSTMENTS = {"holm": "holm", "bh": "fdr_bh"}
"""``adjust`` values → the statsmodels ``multipletests`` method of the same adjustment."""


def adjusted_levels(pvalues: Sequence[float], alpha: float, method: str = "holm") -> np.ndarray:
    """The level α_k at which row k is decided, so that "p_adjusted < α" ⟺ "p_k < α_k".

    Holm: rows sorted by p; the row at step j (1-based) of K is tested at α/(K − j + 1) while
    every earlier step rejected; from the first step that does not reject on, every row keeps
    that step's level. BH: α·max(r, 1)/K for every row, r the number of rejections (the
    level of Benjamini & Yekutieli's 2005 FCR-adjusted intervals). The (1 − α_k) interval of a
    row is the one its verdict is read from (``ci_low_adjusted``/``ci_high_adjusted``).
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    K = ok.size
    if K == 0:
        return out
    if method == "bh":
        r = int(np.sum(adjust_pvalues(p[ok], "bh") < alpha))
        out[ok] = alpha * max(r, 1) / K
        return out
    if method != "holm":
        raise ValueError(f"unknown adjustment {method!r}; use holm or bh")
    order = ok[np.argsort(p[ok], kind="stable")]
    stopped = None  # the level of the first step that did not reject
    for j, k in enumerate(order, start=1):
        step = alpha / (K - j + 1)
        if stopped is None and p[k] < step:
            out[k] = step
            continue
        stopped = step if stopped is None else stopped
        out[k] = stopped
    return out


def verdict(result: Inference, min_effect: float, alpha: float = 0.05) -> str:
    """The verdict of one test alone (no multiplicity): its claim when the claim's p-value is
    below α, else inconclusive (module doc)."""
    c = claim(result, min_effect)
    return c.claim if c.p_value < alpha else "inconclusive"


def decide(results: Sequence[Inference], min_effects: Sequence[float], *, alpha: float = 0.05,
           adjust: str = "holm") -> pd.DataFrame:
    """Claims, adjusted p-values, intervals and verdicts of one family of tests.

    Returns one row per result with the decision columns of :data:`HYPOTHESES_COLUMNS`
    (estimate, stderr, df, the marginal (1 − α) interval, the level and interval each
    verdict is read from, the three one-sided p-values, p_value, p_adjusted, verdict).
    """
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    claims = [claim(r, d) for r, d in zip(results, min_effects)]
    p = np.array([c.p_value for c in claims])
    p_adj = adjust_pvalues(p, adjust)
    levels = adjusted_levels(p, alpha, adjust)
    rows = []
    for r, c, pa, lv in zip(results, claims, p_adj, levels):
        lo, hi = r.interval(1 - alpha) if np.isfinite(r.estimate) else (np.nan, np.nan)
        lo_a, hi_a = (r.interval(1 - lv) if np.isfinite(lv) and np.isfinite(r.estimate)
                      else (np.nan, np.nan))
        rows.append({
            "estimate": r.estimate, "stderr": r.stderr, "df": r.df, "ci_low": lo, "ci_high": hi,
            "confidence_adjusted": 1 - lv, "ci_low_adjusted": lo_a, "ci_high_adjusted": hi_a,
            "p_supported": c.p_supported, "p_reversed": c.p_reversed,
            "p_negligible": c.p_negligible, "p_value": c.p_value, "p_adjusted": pa,
            "verdict": c.claim if pa < alpha else "inconclusive",
        })  # fmt: skip
    return pd.DataFrame(rows)


def test_hypotheses(
    units: Mapping[str, pd.DataFrame],
    *,
    min_effect: Mapping[str, float],
    phases: Sequence[Phase] | None = None,
    last_round: int | None = None,
    alpha: float = 0.05,
    adjust: str = "holm",
    method: str = "t",
    num_resamples: int = 4000,
    seed: int = 0,
    transform: Mapping[str, str] | None = None,
    power: float = 0.8,
) -> pd.DataFrame:
    """Test every hypothesis in every phase and decide (module doc); the ``hypotheses.csv``.

    Args:
        units: hypothesis name → units frame (:data:`UNIT_COLUMNS`), e.g. from
            :func:`subset_size_units`.
        min_effect: hypothesis name → δ > 0, stated before looking at the data.
        phases: default :func:`default_phases`; fractions refer to ``last_round``.
        last_round: the final round of training (default: the largest round in ``units``).
        alpha: family-wise level (Holm) or false discovery rate (BH); the marginal intervals
            are at 1 − α.
        adjust: "holm" or "bh", across all (hypothesis × phase) tests.
        method: :data:`METHODS` (default "t": the t-test on replicate statistics).
        num_resamples, seed: of the bootstrap methods (each test its own stream from ``seed``).
        transform: hypothesis name → the transform applied before the difference (a label
            for the table; the units frames must already be transformed).
        power: of the planning columns (:mod:`hessrank.analysis.planning`).
    Returns:
        DataFrame with :data:`HYPOTHESES_COLUMNS`, one row per (hypothesis, phase) that has
        data, in input order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inference method {method!r}; valid: {', '.join(METHODS)}")
    phases = list(phases) if phases is not None else default_phases()
    if last_round is None:
        last_round = max((int(u["round"].max()) for u in units.values() if len(u)), default=0)
    rows, results, comps = [], [], []
    streams = np.random.SeedSequence(int(seed)).spawn(len(units) * len(phases))
    for h, (name, frame) in enumerate(units.items()):
        if name not in min_effect:
            raise ValueError(f"hypothesis {name!r} has no min_effect; state one up front")
        delta = float(min_effect[name])
        by_phase = assign_phases(frame["round"].unique(), phases, last_round)
        two_arms = bool((frame["arm"] == "b").any())
        for k, ph in enumerate(phases):
            rs = by_phase[ph.name]
            if not rs:
                continue
            reps = replicates_of(phase_unit_means(frame, rs), two_arms)
            if not reps:
                continue
            ss = streams[h * len(phases) + k]
            res = infer_one(reps, method, num_resamples=num_resamples,
                            seed=int(ss.generate_state(1)[0]))
            results.append(res)
            comps.append(planning.variance_components(reps))
            rows.append({
                "hypothesis": name, "phase": ph.name, "round_lo": min(rs), "round_hi": max(rs),
                "num_rounds": len(rs), "n_replicates": res.n_replicates,
                "n_units": res.n_units, "min_effect": delta, "alpha": alpha, "adjust": adjust,
                "method": method, "sampling_unit": res.sampling_unit,
                "transform": (transform or {}).get(name, "identity"),
            })  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=HYPOTHESES_COLUMNS)
    out = pd.concat([pd.DataFrame(rows),
                     decide(results, [r["min_effect"] for r in rows], alpha=alpha,
                            adjust=adjust)], axis=1)
    level = planning.claim_level(alpha, len(rows))
    out["replicates_needed"] = [
        planning.replicates_needed(vc.replicate_variance(), d, level, power)
        for vc, d in zip(comps, out["min_effect"])]
    out["replicates_needed_unlimited_units"] = [
        planning.replicates_needed(vc.between, d, level, power)
        for vc, d in zip(comps, out["min_effect"])]
    return out[HYPOTHESES_COLUMNS]


def replicates_of(means: pd.DataFrame, two_arms: bool) -> list[tuple[np.ndarray,
                                                                       np.ndarray | None]]:
    """Per replicate of a phase's unit means (:func:`phase_unit_means`): (arm a values, arm b
    values or None). A replicate missing an arm is dropped (never read as one sample)."""
    reps = []
    for _, g in means.groupby("replicate"):
        a = g.loc[g["arm"] == "a", "value"].to_numpy(float)
        b = g.loc[g["arm"] == "b", "value"].to_numpy(float)
        if a.size and (b.size or not two_arms):
            reps.append((a, b if two_arms else None))
    return reps


# ---- one client-vs-server summary for demo, figures and notebooks ---------------------------
CLIENT_SERVER_COLUMNS = [
    "round", "server", "server_stderr", "client_mean", "client_stderr", "client_sd",
    "client_min", "client_max", "num_clients", "frac_clients_above", "ratio", "ratio_stderr",
    "z", "frac_clients_above_2se", "frac_clients_below_2se",
]


def client_vs_server_summary(table: pd.DataFrame, quantity: str = "stable-rank") -> pd.DataFrame:
    """Per round (and replicate, if the table has one): the server's value ± its estimator
    stderr, the clients' mean ± stderr over clients (sd/√K), spread, the share of clients
    above the server (plain, and by more than 2 combined stderr of the two estimates),
    the ratio mean client / server with a delta-method stderr and z = (mean − server)/√(se²+se²).

    Descriptive only: a round's z treats clients as independent draws at that round; the
    verdicts come from :func:`test_hypotheses`, which does not pool rounds.
    """
    t = table[table["quantity"] == quantity]
    keys = ["replicate", "round"] if "replicate" in t.columns else ["round"]
    rows = []
    for key, g in t.groupby(keys):
        server = g[g["subject_kind"] == "server"]
        clients = g[g["subject_kind"] == "client"]
        if server.empty or clients.empty:
            continue
        sv, se_s = float(server["value"].iloc[0]), float(server["stderr"].iloc[0])
        v, se_c = clients["value"].to_numpy(float), clients["stderr"].to_numpy(float)
        k = v.size
        mean = float(v.mean())
        sd = float(v.std(ddof=1)) if k > 1 else float("nan")
        se_m = sd / math.sqrt(k)
        ratio = mean / sv
        z_each = (v - sv) / np.hypot(se_c, se_s)
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update({
            "server": sv, "server_stderr": se_s, "client_mean": mean, "client_stderr": se_m,
            "client_sd": sd, "client_min": float(v.min()), "client_max": float(v.max()),
            "num_clients": k, "frac_clients_above": float(np.mean(v > sv)), "ratio": ratio,
            "ratio_stderr": abs(ratio) * math.hypot(se_m / mean, se_s / sv),
            "z": (mean - sv) / math.hypot(se_m, se_s),
            "frac_clients_above_2se": float(np.mean(z_each > 2)),
            "frac_clients_below_2se": float(np.mean(z_each < -2)),
        })  # fmt: skip
        rows.append(row)
    cols = [c for c in keys if c != "round"] + CLIENT_SERVER_COLUMNS
    return pd.DataFrame(rows, columns=cols)
