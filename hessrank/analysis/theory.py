"""A spiked random-matrix model of the rank-discrepancy theorem (Wigner + BBP; Baik, Ben Arous &
Péché 2005; Benaych-Georges & Nadakuditi 2011).

The Hessian of a loss over n samples is modelled as a fixed low-rank signal plus sampling noise

    H_n = Σ_{i≤k} θ_i u_i u_iᵀ + (τ/√n) U G_k Uᵀ + (σ/√n) W,      s := σ/√n,

with W a p×p GOE matrix (off-diagonal entries of variance 1/p, diagonal 2/p; its spectrum
fills the semicircle on [−2, 2]), U = [u_1 … u_k] orthonormal, and G_k a k×k GOE matrix with
off-diagonal variance 1 (τ = 0 by default: the plain model of the theorem). A client (n = n_c)
and the server (n = N) are independent draws. The τ term is sampling noise *inside* the
outlier subspace: at a trained point the outliers come from class means (Papyan 2020), and a
subset's label frequencies fluctuate by O(1/√n), which moves the outliers themselves.

Large-p prediction (``predict_stable_rank``). For τ = 0:
- an outlier with |θ| > s sits at θ̃ = θ + s²/θ; one with |θ| ≤ s sinks into the bulk;
- the bulk is a semicircle of radius 2s and ‖H_n‖_F² = Σ θ_i² + (p + 1) s² in expectation
  (exactly, for this W; its fluctuation is O(1) against p·s², i.e. O(1/p) relatively);
- so srank(n) = (Σ θ_i² + (p + 1) σ²/n) / max(|θ̃_1|, 2s)².
With τ > 0 the outliers μ_j are the eigenvalues of diag(θ) + (τ/√n) G_k, each pushed out by
s²/μ_j as above, ‖H_n‖_F² gains ‖M‖_F², and the prediction averages the ratio over draws of
the k×k matrix (a cheap Monte Carlo in k dimensions, seeded).

Does the model predict the late reversal (srank at small n *below* srank at large n)?
Write x = s² = σ²/n and Θ² = Σθ_i². In the outlier regime (x < θ_1²), with τ = 0,

    f(x) = θ_1² (Θ² + p x) / (θ_1² + x)²,   f'(x) ∝ p θ_1² − 2Θ² − p x,

so srank *grows* as n shrinks while x < x* = θ_1² − 2Θ²/p and falls beyond (past the BBP
point, x > θ_1², f = p/4 + Θ²/(4x) falls towards p/4). A reversal between n_small < n_large
therefore needs σ²/n_large ≳ x*, i.e. noise as large as the top outlier itself (a flat,
noise-dominated spectrum). For a trained spectrum (few dominant outliers, small bulk:
θ_1² ≫ σ²/n, and Θ²/θ_1² ≤ k ≪ p/2) f'(0) > 0 always: the plain model predicts the small-n
stable rank **above** the large-n one, i.e. it does NOT produce the late reversal. Its only
reversal is past the BBP point, in a pure-noise spectrum, where srank = p/4 + Θ²/(4x) falls
towards p/4 as n shrinks, by a negligible amount. Numbers (``reversal_table``, p = 2000,
n = 50 vs 500):

    spectrum                                     τ      srank(50)  srank(500)
    trained: ten outliers θ = 1.0 … 0.55, σ=0.1   0         6.61       6.25
    trained, larger bulk, σ = 0.5                 0        16.06       7.21
    initial-like: one outlier θ = 1, σ = 4        0       368.1       61.1
    pure noise: θ = 0.3 (< s), σ = 8              0       500.3      500.4
    trained, σ = 0.1                              0.25      5.92       6.18   (reversal)
    trained, σ = 0.2                              0.5       5.69       6.07   (reversal)
    trained, σ = 0.5                              0.5      11.36       6.86

What does reverse late is the τ term. Several comparable outliers mixed by sampling noise
inside their own subspace push the top eigenvalue up at first order in 1/√n,
λ_1 ≈ θ_1 + c_k τ/√n (c_k = the expected top eigenvalue of the k×k mixing, ≤ 2√k), while the
bulk adds mass at order 1/n only: log srank(n) ≈ log(Θ²/θ_1²) + pσ²/(nΘ²) − 2c_k τ/(√n θ_1),
so small n has the *lower* stable rank when √n > pσ²θ_1/(2 c_k τ Θ²) — a small bulk (trained
network, small p·σ²), several similar outliers (large c_k, e.g. one per class) and n not too
small. At initialization (a large bulk, p·σ²/n ≫ Θ², one weak outlier) the bulk term wins by
far and small n has the much larger stable rank, as measured early in training.

Side by side with measured spectra (notebook 05, full run: FedLoRU on digits, MLP 64-64,
p = 8970, N = 1437, 20 clients; subsets of n samples, 5 draws each): at round 0 the measured
srank is 56.6 at n = 25 vs 80.7 at n = 800 (small n below), the fitted plain model says
1885 vs 133; at round 40 (last) the measured srank is 2.75 vs 2.69 (flat), the model 5.73 vs
2.73. The fit finds no semicircle edge: all 30 Lanczos Ritz values lie above the edge 2s
implied by ‖H‖_F², i.e. these Hessians have a continuum of large eigenvalues rather than
"a few outliers plus a Wigner bulk", and attributing the non-outlier mass to 1/n sampling
noise overstates the small-n excess (the fitted σ is an upper bound).

``fit_spectrum`` reads the model's parameters off a measured spectrum: the outliers are the
Lanczos eigenvalues outside the bulk edge 2s, s² comes from ‖H‖_F² minus the outlier mass
(‖H‖_F² − Σ λ̃_j² = (p + 1 − 2k) s² − Σ s⁴/θ_j², solved by fixed point; SLQ gives
‖H‖_F² ≈ p · mean Σ τ_l² θ_l² over its nodes) or from a bulk edge read off the density, and
each θ from λ̃ = θ + s²/θ.

Example:
    >>> m = SpikedModel(theta=(1.0, 0.5), sigma=1.0, dim=1000)
    >>> round(float(predict_stable_rank(m, [100])["stable_rank"].iloc[0]), 3)
    11.038
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg

__all__ = [
    "SpikedFit",
    "SpikedModel",
    "fit_spectrum",
    "monte_carlo_stable_rank",
    "outlier_locations",
    "predict_stable_rank",
    "reversal_table",
]

MC_COLUMNS = ["n", "draw", "stable_rank", "spectral_norm", "frobenius_sq"]
PREDICTION_COLUMNS = ["n", "stable_rank", "spectral_norm", "frobenius_sq", "bulk_edge",
                      "num_outliers"]


@dataclass(frozen=True)
class SpikedModel:
    """Parameters of H_n = Σ θ_i u_i u_iᵀ + (τ/√n) U G_k Uᵀ + (σ/√n) W (module doc).

    Attributes:
        theta: signal eigenvalues θ_i (signed; the Hessian is indefinite).
        sigma: noise scale σ: the bulk of an n-sample Hessian is a semicircle of radius 2σ/√n.
        dim: number of parameters p.
        tau: noise scale inside the signal subspace (0: the plain model of the theorem).
    """

    theta: tuple[float, ...]
    sigma: float
    dim: int
    tau: float = 0.0

    def __post_init__(self) -> None:
        if self.dim < max(len(self.theta), 1) + 1:
            raise ValueError(f"dim must exceed the number of outliers ({len(self.theta)}), "
                             f"got {self.dim}")
        if self.sigma < 0 or self.tau < 0:
            raise ValueError(f"sigma and tau must be >= 0, got {self.sigma}, {self.tau}")
        object.__setattr__(self, "theta", tuple(float(t) for t in self.theta))

    def noise_scale(self, n: float) -> float:
        """s = σ/√n, half the bulk width."""
        if n <= 0:
            raise ValueError(f"the number of samples n must be > 0, got {n}")
        return self.sigma / math.sqrt(n)

    def sample(self, n: float, rng: np.random.Generator) -> np.ndarray:
        """One dense draw of H_n (float64, p×p). By the orthogonal invariance of W, U is taken
        as the first k coordinate vectors without loss of generality."""
        p, k = self.dim, len(self.theta)
        A = rng.standard_normal((p, p))
        H = (A + A.T) * (self.noise_scale(n) / math.sqrt(2 * p))
        if k:
            H[np.arange(k), np.arange(k)] += np.asarray(self.theta)
            if self.tau > 0:
                H[:k, :k] += _goe(k, rng) * (self.tau / math.sqrt(n))
        return H


def _goe(k: int, rng: np.random.Generator) -> np.ndarray:
    """k×k GOE with off-diagonal variance 1 (diagonal 2): E‖G‖_F² = k² + k."""
    B = rng.standard_normal((k, k))
    return (B + B.T) / math.sqrt(2)


def _rng(seed: int, *keys: float) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(int(round(k)) for k in keys)])


def monte_carlo_stable_rank(model: SpikedModel, ns: Sequence[float], *, draws: int = 4,
                            seed: int = 0) -> pd.DataFrame:
    """Stable rank Σλ²/max λ² of independent draws of H_n, by dense eigensolves.

    Args:
        model: the spiked model.
        ns: sample sizes n.
        draws: independent draws per n (each its own seeded stream, keyed by (seed, n, draw)).
        seed: seeds every draw; same seed, same table.
    Returns:
        One row per (n, draw): ``MC_COLUMNS``.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rows = []
    for n in ns:
        for d in range(draws):
            lam = scipy.linalg.eigvalsh(model.sample(n, _rng(seed, n, d)))
            fro, top = float(np.sum(lam**2)), float(np.max(np.abs(lam)))
            rows.append({"n": n, "draw": d, "stable_rank": fro / top**2, "spectral_norm": top,
                         "frobenius_sq": fro})
    return pd.DataFrame(rows, columns=MC_COLUMNS)


