"""Inference on synthetic studies of known effect: error rates of the default and of the former
bootstrap, the four verdicts, multiplicity with adjusted intervals, phases and units."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hessrank.analysis import inference as inf


def _studies(rng, S, R, n, icc, theta):
    """S studies of x_ij = θ + b_i + e_ij (total variance 1, ICC between replicates), one arm,
    as lists of replicates."""
    b = rng.normal(0, math.sqrt(icc), size=(S, R, 1))
    x = theta + b + rng.normal(0, math.sqrt(1 - icc), size=(S, R, n))
    return [[(row, None) for row in study] for study in x]


def _rates(studies, method, theta, **kw):
    cover = reject = 0
    for s, reps in enumerate(studies):
        r = inf.infer_one(reps, method, seed=s, **kw)
        lo, hi = r.interval(0.95)
        cover += lo <= theta <= hi
        reject += r.p_two_sided(0.0) < 0.05
    return cover / len(studies), reject / len(studies)


def test_replicate_t_holds_coverage_and_fpr_where_the_percentile_bootstrap_fails():
    # R = 5 replicates of 10 units, half the variance between replicates (issue 20's case).
    # Target: 95 % CI coverage in [93 %, 97.5 %], false positives <= 6 %.
    rng = np.random.default_rng(11)
    cov, _ = _rates(_studies(rng, 1000, 5, 10, 0.5, theta=0.3), "t", 0.3)
    _, fpr = _rates(_studies(rng, 1000, 5, 10, 0.5, theta=0.0), "t", 0.0)
    assert 0.93 <= cov <= 0.975 and fpr <= 0.06  # binomial SD 0.7 % over 1000 studies
    # the former default on 200 studies of the same kind: outside the band on both counts
    # (expected ~87 % and ~13 %; binomial SD ~2.4 %)
    cov_old, _ = _rates(_studies(rng, 200, 5, 10, 0.5, theta=0.3), "percentile", 0.3,
                        num_resamples=1000)
    _, fpr_old = _rates(_studies(rng, 200, 5, 10, 0.5, theta=0.0), "percentile", 0.0,
                        num_resamples=1000)
    assert cov_old < 0.93 and fpr_old > 0.06


def test_replicate_t_is_the_t_test_on_replicate_means():
    rng = np.random.default_rng(1)
    reps = [(rng.normal(1.0, 1.0, 7), rng.normal(0.0, 1.0, 4)) for _ in range(6)]
    d = np.array([a.mean() - b.mean() for a, b in reps])
    r = inf.replicate_t(reps)
    from scipy import stats

    want = stats.ttest_1samp(d, 0.0)
    assert r.estimate == pytest.approx(d.mean()) and r.df == 5
    assert r.stderr == pytest.approx(d.std(ddof=1) / math.sqrt(6))
    assert r.p_two_sided(0.0) == pytest.approx(want.pvalue)
    lo, hi = r.interval(0.9)
    ci = want.confidence_interval(0.9)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    assert r.sampling_unit == "replicate" and r.n_units == 6 * 11


def test_exact_pvalues_have_no_resampling_floor():
    rng = np.random.default_rng(2)
    reps = [(rng.normal(5.0, 0.1, 10), None) for _ in range(8)]
    assert inf.replicate_t(reps).p_two_sided(0.0) < 1e-10
    boot = inf.cluster_bootstrap(reps, num_resamples=500, seed=0)
    assert boot.p_two_sided(0.0) == pytest.approx(2 / 501)  # the bootstrap's floor


def test_one_replicate_uses_its_units_and_says_so():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0])
    r = inf.replicate_t([(a, b)])
    assert r.estimate == pytest.approx(1.5) and r.sampling_unit == "unit"
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 2
    assert r.stderr == pytest.approx(math.sqrt(va + vb))  # Welch
    assert r.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 1))
    with pytest.raises(ValueError, match="at least 2"):
        inf.bootstrap_t([(a, b)])
    with pytest.raises(ValueError, match="at least 2"):
        inf.mixed_model([(a, b)])


def test_other_methods_agree_on_a_clear_effect():
    rng = np.random.default_rng(3)
    reps = [(rng.normal(1.0 + rng.normal(0, 0.3), 1.0, 20), None) for _ in range(8)]
    t = inf.replicate_t(reps)
    for method in ("bootstrap-t", "percentile", "mixedlm"):
        r = inf.infer_one(reps, method, num_resamples=1000, seed=0)
        assert r.estimate == pytest.approx(t.estimate, abs=1e-6)
        lo, hi = r.interval(0.95)
        assert 0.2 < lo < t.estimate < hi and r.p_two_sided(0.0) < 0.05, method
    with pytest.raises(ValueError, match="unknown inference method"):
        inf.infer_one(reps, "wald")
    with pytest.raises(ValueError, match="num_resamples"):
        inf.cluster_bootstrap(reps, num_resamples=10)
    with pytest.raises(ValueError, match="at least one replicate"):
        inf.replicate_t([(np.array([]), None)])


# ---- the four verdicts --------------------------------------------------------------------------
def _fixed(estimate, stderr, df=9.0):
    return inf.Inference("t", estimate, stderr, df, 10, 100)


def test_claims_read_from_the_interval():
    d = 0.1
    assert inf.verdict(_fixed(0.5, 0.05), d) == "supported"
    assert inf.verdict(_fixed(-0.5, 0.05), d) == "reversed"
    assert inf.verdict(_fixed(0.0, 0.01), d) == "negligible"
    assert inf.verdict(_fixed(0.12, 0.05), d) == "inconclusive"  # CI crosses +δ
    assert inf.verdict(_fixed(0.5, 0.3), d) == "inconclusive"
    # the claim's p-value is twice the one-sided one: the verdict ⟺ the (1 − α) CI
    r = _fixed(0.3, 0.08)
    c = inf.claim(r, d)
    lo, _ = r.interval(1 - c.p_value)
    assert c.claim == "supported" and lo == pytest.approx(d)
    with pytest.raises(ValueError, match="min_effect"):
        inf.claim(r, 0.0)


@pytest.mark.parametrize("theta, true", [(0.25, None), (0.0, "negligible"), (-0.25, None)])
def test_four_verdicts_at_delta_zero_and_minus_delta(theta, true):
    # 20 replicates of 20 units, ICC 0.05, δ = 0.25. At θ = ±δ no claim is true: each wrong
    # verdict must stay below α/2 = 2.5 % (600 studies, binomial SD 0.6 %); at θ = 0 only
    # "negligible" is true, and with se = √((0.05 + 0.95/20)/20) = 0.07 (δ/se = 3.6 against
    # t = 2.09) it is found ~85 % of the time.
    rng = np.random.default_rng(int(100 * theta) + 50)
    counts = dict.fromkeys(inf.VERDICTS, 0)
    for reps in _studies(rng, 600, 20, 20, 0.05, theta):
        counts[inf.verdict(inf.replicate_t(reps), 0.25)] += 1
    share = {k: v / 600 for k, v in counts.items()}
    for wrong in ("supported", "reversed", "negligible"):
        if wrong != true:
            assert share[wrong] <= 0.04, (wrong, share)
    if true == "negligible":
        assert share["negligible"] > 0.7
    if theta > 0:
        assert share["reversed"] == 0 and share["supported"] > 0.005  # the boundary is reached
    if theta < 0:
        assert share["supported"] == 0 and share["reversed"] > 0.005


def test_the_former_rule_claimed_an_effect_at_the_boundary_too_often():
    # issue 20: "p < α for θ = 0, then θ̂ ≥ δ" said supported about half the time at θ = δ;
    # the one-sided test of θ ≤ δ says it at most α/2 of the time (test above).
    rng = np.random.default_rng(7)
    hits = 0
    for reps in _studies(rng, 300, 20, 20, 0.05, 0.25):  # precise: θ = 0 is always rejected
        r = inf.replicate_t(reps)
        hits += r.p_two_sided(0.0) < 0.05 and r.estimate >= 0.25
    assert hits / 300 > 0.35  # ~50 %


# ---- multiplicity ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["holm", "bh"])
def test_adjusted_pvalues_equal_statsmodels_and_agree_with_the_levels(method):
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 0.05, 20) ** 2, rng.uniform(0, 1, 30), [0.01, 0.01]])
    np.testing.assert_allclose(inf.adjust_pvalues(p, method),
                               multipletests(p, method=inf.ADJUSTMENTS[method])[1])
    for _ in range(200):
        p = rng.uniform(0, 0.1, size=rng.integers(1, 15)) ** 2
        adj = inf.adjust_pvalues(p, method)
        lv = inf.adjusted_levels(p, 0.05, method)
        np.testing.assert_array_equal(adj < 0.05, p < lv)
    with_nan = inf.adjust_pvalues([0.01, np.nan, 0.02], method)
    assert np.isnan(with_nan[1]) and np.allclose(with_nan[[0, 2]],
                                                 inf.adjust_pvalues([0.01, 0.02], method))


def test_holm_levels_by_hand():
    p = [0.001, 0.04, 0.01, 0.5]
    np.testing.assert_allclose(inf.adjusted_levels(p, 0.05), [0.0125, 0.025, 0.05 / 3, 0.025])
    np.testing.assert_allclose(inf.adjust_pvalues(p, "holm"), [0.004, 0.08, 0.03, 0.5])
    np.testing.assert_allclose(inf.adjust_pvalues([0.001, 0.01, 0.02, 0.04], "bh"),
                               [0.004, 0.02, 0.02 * 4 / 3, 0.04])
    with pytest.raises(ValueError, match="holm or bh"):
        inf.adjust_pvalues(p, "bonferroni")


def test_decide_reads_each_verdict_from_its_adjusted_interval():
    results = [_fixed(e, s) for e, s in [(0.5, 0.05), (0.13, 0.01), (0.0, 0.02), (-0.3, 0.05),
                                         (0.05, 0.2)]]
    table = inf.decide(results, [0.1] * 5)
    assert table["verdict"].tolist() == ["supported", "supported", "negligible", "reversed",
                                         "inconclusive"]
    lo, hi = table["ci_low_adjusted"], table["ci_high_adjusted"]
    decided = table["verdict"] != "inconclusive"
    readable = np.where(lo > 0.1, "supported", np.where(hi < -0.1, "reversed", np.where(
        (lo > -0.1) & (hi < 0.1), "negligible", "inconclusive")))
    assert (readable == table["verdict"]).all()
    assert (table.loc[decided, "confidence_adjusted"] >= 0.95).all()
    assert (table["ci_high_adjusted"] - table["ci_low_adjusted"]
            >= table["ci_high"] - table["ci_low"] - 1e-12).all()


# ---- whole studies -----------------------------------------------------------------------------
def _units(rng, effects_by_round, R=5, n_a=30, n_b=10, sigma=0.3, tau=0.0):
    """Units frame: draws of arm a shifted by effects_by_round[r] at round r (draws persist
    across rounds, as subset draws do), arm b at 0; replicate shift ~ N(0, τ²)."""
    rows = []
    for rep in range(R):
        base_a = rng.normal(0, sigma, n_a) + rng.normal(0, tau)
        base_b = rng.normal(0, sigma, n_b)
        for r, eff in effects_by_round.items():
            rows += [(rep, r, "a", f"a{j}", base_a[j] + eff + rng.normal(0, 0.05))
                     for j in range(n_a)]
            rows += [(rep, r, "b", f"b{j}", base_b[j] + rng.normal(0, 0.05)) for j in range(n_b)]
    return pd.DataFrame(rows, columns=inf.UNIT_COLUMNS)


def test_holds_early_is_negligible_in_the_middle_and_reverses_late():
    rng = np.random.default_rng(3)
    effects = {0: 1.0, 10: 0.8, 20: 0.6, 40: 0.0, 50: 0.0, 70: -0.4, 80: -0.4, 90: -0.4}
    hyp = inf.test_hypotheses({"h": _units(rng, effects, R=8)}, min_effect={"h": 0.2})
    v = dict(zip(hyp["phase"], hyp["verdict"]))
    assert v == {"early": "supported", "middle": "negligible", "late": "reversed"}
    late = hyp[hyp["phase"] == "late"].iloc[0]
    assert late["ci_high_adjusted"] < -0.2 and late["round_lo"] == 70 and late["round_hi"] == 90
    assert list(hyp.columns) == inf.HYPOTHESES_COLUMNS
    assert (hyp["method"] == "t").all() and (hyp["n_replicates"] == 8).all()
    assert (hyp["replicates_needed"] >= 2).all()


def test_rounds_are_not_units_and_a_null_is_never_supported():
    rng = np.random.default_rng(4)
    frame = _units(rng, {r: 0.0 for r in range(0, 100, 5)}, R=3, tau=0.3)
    hyp = inf.test_hypotheses({"h": frame}, min_effect={"h": 0.1})
    assert not hyp["verdict"].isin(["supported", "reversed"]).any()
    # 3 replicates × 40 units, whatever the number of rounds per phase
    assert (hyp["n_units"] == 120).all() and (hyp["n_replicates"] == 3).all()
    assert (hyp["df"] == 2).all()


def test_a_family_of_null_tests_yields_no_directional_verdict():
    rng = np.random.default_rng(6)
    units = {f"h{i}": _units(rng, {0: 0.0, 50: 0.0, 100: 0.0}, R=4, n_a=8, n_b=4, tau=0.2)
             for i in range(12)}
    hyp = inf.test_hypotheses(units, min_effect=dict.fromkeys(units, 0.01))
    assert len(hyp) == 36
    assert not hyp["verdict"].isin(["supported", "reversed"]).any()
    assert (hyp["p_adjusted"] >= hyp["p_value"]).all()


def test_test_hypotheses_checks_its_arguments():
    frame = _units(np.random.default_rng(0), {0: 0.0})
    with pytest.raises(ValueError, match="min_effect"):
        inf.test_hypotheses({"h": frame}, min_effect={})
    with pytest.raises(ValueError, match="unknown inference method"):
        inf.test_hypotheses({"h": frame}, min_effect={"h": 0.1}, method="z")


def test_phases():
    got = inf.assign_phases([0, 10, 33, 34, 66, 67, 100], inf.default_phases())
    assert got == {"early": [0, 10, 33], "middle": [34, 66], "late": [67, 100]}
    ph = inf.phases_by_loss([0, 10, 20, 30, 40], [2.0, 1.0, 0.5, 0.1, 0.0])
    assert [(p.name, p.lo, p.hi) for p in ph] == [("early", 0, 0), ("middle", 10, 10),
                                                  ("late", 20, 40)]


def test_jackknife():
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
                              phases=[inf.Phase("all", 0, 1)])
    assert hyp["n_replicates"].iloc[0] == 2
    assert hyp["estimate"].iloc[0] == pytest.approx(1.0, abs=0.3)


def test_wrong_verdicts_in_a_family_of_correlated_rows_stay_below_alpha():
    # 12 rows sharing most of their replicate effects (as the phases of one study do), some
    # at the boundaries ±δ, some clearly beyond them, some inside: the chance of any wrong
    # verdict in the family must stay at most α = 5 % (300 families; without the adjustment
    # the same families exceed it).
    rng = np.random.default_rng(12)
    delta = 0.25
    thetas = [1.2 * delta, 0.8 * delta, -1.2 * delta, -0.8 * delta, 0.0, 0.0, 3.0, -3.0,
              delta, -delta, 0.5, -0.5]
    truth = ["supported" if t > delta else "reversed" if t < -delta else
             "negligible" if abs(t) < delta else None for t in thetas]
    wrong = unadjusted = 0
    for _ in range(300):
        common = rng.normal(0, math.sqrt(0.5), 5)
        claims = []
        for t in thetas:
            b = math.sqrt(0.8) * common + math.sqrt(0.2) * rng.normal(0, math.sqrt(0.5), 5)
            x = t + b[:, None] + rng.normal(0, math.sqrt(0.5), (5, 10))
            claims.append(inf.claim(inf.replicate_t([(row, None) for row in x]), delta))
        p_adj = inf.adjust_pvalues([c.p_value for c in claims])
        wrong += any(p < 0.05 and c.claim != want for c, p, want in zip(claims, p_adj, truth))
        unadjusted += any(c.p_value < 0.05 and c.claim != want for c, want in zip(claims, truth))
    assert wrong / 300 <= 0.05 < unadjusted / 300
