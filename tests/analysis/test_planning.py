"""Replicate-aware planning: variance components recovered from simulated studies, the power
formulas and the replicates they ask for against simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hessrank.analysis import inference as inf
from hessrank.analysis import planning


def _study(rng, R, n, sb2, sw2, theta=0.0, two_arms=False):
    reps = []
    for _ in range(R):
        b = rng.normal(0, math.sqrt(sb2))
        a = theta + b + rng.normal(0, math.sqrt(sw2), n)
        reps.append((a, rng.normal(0, math.sqrt(2 * sw2), n // 2) if two_arms else None))
    return reps


@pytest.mark.parametrize("two_arms", [False, True])
def test_variance_components_recover_the_simulated_ones(two_arms):
    rng = np.random.default_rng(0)
    vc = planning.variance_components(_study(rng, 400, 20, 0.3, 0.7, two_arms=two_arms))
    assert vc.between == pytest.approx(0.3, rel=0.2)  # SD of the estimate ~ 8 %
    assert vc.within_a == pytest.approx(0.7, rel=0.05)
    assert vc.units_a == 20 and vc.n_replicates == 400
    if two_arms:
        assert vc.within_b == pytest.approx(1.4, rel=0.05) and vc.units_b == 10
        assert vc.replicate_variance() == pytest.approx(0.3 + 0.7 / 20 + 1.4 / 10, rel=0.1)
    else:
        assert math.isnan(vc.within_b)
    assert vc.replicate_variance(units_a=math.inf, units_b=math.inf) == vc.between
    one = planning.variance_components(_study(rng, 1, 20, 0.3, 0.7))
    assert math.isnan(one.between) and math.isnan(
        planning.replicates_needed(one.replicate_variance(), 0.1, 0.025))


@pytest.mark.parametrize("sb2, sw2, n, delta, K", [(0.5, 0.5, 20, 0.5, 1),
                                                   (0.2, 0.8, 5, 0.5, 12)])
def test_power_formulas_against_simulation(sb2, sw2, n, delta, K):
    # The share of studies in which the default test makes a claim whose true effect lies δ
    # beyond its threshold, at the level planning assumes (Holm's first step, α/K), against
    # the exact formulas at the replicates they ask for: 1000 studies, binomial SD ~1.3 %.
    level = planning.claim_level(0.05, K)
    var = sb2 + sw2 / n
    R = int(planning.replicates_needed(var, delta, level))
    assert planning.power_equivalence(var, R, delta, level) >= 0.8
    assert planning.power_equivalence(var, R - 1, delta, level) < 0.8
    rng = np.random.default_rng([R, K])
    for theta, want, formula in (
            (2 * delta, "supported", planning.power_directional(var, R, delta, level)),
            (0.0, "negligible", planning.power_equivalence(var, R, delta, level))):
        hits = 0
        for _ in range(1000):
            c = inf.claim(inf.replicate_t(_study(rng, R, n, sb2, sw2, theta)), delta)
            hits += c.claim == want and c.p_value < 2 * level
        assert hits / 1000 == pytest.approx(formula, abs=0.04), (want, hits / 1000, formula)


def test_more_units_cannot_replace_replicates():
    # with most of the variance between replicates, even unlimited units per replicate
    # leave most of the replicates needed
    vc = planning.VarianceComponents(between=0.9, within_a=0.1, within_b=float("nan"),
                                     units_a=10, units_b=float("nan"), n_replicates=5)
    level = planning.claim_level(0.05, 12)
    at_pilot = planning.replicates_needed(vc.replicate_variance(), 0.2, level)
    unlimited = planning.replicates_needed(vc.replicate_variance(math.inf), 0.2, level)
    assert unlimited > 0.95 * at_pilot > 100
    assert vc.icc == pytest.approx(0.9 / 0.91)


def test_plan_table():
    rng = np.random.default_rng(2)
    comps = [planning.variance_components(_study(rng, 5, 10, 0.2, 0.8)) for _ in range(3)]
    rows = [{"hypothesis": "h", "phase": p, "min_effect": 0.5} for p in ("a", "b", "c")]
    plan = planning.plan(rows, comps, alpha=0.05)
    assert list(plan.columns) == planning.PLAN_COLUMNS
    assert len(plan) == 3 * 4 and set(plan["units_factor"]) == {1, 2, 4, math.inf}
    for _, g in plan.groupby("phase"):  # more units per replicate never need more replicates
        assert g.sort_values("units_factor")["replicates_needed"].is_monotonic_decreasing
    with pytest.raises(ValueError, match="at least one test"):
        planning.claim_level(0.05, 0)