def outlier_locations(theta: Sequence[float], s: float) -> np.ndarray:
    """BBP: the eigenvalues of Σθ_i u_i u_iᵀ + sW at large p — θ + s²/θ where |θ| > s, and
    NaN where the spike is swallowed by the bulk [−2s, 2s]."""
    t = np.asarray(theta, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(t) > s, t + s**2 / t, np.nan)


def _predict_one(outliers: np.ndarray, signal_fro: float, s: float, p: int) -> tuple:
    moved = outlier_locations(outliers, s)
    edge = 2 * s
    top = max(float(np.nanmax(np.abs(moved), initial=0.0)), edge)
    fro = signal_fro + (p + 1) * s**2
    return fro / top**2, top, fro, int(np.sum(~np.isnan(moved)))


def predict_stable_rank(model: SpikedModel, ns: Sequence[float], *, draws: int = 4000,
                        seed: int = 0) -> pd.DataFrame:
    """Large-p prediction of srank(H_n) (module doc): closed form for τ = 0; for τ > 0 the
    mean over ``draws`` draws of the k×k outlier block (seeded).

    Returns:
        One row per n: ``PREDICTION_COLUMNS`` (spectral_norm, frobenius_sq and num_outliers
        are means over the k×k draws when τ > 0).
    """
    theta = np.asarray(model.theta, dtype=float)
    rows = []
    for n in ns:
        s = model.noise_scale(n)
        if model.tau == 0 or len(theta) == 0:
            vals = [_predict_one(theta, float(np.sum(theta**2)), s, model.dim)]
        else:
            rng = _rng(seed, n, 0)
            vals = []
            for _ in range(draws):
                M = np.diag(theta) + _goe(len(theta), rng) * (model.tau / math.sqrt(n))
                vals.append(_predict_one(np.linalg.eigvalsh(M), float(np.sum(M**2)), s,
                                         model.dim))
        v = np.asarray(vals, dtype=float).mean(axis=0)
        rows.append({"n": n, "stable_rank": v[0], "spectral_norm": v[1], "frobenius_sq": v[2],
                     "bulk_edge": 2 * s, "num_outliers": v[3]})
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


