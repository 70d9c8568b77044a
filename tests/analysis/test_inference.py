"""Inference on synthetic studies of known effect: coverage, reversal, null, multiplicity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hessrank.analysis import inference as inf


def _study(rng, effect, R=6, n_a=10, n_b=5, tau=0.5, sigma=1.0):
    """R replicates; replicate i has its own shift u_i ~ N(0, τ²) in the difference."""
    reps = []
    for _ in range(R):
        u = rng.normal(0, tau)
        reps.append((rng.normal(effect + u, sigma, n_a), rng.normal(0.0, sigma, n_b)))
    return reps


def test_cluster_bootstrap_covers_the_true_difference():
    # 200 synthetic studies with between-replicate variation: a 95 % CI must cover ≥ 90 %.
    rng = np.random.default_rng(1)
    hits = 0
    for s in range(200):
        r = inf.cluster_bootstrap(_study(rng, 0.3), num_resamples=500, seed=s)
        hits += r.ci_low <= 0.3 <= r.ci_high
    assert hits / 200 >= 0.90


def test_bootstrap_pvalue_under_the_null_is_not_anticonservative():
    rng = np.random.default_rng(2)
    p = np.array([inf.cluster_bootstrap(_study(rng, 0.0), num_resamples=500, seed=s).p_value
                  for s in range(200)])
    assert np.mean(p < 0.05) <= 0.10  # nominal 5 %, binomial sd 1.5 % over 200 studies


def test_single_replicate_uses_units_and_estimate_is_the_difference_of_means():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0])
    r = inf.cluster_bootstrap([(a, b)], num_resamples=500, seed=0)
    assert r.estimate == pytest.approx(1.5)
    assert r.n_replicates == 1 and r.n_units == 5
    assert r.ci_low < 1.5 < r.ci_high


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one replicate"):
        inf.cluster_bootstrap([(np.array([]), None)])
    with pytest.raises(ValueError, match="num_resamples"):
        inf.cluster_bootstrap([(np.ones(3), None)], num_resamples=10)


def _units(rng, effects_by_round, R=5, n_a=30, n_b=10, sigma=0.3):
    """Units frame: draws of arm a shifted by effects_by_round[r] at round r (draws persist
    across rounds, as subset draws do), arm b at 0."""
    rows = []
    for rep in range(R):
        base_a = rng.normal(0, sigma, n_a)
        base_b = rng.normal(0, sigma, n_b)
        for r, eff in effects_by_round.items():
            rows += [(rep, r, "a", f"a{j}", base_a[j] + eff + rng.normal(0, 0.05))
                     for j in range(n_a)]
            rows += [(rep, r, "b", f"b{j}", base_b[j] + rng.normal(0, 0.05)) for j in range(n_b)]
    return pd.DataFrame(rows, columns=inf.UNIT_COLUMNS)


def test_holds_early_reverses_late():
    rng = np.random.default_rng(3)
    effects = {0: 1.0, 10: 0.8, 20: 0.6, 40: 0.0, 50: 0.0, 70: -0.4, 80: -0.4, 90: -0.4}
    hyp = inf.test_hypotheses({"h": _units(rng, effects)}, min_effect={"h": 0.1},
                              num_resamples=2000, seed=0)
    v = dict(zip(hyp["phase"], hyp["verdict"]))
    assert v == {"early": "supported", "middle": "inconclusive", "late": "reversed"}
    late = hyp[hyp["phase"] == "late"].iloc[0]
    assert late["ci_high"] < 0 and late["round_lo"] == 70 and late["round_hi"] == 90
    assert list(hyp.columns) == inf.HYPOTHESES_COLUMNS


def test_null_is_inconclusive_and_rounds_are_not_units():
    rng = np.random.default_rng(4)
    frame = _units(rng, {r: 0.0 for r in range(0, 100, 5)}, R=3)
    hyp = inf.test_hypotheses({"h": frame}, min_effect={"h": 0.1}, num_resamples=1000)
    assert (hyp["verdict"] == "inconclusive").all()
    # 3 replicates × 40 units, whatever the number of rounds per phase
    assert (hyp["n_units"] == 120).all() and (hyp["n_replicates"] == 3).all()


def test_significant_but_below_min_effect_is_inconclusive():
    rng = np.random.default_rng(5)
    frame = _units(rng, {0: 0.04, 1: 0.04}, R=6, sigma=0.01)
    hyp = inf.test_hypotheses({"h": frame}, min_effect={"h": 0.1},
                              phases=[inf.Phase("all", 0, 1)], num_resamples=1000)
    row = hyp.iloc[0]
    assert row["p_adjusted"] < 0.05 and row["ci_low"] > 0
    assert row["verdict"] == "inconclusive"


def test_verdict_rule():
    assert inf.verdict(0.5, 0.01, 0.1) == "supported"
    assert inf.verdict(-0.5, 0.01, 0.1) == "reversed"
    assert inf.verdict(0.5, 0.2, 0.1) == "inconclusive"
    assert inf.verdict(0.05, 0.001, 0.1) == "inconclusive"
    with pytest.raises(ValueError, match="min_effect"):
        inf.verdict(0.5, 0.01, 0.0)
    with pytest.raises(ValueError, match="min_effect"):
        inf.test_hypotheses({"h": pd.DataFrame(columns=inf.UNIT_COLUMNS)}, min_effect={})


def test_holm_and_bh_adjustments():
    # statsmodels' multipletests runs gc.collect() per call, so the values are checked against
    # hand-computed Holm / BH adjustments rather than by a loop of simulated families.
    p = np.array([0.001, 0.01, 0.02, 0.04])
    holm, bh = inf.adjust_pvalues(p, "holm"), inf.adjust_pvalues(p, "bh")
    np.testing.assert_allclose(holm, [0.004, 0.03, 0.04, 0.04])
    np.testing.assert_allclose(bh, [0.004, 0.02, 0.02 * 4 / 3, 0.04])
    with pytest.raises(ValueError, match="holm or bh"):
        inf.adjust_pvalues(p, "bonferroni")


def test_a_family_of_null_tests_yields_no_verdict():
    # 12 null hypotheses × 3 phases in one family: unadjusted, some p < 0.05 are expected by
    # chance; after Holm none may count.
    rng = np.random.default_rng(6)
    units = {f"h{i}": _units(rng, {0: 0.0, 50: 0.0, 100: 0.0}, R=4, n_a=8, n_b=4)
             for i in range(12)}
    hyp = inf.test_hypotheses(units, min_effect=dict.fromkeys(units, 0.01),
                              num_resamples=1000, seed=1)
    assert len(hyp) == 36
    assert (hyp["verdict"] == "inconclusive").all()
    assert (hyp["p_adjusted"] >= hyp["p_value"]).all()


def test_phases():
    got = inf.assign_phases([0, 10, 33, 34, 66, 67, 100], inf.default_phases())
    assert got == {"early": [0, 10, 33], "middle": [34, 66], "late": [67, 100]}
    ph = inf.phases_by_loss([0, 10, 20, 30, 40], [2.0, 1.0, 0.5, 0.1, 0.0])
    assert [(p.name, p.lo, p.hi) for p in ph] == [("early", 0, 0), ("middle", 10, 10),
                                                  ("late", 20, 40)]


def test_power_rule_and_jackknife():
    assert inf.required_units(1.0, 1.0) == 16  # 2·(1.96 + 0.84)² = 15.7
    assert inf.required_units(1.0, 1.0, arms=1) == 8
    v = np.random.default_rng(7).normal(size=25)
    mean, se = inf.jackknife(v)
    assert mean == pytest.approx(v.mean()) and se == pytest.approx(v.std(ddof=1) / 5)
    D = np.ones((4, 4))
    assert inf.offdiag_mean_jackknife(D) == pytest.approx((1.0, 0.0))
    assert math.isnan(inf.offdiag_mean_jackknife(np.ones((2, 2)))[1])


def _table():
    rows = []
    for r in (0, 5):
        rows.append((r, "server", "server", 100, 10.0, 0.1))
        for c, v in enumerate((12.0, 14.0, 9.0)):
            rows.append((r, f"client{c}", "client", 30, v + r, 0.1))
    t = pd.DataFrame(rows, columns=["round", "subject", "subject_kind", "subject_size",
                                    "value", "stderr"])
    return t.assign(quantity="stable-rank", k=0)


def test_units_from_an_analysis_table_and_summary():
    t = _table()
    u = inf.client_server_units(t)
    assert sorted(u.loc[u["round"] == 0, "value"]) == [-1.0, 2.0, 4.0]
    s = inf.client_vs_server_summary(t)
    row = s[s["round"] == 0].iloc[0]
    assert row["client_mean"] == pytest.approx(35 / 3) and row["num_clients"] == 3
    assert row["frac_clients_above"] == pytest.approx(2 / 3)
    assert row["frac_clients_above_2se"] == pytest.approx(2 / 3)
    sub = t.assign(subject_kind=t["subject_kind"].replace("client", "subset"))
    su = inf.subset_size_units(sub, 30, "server", transform="log")
    assert set(su["arm"]) == {"a", "b"}
    with pytest.raises(ValueError, match="sizes"):
        inf.subset_size_units(sub, 31, 100)


def test_a_replicate_missing_an_arm_is_dropped_not_read_as_one_sample():
    rng = np.random.default_rng(8)
    frame = _units(rng, {0: 1.0}, R=3)
    frame = frame[~((frame["replicate"] == 2) & (frame["arm"] == "b"))]
    hyp = inf.test_hypotheses({"h": frame}, min_effect={"h": 0.1},
                              phases=[inf.Phase("all", 0, 1)], num_resamples=500)
    assert hyp["n_replicates"].iloc[0] == 2
    assert hyp["estimate"].iloc[0] == pytest.approx(1.0, abs=0.3)
