"""Inference at the right level: paired differences, cluster bootstrap, multiplicity, verdicts.

A *hypothesis* is a difference of means, estimated per training *phase* (docs/design.md §6):

    client − server          per client c: srank(H_c) − srank(H)            (paired, one arm)
    n_small − n_large        mean over draws of size n_s − mean over draws of size n_l
    aligned_r − aligned_full per layer: A_r − A_∞                           (paired, one arm)

Evidence is nested: replicates (independent training runs: seed, partition, probes) hold
*units* (clients, subset draws, layers), and a unit is seen at several rounds. Rounds of one
run are not independent, so within a phase each unit's rounds are averaged first. The
statistic of replicate i is

    d_i = mean_{u ∈ arm a} x̄_u − mean_{u ∈ arm b} x̄_u          (x̄_u: phase mean of unit u)

and the estimate is θ̂ = mean_i d_i (replicates weigh equally). Its uncertainty comes from a
two-stage (cluster) bootstrap (Davison & Hinkley 1997, §3.8): draw R replicates with
replacement, then, inside every drawn replicate, its units with replacement, arm by arm. The
percentile interval of θ* is the CI; the two-sided bootstrap p-value of θ = 0 is

    p = min(1, 2·min(#{θ* ≤ 0} + 1, #{θ* ≥ 0} + 1) / (B + 1)),

the smallest α whose percentile CI excludes 0 (so p < α ⟺ the (1−α) CI excludes 0, up to the
+1). Resampling both stages makes the interval slightly conservative when replicates differ
little; with fewer than ~5 replicates the replicate stage undercovers (the study warns).

Multiplicity: the p-values of all tests of one study (hypotheses × phases) are adjusted
together, by Holm (default) or Benjamini–Hochberg (``statsmodels`` ``multipletests``).

Verdict rule (stated up front, with a minimum effect δ > 0 per hypothesis, in the units of
the difference after the transform):

    supported     p_adjusted < α  and  θ̂ ≥ +δ
    reversed      p_adjusted < α  and  θ̂ ≤ −δ
    inconclusive  otherwise (not significant after adjustment, or smaller than δ)

Draw counts: :func:`required_units` is the power rule n = 2 (z_{1−α/2} + z_{power})² σ² / δ²
units per arm for a two-arm difference (half that for one arm), with σ the between-unit SD.

Example:
    >>> rng = np.random.default_rng(0)
    >>> reps = [(rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 20)) for _ in range(4)]
    >>> r = cluster_bootstrap(reps, seed=0)
    >>> bool(r.ci_low > 0)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "HYPOTHESES_COLUMNS",
    "VERDICTS",
    "BootstrapResult",
    "Phase",
    "adjust_pvalues",
    "alignment_units",
    "assign_phases",
    "client_server_units",
    "client_vs_server_summary",
    "cluster_bootstrap",
    "default_phases",
    "jackknife",
    "offdiag_mean_jackknife",
    "phases_by_loss",
    "phase_unit_means",
    "required_units",
    "subset_size_units",
    "test_hypotheses",
    "transform_values",
    "update_alignment_units",
    "verdict",
]

VERDICTS = ("supported", "reversed", "inconclusive")

HYPOTHESES_COLUMNS = [
    "hypothesis", "phase", "round_lo", "round_hi", "num_rounds", "estimate", "ci_low",
    "ci_high", "p_value", "p_adjusted", "n_replicates", "n_units", "min_effect", "alpha",
    "adjust", "transform", "units_needed", "verdict",
]
"""Columns of ``hypotheses.csv``. ``n_units``: units per replicate summed over replicates and
arms. ``units_needed``: the power rule's units per arm and replicate (:func:`required_units`)
for δ at α and 80 % power, from the observed between-unit SD (NaN when it cannot be computed)."""

_CHUNK = 1 << 22  # resampled indices held at once by the bootstrap

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


# ---- the bootstrap ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapResult:
    """Two-stage bootstrap of a difference of means (module doc).

    estimate: θ̂ = mean over replicates of d_i.  ci_low, ci_high: percentile CI at
    ``confidence``.  p_value: two-sided bootstrap p-value of θ = 0.  stderr: SD of θ*.
    n_replicates, n_units: replicates and units (summed over replicates and arms) used.
    num_resamples, seed: B and the seed of the resampling.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    stderr: float
    n_replicates: int
    n_units: int
    confidence: float
    num_resamples: int
    seed: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


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