@dataclass(frozen=True)
class SpikedFit:
    """Model parameters read off one measured spectrum (``fit_spectrum``).

    Attributes:
        theta: fitted signal eigenvalues (one per detected outlier, by decreasing |λ|).
        outliers: the measured eigenvalues taken as outliers.
        noise_scale: s, half the bulk width, at the measured sample size.
        sigma: s·√n when n was given, else NaN.
        bulk_edge: 2s.
        dim: p.
    """

    theta: tuple[float, ...]
    outliers: tuple[float, ...]
    noise_scale: float
    sigma: float
    bulk_edge: float
    dim: int

    def model(self, tau: float = 0.0) -> SpikedModel:
        """The fitted model (needs σ, i.e. the fit was given n)."""
        if not math.isfinite(self.sigma):
            raise ValueError("the fit has no sigma: pass n (the measured sample size) to "
                             "fit_spectrum")
        return SpikedModel(theta=self.theta, sigma=self.sigma, dim=self.dim, tau=tau)


def _invert_bbp(lam: np.ndarray, s: float) -> np.ndarray:
    """θ with θ + s²/θ = λ and |θ| > s (the root that is larger in magnitude)."""
    disc = np.sqrt(np.maximum(lam**2 - 4 * s**2, 0.0))
    return np.sign(lam) * (np.abs(lam) + disc) / 2


