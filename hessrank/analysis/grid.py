"""Is a phase's verdict a property of the phase, or of the checkpoints that happened to be
analyzed? Two checks of the study verdicts (docs/design.md §6).

1. **Interleaved sub-grids.** Within every phase the analyzed rounds, in order, are dealt
   alternately to sub-grid A (1st, 3rd, …) and B (2nd, 4th, …), so both span the phase. In a
   phase with at least 4 checkpoints each sub-grid holds at least 2, and the study's tests are
   rerun on each sub-grid alone (each a family of the same size, the same method). Per row:

       agrees      both sub-grids give the full grid's verdict
       weaker      a sub-grid is inconclusive where the full grid decided (half the
                   checkpoints, less precision), and none decides otherwise
       differs     a sub-grid reaches another decision than the full grid
       too few checkpoints (k)   k < 4: no two sub-grids of ≥ 2 checkpoints

2. **Per-round profile.** At every analyzed round alone, the effect's replicate-level
   t-interval (:func:`hessrank.analysis.inference.replicate_t`), simultaneous over all rounds
   of the hypothesis by Bonferroni (each at 1 − α/#rounds). A round's sign is "+" when its
   interval lies above 0, "-" below 0, "~" when it holds 0. A phase holding a "+" and a "-" round
   has its sign change *inside* the phase: its verdict averages opposite effects, and is
   flagged ``sign_change`` rather than read as a property of the whole phase.

The even/odd split of all checkpoints that this replaces compared, in a phase of two
checkpoints, one round with the other: real change over training mixed with lost power.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hessrank.analysis import inference as inf

__all__ = ["GRID_COLUMNS", "PROFILE_COLUMNS", "grid_columns", "round_profile", "subgrids"]

MIN_CHECKPOINTS = 4
"""Checkpoints a phase needs for two interleaved sub-grids of at least 2 each."""

GRID_COLUMNS = {
    "grid_check": "agrees / weaker / differs / too few checkpoints (k): the verdict on two "
                  "interleaved halves of the phase's checkpoints (hessrank.analysis.grid)",
    "verdict_subgrid_a": "verdict on the phase's 1st, 3rd, … checkpoints alone (empty with "
                         "fewer than 4 checkpoints)",
    "verdict_subgrid_b": "verdict on the phase's 2nd, 4th, … checkpoints alone",
    "round_signs": "per analyzed round of the phase, round:sign of the effect at that round "
                   "alone (+ above 0, - below 0, ~ holds 0; simultaneous over the "
                   "hypothesis's rounds)",
    "sign_change": "True when one round of the phase is significantly above 0 and another "
                   "below: the phase's verdict averages opposite effects",
}
"""Columns :func:`grid_columns` adds to ``hypotheses.csv``, with what they mean."""

PROFILE_COLUMNS = ["hypothesis", "round", "estimate", "stderr", "band_low", "band_high",
                   "confidence", "n_replicates", "sampling_unit", "sign"]
"""Columns of :func:`round_profile` (``profile.csv`` of a study)."""


def subgrids(rounds_by_phase: Mapping[str, Sequence[int]]) -> tuple[set[int], set[int]]:
    """(A, B): the rounds of every phase dealt alternately, in order (module doc)."""
    a, b = set(), set()
    for rounds in rounds_by_phase.values():
        rs = sorted(int(r) for r in rounds)
        a.update(rs[0::2])
        b.update(rs[1::2])
    return a, b


def round_profile(units: Mapping[str, pd.DataFrame], *, alpha: float = 0.05) -> pd.DataFrame:
    """Per hypothesis and analyzed round: the effect at that round alone with a band
    simultaneous over the hypothesis's rounds (module doc, 2). Columns
    :data:`PROFILE_COLUMNS`."""
    rows = []
    for name, frame in units.items():
        rounds = sorted(int(r) for r in frame["round"].unique())
        if not rounds:
            continue
        two_arms = bool((frame["arm"] == "b").any())
        confidence = 1 - alpha / len(rounds)
        for r in rounds:
            reps = inf.replicates_of(inf.phase_unit_means(frame, [r]), two_arms)
            if not reps:
                continue
            res = inf.replicate_t(reps)
            lo, hi = res.interval(confidence) if np.isfinite(res.stderr) else (np.nan, np.nan)
            sign = "+" if lo > 0 else "-" if hi < 0 else "~"
            rows.append({"hypothesis": name, "round": r, "estimate": res.estimate,
                         "stderr": res.stderr, "band_low": lo, "band_high": hi,
                         "confidence": confidence, "n_replicates": res.n_replicates,
                         "sampling_unit": res.sampling_unit, "sign": sign})
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def _grid_check(full: str, a: str, b: str, k: int) -> str:
    if k < MIN_CHECKPOINTS:
        return f"too few checkpoints ({k})"
    if a == full and b == full:
        return "agrees"
    if {a, b} <= {full, "inconclusive"} and full != "inconclusive":
        return "weaker"
    return "differs"


def grid_columns(hyp: pd.DataFrame, units: Mapping[str, pd.DataFrame],
                 test_kwargs: Mapping[str, Any], profile: pd.DataFrame) -> pd.DataFrame:
    """``hyp`` (from :func:`~hessrank.analysis.inference.test_hypotheses` with
    ``test_kwargs``) with the :data:`GRID_COLUMNS` added (module doc)."""
    phases = test_kwargs.get("phases") or inf.default_phases()
    last = test_kwargs.get("last_round")
    by_grid = {}
    for label, pick in (("a", 0), ("b", 1)):
        sub = {}
        for name, frame in units.items():
            by_phase = inf.assign_phases(frame["round"].unique(), phases, last)
            keep = subgrids(by_phase)[pick]
            part = frame[frame["round"].isin(sorted(keep))]
            if len(part):
                sub[name] = part
        got = inf.test_hypotheses(sub, **test_kwargs) if sub else pd.DataFrame(
            columns=inf.HYPOTHESES_COLUMNS)
        by_grid[label] = dict(zip(zip(got["hypothesis"], got["phase"]), got["verdict"]))
    out = hyp.copy()
    checks, va, vb, signs, change = [], [], [], [], []
    for row in hyp.itertuples(index=False):
        key = (row.hypothesis, row.phase)
        k = int(row.num_rounds)
        a = by_grid["a"].get(key, "") if k >= MIN_CHECKPOINTS else ""
        b = by_grid["b"].get(key, "") if k >= MIN_CHECKPOINTS else ""
        checks.append(_grid_check(row.verdict, a, b, k))
        va.append(a)
        vb.append(b)
        prof = profile[(profile["hypothesis"] == row.hypothesis)
                       & profile["round"].between(row.round_lo, row.round_hi)]
        signs.append(" ".join(f"{int(r)}:{s}" for r, s in zip(prof["round"], prof["sign"])))
        change.append(bool((prof["sign"] == "+").any() and (prof["sign"] == "-").any()))
    out["grid_check"], out["verdict_subgrid_a"], out["verdict_subgrid_b"] = checks, va, vb
    out["round_signs"], out["sign_change"] = signs, change
    return out
