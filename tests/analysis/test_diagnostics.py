"""Diagnostics for a reversal against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hessrank as hr
from hessrank.analysis import diagnostics as dg
from hessrank.linalg.stack import LinearCombination


@pytest.fixture(scope="module")
def small():
    """A tanh MLP (p = 27) on 40 samples of 3 classes in float64, moved off initialization so
    that H has negative eigenvalues; dense H and GGN by p products with the identity."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(3.0)
    loss = nn.functional.cross_entropy
    H = hr.HessianOperator(model, loss, (x, y))
    G = hr.GGNOperator(model, loss, (x, y))
    p = H.shape[1]
    eye = torch.eye(p, dtype=torch.float64)[None]
    return H, G, H.matmat(eye)[0], G.matmat(eye)[0]


def test_ggn_plus_residual_is_the_hessian(small):
    H, G, Hd, Gd = small
    p = Hd.shape[0]
    eye = torch.eye(p, dtype=torch.float64)[None]
    R = LinearCombination([H, G], [1, -1]).matmat(eye)[0]
    assert torch.allclose(Gd + R, Hd, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(Gd).min() > -1e-10  # the GGN of cross-entropy is PSD
    assert torch.linalg.eigvalsh(Hd).min() < -1e-3  # the test is not vacuous


def test_split_rows_match_dense(small):
    H, G, Hd, Gd = small
    p = Hd.shape[0]
    rows = dg.split_rows(H, G, num_matvecs=p + 12, seed=3)  # Krylov space = R^p: exact
    assert len(rows) == 12 and rows["subject"].eq("op0").all()
    for part, M in (("hessian", Hd), ("ggn", Gd), ("residual", Hd - Gd)):
        lam = torch.linalg.eigvalsh(M).numpy()
        got = rows[rows["part"] == part].set_index("quantity")["value"]
        fro = float(np.sum(lam ** 2))
        assert got["frobenius-sq"] == pytest.approx(fro, rel=1e-8)
        assert got["stable-rank"] == pytest.approx(fro / np.max(np.abs(lam)) ** 2, rel=1e-8)
        assert got["lambda-max"] == pytest.approx(lam.max(), rel=1e-8, abs=1e-12)
        assert got["lambda-min"] == pytest.approx(lam.min(), rel=1e-8, abs=1e-12)


def test_negative_mass_matches_dense(small):
    # Stated tolerance: with Lanczos steps = p each probe's quadrature is exact, so the only
    # error is the probe average; the estimate must lie within 4 jackknife stderr of the truth.
    H, _, Hd, _ = small
    lam = torch.linalg.eigvalsh(Hd).numpy()
    truth = float(np.sum(lam[lam < 0] ** 2) / np.sum(lam ** 2))
    dens = hr.spectral_density(H, num_probes=64, lanczos_steps=Hd.shape[0], seed=1)
    v, se = dg.negative_mass(dens)
    assert 0 < truth < 1 and np.isfinite(se[0]) and se[0] > 0
    assert abs(v[0] - truth) <= 4 * se[0]
    rows = dg.negative_mass_rows(dens, seed=1, subjects=[("server", "server", 40)])
    assert rows["value"].iloc[0] == pytest.approx(v[0])


def test_negative_mass_error_bar_covers():
    # Coverage over seeds on a rotated matrix with a known spectrum (a third of the mass < 0).
    rng = np.random.default_rng(0)
    lam = np.concatenate([-np.linspace(0.1, 1, 30), np.linspace(0.1, 1.3, 30)])
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    A = torch.as_tensor(Q @ np.diag(lam) @ Q.T)
    truth = float(np.sum(lam[lam < 0] ** 2) / np.sum(lam ** 2))
    hits = 0
    for seed in range(40):
        v, se = dg.negative_mass(hr.spectral_density(A, num_probes=16, lanczos_steps=30,
                                                      seed=seed))
        hits += abs(v[0] - truth) <= 2 * se[0]
    assert hits >= 32  # ~95 % nominal, 40 seeds


def test_outliers_counted_above_the_bulk():
    # 300 bulk eigenvalues in [-1, 2] and C = 10 outliers in [10, 40], in a random basis.
    rng = np.random.default_rng(1)
    lam = np.concatenate([np.linspace(-1, 2, 300), np.linspace(10, 40, 10)])
    Q, _ = np.linalg.qr(rng.standard_normal((310, 310)))
    A = torch.as_tensor(Q @ np.diag(lam) @ Q.T)
    rows = dg.outlier_rows(A, num_matvecs=80, density_probes=16, seed=0, num_classes=10)
    got = rows.set_index("quantity")["value"]
    assert got["num-outliers"] == 10 and got["num-classes"] == 10
    assert 2 <= got["bulk-edge"] < 10
    # no outliers: none found
    B = torch.as_tensor(Q @ np.diag(np.linspace(-1, 2, 310)) @ Q.T)
    none = dg.outlier_rows(B, num_matvecs=80, density_probes=16, seed=0)
    assert none.set_index("quantity")["value"]["num-outliers"] == 0


def test_diagnose_on_a_stack_names_every_subject(small):
    H, G, Hd, _ = small
    stackH = hr.OperatorStack([H, H])
    stackG = hr.OperatorStack([G, G])
    names = [("a", "subset", 40), ("b", "subset", 40)]
    rows = dg.diagnose(stackH, stackG, num_matvecs=20, density_probes=4, seed=0,
                       num_classes=3, subjects=names)
    assert list(rows.columns) == dg.COLUMNS
    assert set(rows["subject"]) == {"a", "b"}
    per = rows.groupby("subject").size()
    assert per["a"] == per["b"] == 12 + 1 + 4
    with pytest.raises(ValueError, match="subject names"):
        dg.diagnose(stackH, stackG, num_matvecs=20, subjects=names[:1])


@pytest.mark.slow
def test_run_diagnostics_on_a_trained_run(trained_run):
    t = dg.run_diagnostics(trained_run, seed=5, rounds=[0, 2],
                           subjects="server,subset:30x2", matvecs=12, density_probes=3)
    assert list(t.columns) == ["round", *dg.COLUMNS]
    assert set(t["round"]) == {0, 2}
    assert set(t["subject"]) == {"server", "subset30_0", "subset30_1"}
    fro = t[t["quantity"] == "frobenius-sq"]
    assert (fro["value"] > 0).all()
    ncls = t.loc[t["quantity"] == "num-classes", "value"]
    assert (ncls == 10).all()
    # the estimator seeds differ per (round, group): independent probe streams
    assert t.groupby(["round", "subject_kind"])["seed"].first().nunique() == 4
    with pytest.raises(ValueError, match="no checkpoints"):
        dg.run_diagnostics(trained_run, rounds=[7], subjects="server", matvecs=8)
    with pytest.raises(ValueError, match="server and subset"):
        dg.run_diagnostics(trained_run, rounds=[0], subjects="clients", matvecs=8)


def _fake_diagnostics(ggn_gap: float, seed: int = 0):
    """A diagnostics table of 3 replicates × rounds 0..2 × 4 draws each of n = 50 and 500,
    with log srank(GGN) larger at n = 50 by ``ggn_gap`` and no other difference."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for rep in range(3):
        for rnd in range(3):
            for n in (50, 500):
                for d in range(4):
                    base = dict(replicate=rep, round=rnd, subject=f"subset{n}_{d}",
                                subject_kind="subset", subject_size=n, stderr=0.0, matvecs=1,
                                seconds=0.0, seed=0)
                    noise = rng.normal(0, 0.01, 6)
                    vals = {("hessian", "stable-rank"): 5 + noise[0],
                            ("ggn", "stable-rank"): 4 * np.exp(ggn_gap * (n == 50) + noise[1]),
                            ("residual", "stable-rank"): 9 + noise[2],
                            ("hessian", "frobenius-sq"): 10.0,
                            ("residual", "frobenius-sq"): 1.0 + noise[3],
                            ("hessian", "negative-mass"): 0.01 + noise[4] / 100,
                            ("hessian", "lambda-min"): -0.1, ("hessian", "num-outliers"): 9}
                    rows += [{**base, "part": p, "quantity": q, "value": v}
                             for (p, q), v in vals.items()]
    return pd.DataFrame(rows)


def test_reversal_tests_and_summary():
    from hessrank.analysis.inference import Phase

    one = [Phase("all", 0.0, 1.0)]
    t = dg.reversal_tests(_fake_diagnostics(0.3), phases=one, num_resamples=400, seed=0)
    assert len(t) == len(dg.REVERSAL_TESTS)
    v = t.set_index("hypothesis")["verdict"]
    assert set(t["hypothesis"]) == {x[0] for x in dg.REVERSAL_TESTS}
    # no effect on the Hessian's stable rank, and precise: established as negligible
    assert v["ggn_srank"] == "supported" and v["hessian_srank"] == "negligible"
    est = t.set_index("hypothesis")["estimate"]
    assert est["ggn_srank"] == pytest.approx(0.3, abs=0.02)
    assert dg.reversal_tests(_fake_diagnostics(-0.3), phases=one,
                             num_resamples=400).set_index(
        "hypothesis")["verdict"]["ggn_srank"] == "reversed"
    s = dg.summarize(_fake_diagnostics(0.0))
    share = s[(s["quantity"] == "residual-share")]
    assert share["mean"].to_numpy() == pytest.approx(0.1, abs=0.01)
    assert (share["n"] == 12).all()  # 3 replicates × 4 draws