def fit_spectrum(top_eigenvalues: Sequence[float], dim: int, *,
                 frobenius_sq: float | None = None, bulk_edge: float | None = None,
                 n: float | None = None, margin: float = 0.05,
                 iterations: int = 50) -> SpikedFit:
    """Fit (θ_1..θ_k, s) of the spiked model to a measured spectrum.

    The bulk scale s comes from ``bulk_edge`` (= 2s, e.g. where the SLQ density ends) when
    given, else from ‖H‖_F² minus the outlier mass: with k outliers λ̃_j (|λ̃_j| > 2s(1+margin)),
    ‖H‖_F² − Σλ̃_j² = (p + 1 − 2k)s² − Σ s⁴/θ_j², iterated to a fixed point together with the
    outlier set. Each θ_j inverts λ̃ = θ + s²/θ.

    Args:
        top_eigenvalues: the largest-magnitude eigenvalues (Lanczos Ritz values), any order;
            give more than the number of outliers so the bulk's start is visible.
        dim: number of parameters p.
        frobenius_sq: measured ‖H‖_F² (needed unless bulk_edge is given).
        bulk_edge: measured bulk edge 2s (overrides the Frobenius route).
        n: the sample size of the measured Hessian; gives σ = s√n.
        margin: relative gap above 2s for an eigenvalue to count as an outlier.
    Returns:
        SpikedFit.
    """
    lam = np.asarray(top_eigenvalues, dtype=float)
    lam = lam[np.argsort(-np.abs(lam), kind="stable")]
    if bulk_edge is None and frobenius_sq is None:
        raise ValueError("fit_spectrum needs frobenius_sq or bulk_edge to size the bulk")
    if len(lam) == 0:
        raise ValueError("fit_spectrum needs at least one measured eigenvalue")
    if bulk_edge is not None:
        s = float(bulk_edge) / 2
        out = lam[np.abs(lam) > 2 * s * (1 + margin)]
    else:
        out, s = lam, 0.0
        for _ in range(iterations):
            k = len(out)
            theta = _invert_bbp(out, s) if k else out
            corr = float(np.sum(s**4 / theta**2)) if k else 0.0
            rest = float(frobenius_sq) - float(np.sum(out**2)) + corr
            s_new = math.sqrt(max(rest, 0.0) / max(dim + 1 - 2 * k, 1))
            out_new = lam[np.abs(lam) > 2 * s_new * (1 + margin)]
            if len(out_new) == len(out) and abs(s_new - s) <= 1e-12 * max(s_new, 1e-300):
                s = s_new
                break
            out, s = out_new, s_new
    theta = _invert_bbp(out, s)
    sigma = s * math.sqrt(n) if n is not None else float("nan")
    return SpikedFit(theta=tuple(theta.tolist()), outliers=tuple(out.tolist()), noise_scale=s,
                     sigma=sigma, bulk_edge=2 * s, dim=int(dim))


def reversal_table(model: SpikedModel, n_small: float, n_large: float, *,
                   seed: int = 0) -> dict[str, float]:
    """Predicted srank at n_small and n_large, their difference, and where the τ = 0 curve
    peaks (x* = θ_1² − 2Θ²/p, i.e. n* = σ²/x*; srank falls with decreasing n below n*)."""
    pred = predict_stable_rank(model, [n_small, n_large], seed=seed)
    small, large = (float(v) for v in pred["stable_rank"])
    theta = np.asarray(model.theta, dtype=float)
    x_star = (float(np.max(theta**2)) - 2 * float(np.sum(theta**2)) / model.dim
              if len(theta) else -1.0)
    n_star = model.sigma**2 / x_star if x_star > 0 else float("inf")
    return {"n_small": n_small, "n_large": n_large, "srank_small": small,
            "srank_large": large, "difference": small - large, "reverses": bool(small < large),
            "n_peak_tau0": n_star}

