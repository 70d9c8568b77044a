"""Checkpoint-grid checks of the verdicts: interleaved sub-grids and the per-round profile."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hessrank.analysis import grid
from hessrank.analysis import inference as inf


def _units(effect_at, rounds, R=8, n=10, seed=0):
    """One-arm units frame: unit j of replicate i at round r = effect_at(r) + b_i + u_ij + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(R):
        b, u = rng.normal(0, 0.05), rng.normal(0, 0.1, n)
        for r in rounds:
            rows += [(i, r, "a", f"u{j}", effect_at(r) + b + u[j] + rng.normal(0, 0.02))
                     for j in range(n)]
    return pd.DataFrame(rows, columns=inf.UNIT_COLUMNS)


def test_subgrids_interleave_within_each_phase():
    a, b = grid.subgrids({"early": [0, 5, 10, 15], "late": [20, 25, 30]})
    assert a == {0, 10, 20, 30} and b == {5, 15, 25}


def _checked(units, phases, last):
    kwargs = dict(min_effect=dict.fromkeys(units, 0.1), phases=phases, last_round=last)
    hyp = inf.test_hypotheses(units, **kwargs)
    return grid.grid_columns(hyp, units, kwargs, grid.round_profile(units))


def test_a_steady_effect_agrees_and_a_sign_change_is_flagged():
    rounds = list(range(0, 80, 5))  # 16 checkpoints
    phases = [inf.Phase("first", 0, 35, absolute=True), inf.Phase("second", 40, 75,
                                                                    absolute=True)]
    steady = _units(lambda r: 0.5, rounds)
    flips = _units(lambda r: 0.5 if r < 20 or r >= 40 else -0.5, rounds, seed=1)
    out = _checked({"steady": steady, "flips": flips}, phases, 75)
    v = out.set_index(["hypothesis", "phase"])
    assert v.loc[("steady", "first"), "grid_check"] == "agrees"
    assert v.loc[("steady", "first"), "verdict_subgrid_a"] == "supported"
    assert not v["sign_change"].loc["steady"].any()
    # flips: +0.5 at rounds 0–15, −0.5 at 20–35: the first phase averages to ~0
    assert v.loc[("flips", "first"), "sign_change"]
    assert v.loc[("flips", "first"), "round_signs"].startswith("0:+ 5:+")
    assert "20:-" in v.loc[("flips", "first"), "round_signs"]
    assert not v.loc[("flips", "second"), "sign_change"]
    assert list(out.columns[-5:]) == list(grid.GRID_COLUMNS)


def test_a_phase_of_few_checkpoints_is_not_checked_and_a_change_inside_differs():
    rounds = [0, 5, 10, 15, 20, 25, 30]
    phases = [inf.Phase("early", 0, 5, absolute=True), inf.Phase("rest", 10, 30,
                                                                 absolute=True)]
    # "rest": clear at rounds 10, 20, 30 (sub-grid A), ~0 at 15 and 25 (sub-grid B)
    units = {"h": _units(lambda r: 0.6 if r in (10, 20, 30) else 0.0, rounds)}
    v = _checked(units, phases, 30).set_index("phase")
    assert v.loc["early", "grid_check"] == "too few checkpoints (2)"
    assert v.loc["early", "verdict_subgrid_a"] == ""
    assert v.loc["rest", "verdict_subgrid_a"] == "supported"
    assert v.loc["rest", "verdict_subgrid_b"] == "negligible"
    assert v.loc["rest", "grid_check"] == "differs"


def test_profile_bands_are_simultaneous_over_rounds():
    units = {"h": _units(lambda r: 0.0, [0, 1, 2, 3])}
    prof = grid.round_profile(units, alpha=0.05)
    assert list(prof.columns) == grid.PROFILE_COLUMNS and len(prof) == 4
    assert np.allclose(prof["confidence"], 1 - 0.05 / 4)
    assert (prof["n_replicates"] == 8).all() and (prof["sign"] == "~").all()