def cluster_bootstrap(
    replicates: Sequence[tuple[np.ndarray, np.ndarray | None]],
    *,
    num_resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Two-stage bootstrap CI and p-value of θ = mean_i (mean a_i − mean b_i) (module doc).

    Args:
        replicates: per replicate, (values of arm a, values of arm b or None) — one value per
            unit (already averaged over the rounds of a phase). Arm b None: θ = mean of a.
        num_resamples: B. The p-value cannot go below 2/(B+1).
        confidence: level of the percentile CI.
        seed: seeds the resampling.
    Returns:
        :class:`BootstrapResult`.
    """
    reps = [(np.asarray(a, dtype=float), None if b is None else np.asarray(b, dtype=float))
            for a, b in replicates]
    reps = [(a, b) for a, b in reps if a.size and (b is None or b.size)]
    if not reps:
        raise ValueError("the bootstrap needs at least one replicate with units in every arm")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 100:
        raise ValueError(f"num_resamples must be >= 100, got {num_resamples}")
    rng = np.random.default_rng(seed)
    R, B = len(reps), int(num_resamples)
    d = np.array([a.mean() - (0.0 if b is None else b.mean()) for a, b in reps])
    estimate = float(d.mean())
    # W[i, b, j]: replicate i's statistic under an independent unit resample for slot j of
    # bootstrap sample b; slot j of sample b holds replicate pick[b, j].
    W = np.empty((R, B, R))
    for i, (a, b) in enumerate(reps):
        W[i] = _resampled_means(a, (B, R), rng)
        if b is not None:
            W[i] -= _resampled_means(b, (B, R), rng)
    pick = rng.integers(0, R, size=(B, R)) if R > 1 else np.zeros((B, 1), dtype=int)
    theta = W[pick, np.arange(B)[:, None], np.arange(R)[None, :]].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(theta, [tail, 1 - tail])
    below, above = int(np.sum(theta <= 0)), int(np.sum(theta >= 0))
    p = min(1.0, 2 * (min(below, above) + 1) / (B + 1))
    n_units = sum(a.size + (0 if b is None else b.size) for a, b in reps)
    return BootstrapResult(estimate, float(lo), float(hi), float(p), float(theta.std(ddof=1)),
                           R, int(n_units), float(confidence), B, int(seed))


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


# ---- multiplicity, power, verdicts -----------------------------------------------------------
def adjust_pvalues(pvalues: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjusted p-values across the tests of one study: "holm" (family-wise error) or "bh"
    (Benjamini–Hochberg false discovery rate), via statsmodels ``multipletests``."""
    from statsmodels.stats.multitest import multipletests

    names = {"holm": "holm", "bh": "fdr_bh"}
    if method not in names:
        raise ValueError(f"unknown adjustment {method!r}; use holm or bh")
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p
    return multipletests(p, method=names[method])[1]


def verdict(estimate: float, p_adjusted: float, min_effect: float, alpha: float = 0.05) -> str:
    """supported / reversed / inconclusive by the rule of the module doc."""
    if min_effect <= 0:
        raise ValueError(f"min_effect must be > 0 (state the smallest effect that matters), "
                         f"got {min_effect}")
    if not (p_adjusted < alpha) or not np.isfinite(estimate):
        return "inconclusive"
    if estimate >= min_effect:
        return "supported"
    if estimate <= -min_effect:
        return "reversed"
    return "inconclusive"


def required_units(sd: float, min_effect: float, *, alpha: float = 0.05, power: float = 0.8,
                   arms: int = 2) -> int:
    """Power rule: units per arm to detect a difference δ with a two-sided z-test,

        n = arms · (z_{1−α/2} + z_{power})² σ² / δ²        (arms = 2: difference of two means,
                                                             arms = 1: a paired mean)
    rounded up (at least 2)."""
    if min_effect <= 0 or not np.isfinite(sd):
        raise ValueError(f"required_units needs min_effect > 0 and a finite sd, got {min_effect}"
                         f" and {sd}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return max(2, math.ceil(arms * (z * sd / min_effect) ** 2))


def _units_needed(means: pd.DataFrame, min_effect: float, alpha: float) -> float:
    """Power rule from the pooled within-replicate between-unit SD of the arms with ≥ 2 units."""
    groups = [g["value"].to_numpy() for _, g in means.groupby(["replicate", "arm"])]
    var = [np.var(g, ddof=1) for g in groups if g.size >= 2]
    if not var:
        return float("nan")
    arms = means["arm"].nunique()
    return float(required_units(float(np.sqrt(np.mean(var))), min_effect, alpha=alpha,
                                arms=2 if arms == 2 else 1))


def test_hypotheses(
    units: Mapping[str, pd.DataFrame],
    *,
    min_effect: Mapping[str, float],
    phases: Sequence[Phase] | None = None,
    last_round: int | None = None,
    alpha: float = 0.05,
    adjust: str = "holm",
    num_resamples: int = 4000,
    seed: int = 0,
    transform: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Test every hypothesis in every phase and decide (module doc); the ``hypotheses.csv``.

    Args:
        units: hypothesis name → units frame (:data:`UNIT_COLUMNS`), e.g. from
            :func:`subset_size_units`.
        min_effect: hypothesis name → δ > 0, stated before looking at the data.
        phases: default :func:`default_phases`; fractions refer to ``last_round``.
        last_round: the final round of training (default: the largest round in ``units``).
        alpha: level of the tests and of the CIs (CIs are at 1 − α, unadjusted).
        adjust: "holm" or "bh", across all (hypothesis × phase) tests.
        num_resamples, seed: of the bootstrap (each test gets its own stream from ``seed``).
        transform: hypothesis name → the transform applied before the difference (a label
            for the table; the units frames must already be transformed).
    Returns:
        DataFrame with :data:`HYPOTHESES_COLUMNS`, one row per (hypothesis, phase) that has
        data, in input order.
    """
    phases = list(phases) if phases is not None else default_phases()
    if last_round is None:
        last_round = max((int(u["round"].max()) for u in units.values() if len(u)), default=0)
    rows = []
    streams = np.random.SeedSequence(int(seed)).spawn(len(units) * len(phases))
    for h, (name, frame) in enumerate(units.items()):
        if name not in min_effect:
            raise ValueError(f"hypothesis {name!r} has no min_effect; state one up front")
        delta = float(min_effect[name])
        by_phase = assign_phases(frame["round"].unique(), phases, last_round)
        for k, ph in enumerate(phases):
            rs = by_phase[ph.name]
            if not rs:
                continue
            means = phase_unit_means(frame, rs)
            two_arms = bool((frame["arm"] == "b").any())
            reps = []  # a replicate missing an arm is dropped by the bootstrap
            for _, g in means.groupby("replicate"):
                a = g.loc[g["arm"] == "a", "value"].to_numpy()
                b = g.loc[g["arm"] == "b", "value"].to_numpy()
                reps.append((a, b if two_arms else None))
            ss = streams[h * len(phases) + k]
            res = cluster_bootstrap(reps, num_resamples=num_resamples, confidence=1 - alpha,
                                    seed=int(ss.generate_state(1)[0]))
            rows.append({
                "hypothesis": name, "phase": ph.name, "round_lo": min(rs), "round_hi": max(rs),
                "num_rounds": len(rs), "estimate": res.estimate, "ci_low": res.ci_low,
                "ci_high": res.ci_high, "p_value": res.p_value, "n_replicates": res.n_replicates,
                "n_units": res.n_units, "min_effect": delta, "alpha": alpha, "adjust": adjust,
                "transform": (transform or {}).get(name, "identity"),
                "units_needed": _units_needed(means, delta, alpha),
            })
    out = pd.DataFrame(rows, columns=HYPOTHESES_COLUMNS)
    if len(out):
        out["p_adjusted"] = adjust_pvalues(out["p_value"].to_numpy(), adjust)
        out["verdict"] = [verdict(e, p, d, alpha) for e, p, d in
                          zip(out["estimate"], out["p_adjusted"], out["min_effect"])]
    return out


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
