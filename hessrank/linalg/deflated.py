"""Krylov-deflated tr(H) and ‖H‖_F² with an adaptive Lanczos/probe split (after adaptive
Hutch++, Persson, Cortinovis & Kressner 2022, and Krylov-aware trace estimation, Chen & Hallman
2023).

With V (p×m) the orthonormal Lanczos basis and P = VVᵀ:
    ‖H‖_F² = ‖HV‖_F² + ‖H(I−P)‖_F²,  ‖HV‖_F² = ‖T‖_F² + β_m²  (exact),
    tr(H)   = tr(T) + tr((I−P)H(I−P)),
and the remainders are E‖H(I−P)g‖² and E[gᵀ(I−P)H(I−P)g] over random probes g.

How many of the budget's products go to Lanczos steps is decided per stacked operator from the
data. A few *pilot* probes are multiplied first; after each Lanczos step they are deflated by the
current basis without new products (H V c = V T c + β_m q_{m+1} c_m), which gives the sample
variance v(m) of the remainder for every m on the same probes. With n products per operator the
final variance is about v(m)/(n − m); a further step pays off while it shrinks v by more than one
probe's share, i.e. while the predicted ratio v(m+1)/v(m) < (s − 1)/s with s the probes left
if Lanczos stopped now. On a flat spectrum (initialization) v barely moves and the budget goes to
probes (plain Hutchinson, but with the few exact Krylov directions); on outliers v drops by orders
of magnitude until they are captured. With a precision target ``rtol`` the same rule minimizes
m + s(m), s(m) = t²·v(m)/(rtol·estimate)² the probes still needed, and probes are then spent
until the estimate is *predicted to be within rtol of the truth in 90 % of runs*
(:func:`error_quantile`: the Student-t 96.25 % quantile times the plain sample standard error of
the sampled part, plus twice the likely error of ‖H‖₂ for the stable rank). That is a
prediction from the sample variance, not the conservative error bar reported with the estimate
(floored where probes can miss outliers, t-widened to 97.5 %), which stays as it is: stopping
once that bar was below rtol overspent on flat spectra several-fold (issue 24). Products spent
against the smallest fixed budget that meets the target, and the share of runs within it:
``experiments/benchmarks/bench_rtol.py`` → ``results/rtol.md``. The pilot probes count in the
final estimate (deflated after the fact by the final basis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from hessrank.linalg.lanczos import LanczosRecurrence, restart_generator
from hessrank.linalg.operator import Operator, as_operator, make_generator, random_block
from hessrank.linalg.sampling import draw_per_slice, mean_stderr, slice_generators

MIN_PROBES = 6
"""Residual probes behind every error bar (dof ≥ 5): below that the sample standard error is too
unreliable even with the t quantile (tests/linalg/test_calibration.py)."""

SHARE = 0.9
"""``rtol`` asks that this share of runs be within rtol of the truth (two-sided)."""
MARGIN = 0.025
"""The stopping rule aims at SHARE + MARGIN: a run that stops early because its few probes
happened to vary little is also one whose mean is likely low (‖Hg‖² is skewed), so stopping at
the plain SHARE quantile reaches fewer than SHARE of runs. Chosen on seeds 0–99 of
``bench_rtol.py``; ``results/rtol.md`` reports other seeds."""

TARGETS = ("frobenius", "trace", "stable_rank")
_NAMES = {"frobenius": "frobenius_sq", "trace": "trace", "stable_rank": "stable_rank"}


def min_budget(target: str = "frobenius") -> int:
    """The smallest ``num_matvecs`` the adaptive estimators accept: :data:`MIN_PROBES` probes
    plus 4 Lanczos steps. With 2 steps the error bar of ‖H‖_F² missed by 5 stderr on a trained
    digits MLP and on five outliers (30 seeds); from 4 on it held (test_calibration.py)."""
    return MIN_PROBES + 4


def default_num_pilot(budget: int) -> int:
    """Pilot probes: a sixth of the budget, at least :data:`MIN_PROBES`."""
    return max(MIN_PROBES, round(budget / 6))


@dataclass
class DeflatedEstimate:
    """A Lanczos run per operator plus residual probes, and the estimates built from them.

    lanczos: the recurrences (Ritz values, residuals, basis per operator).
    frobenius_sq, trace and their stderr: (J,), stderr t-widened (see sampling.mean_stderr).
    lanczos_steps, num_probes, dof, quantile: (J,).
    num_matvecs: products spent per operator. rtol / reached_rtol: the precision target.
    """

    lanczos: LanczosRecurrence
    frobenius_sq: np.ndarray
    frobenius_sq_stderr: np.ndarray
    trace: np.ndarray
    trace_stderr: np.ndarray
    lanczos_steps: np.ndarray
    num_probes: np.ndarray
    dof: np.ndarray
    quantile: np.ndarray
    num_matvecs: int
    rtol: float | None = None
    reached_rtol: np.ndarray | None = None
    frobenius_sq_se: np.ndarray | None = None
    """(J,) plain sample standard error of the chosen ‖H‖_F² estimator (no floor, no t)."""
    trace_se: np.ndarray | None = None
    """(J,) the same for tr(H)."""


def spectral_norm_and_error(run: LanczosRecurrence, j: int) -> tuple[float, float, float]:
    """(max |θ|, its reported error, its predicted error) for operator j.

    Reported: the residual bound r = β_m|e_mᵀ y| (an eigenvalue lies within r of θ), floored at
    the round-off eps·max|θ|·sqrt(p) of the operator's dtype. Predicted (used only to decide
    how to spend products): min(r, r²/gap), the Kato–Temple-style error once θ has converged.
    """
    theta, resid = run.ritz(j)
    if theta.size == 0:
        return 0.0, 0.0, 0.0
    i = int(np.argmax(np.abs(theta)))
    lam, r = float(abs(theta[i])), float(resid[i])
    floor = torch.finfo(run.dtype).eps * lam * math.sqrt(run.dim)
    others = np.delete(theta, i)
    gap = float(np.min(np.abs(others - theta[i]))) if others.size else math.inf
    predicted = min(r, r * r / gap) if gap > 0 else r
    return lam, max(r, floor), max(predicted, floor)


def spectral_norm_trend(run: LanczosRecurrence, j: int, w: int = 3) -> float:
    """How much max|θ| of operator j grew over its last ``w`` Lanczos steps (from the leading
    block of T, no product). On a dense spectral edge (Marchenko–Pastur) the top Ritz value
    can sit within its residual of a lower eigenvalue while ‖H‖₂ is still 4 % above it; a
    value still climbing is taken to have at least as far to go."""
    m = int(run.steps[j])
    if m <= w:
        return 0.0

    def top(k: int) -> float:
        a, b = run.alpha[j, :k], run.beta[j, :k - 1]
        return float(np.abs(np.linalg.eigvalsh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1)))
                     .max())

    return max(top(m) - top(m - w), 0.0)


class _Slice:
    """Bookkeeping of one stacked operator: its probes (deflated or not yet) and its phase."""

    def __init__(self) -> None:
        self.pilot_G: Tensor | None = None
        self.pilot_HG: Tensor | None = None
        # samples of probes drawn after Lanczos stopped: deflated ‖H(I−P)g‖², gᵀ(I−P)H(I−P)g
        # and plain ‖Hg‖², gᵀHg (the same Rademacher probes, deflated after the product)
        self.fro: list[Tensor] = []
        self.tr: list[Tensor] = []
        self.fro_plain: list[Tensor] = []
        self.tr_plain: list[Tensor] = []
        self.lanczos = True
        self.captured: list[float] = [0.0]  # ‖H V_m‖_F², m = 0, 1, ...
        self.variance: list[float] = []  # pilot variance of the remainder, m = 2, 3, ...


def _check_args(num_matvecs, rtol, max_matvecs, target) -> tuple[int, bool]:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if rtol is not None:
        if num_matvecs is not None:
            raise ValueError(
                "pass either num_matvecs= (a fixed budget) or rtol= with max_matvecs= (a "
                "precision target), not both")
        if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
            raise ValueError(f"rtol must be a number in (0, 1), got {rtol!r}")
        return int(max_matvecs), True
    if num_matvecs is None:
        raise ValueError("pass num_matvecs= (a fixed budget) or rtol= (a precision target)")
    return int(num_matvecs), False


def deflated_estimate(
    op: Operator | Tensor,
    *,
    num_matvecs: int | None = None,
    seed: int = 0,
    num_probes: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 400,
    target: str = "frobenius",
    chunk: int = 32,
) -> DeflatedEstimate:
    """Lanczos steps and residual probes per stacked operator (see the module docstring).

    Args:
        op: operator (J, p, p) or dense symmetric tensor.
        num_matvecs: fixed budget per operator (≥ :func:`min_budget`, or ≥ num_probes + 1).
        seed: seeds the Lanczos start (as :func:`lanczos`) and every probe.
        num_probes: a fixed split instead of the adaptive one: num_matvecs − num_probes
            Lanczos steps, then num_probes probes (≥ 2).
        rtol: precision target on the relative standard error of ``target`` (instead of
            num_matvecs); products are spent until it is met or ``max_matvecs`` is reached.
        target: the quantity whose error drives the split: "frobenius", "trace" or
            "stable_rank" (‖H‖_F²/‖H‖₂²: also counts the error of ‖H‖₂).
        chunk: probes per ``matmat`` call once every operator's Lanczos phase is over.
    If the budget reaches p (fixed budget), Lanczos spans the space: exact, no probe.
    """
    op = as_operator(op)
    J, p, _ = op.shape
    budget, adaptive_rtol = _check_args(num_matvecs, rtol, max_matvecs, target)
    dtype, device = op.dtype, op.device
    gen = make_generator(seed)
    start = random_block((J, p, 1), gen, kind="gaussian", dtype=dtype, device=device)[..., 0]

    fixed_m: int | None = None
    if num_probes is not None:
        if num_probes < 2:
            raise ValueError(
                f"num_probes must be >= 2 (two residual probes give the error bar), got "
                f"{num_probes}")
        if adaptive_rtol:
            raise ValueError("num_probes fixes the split; it cannot be combined with rtol")
        fixed_m = budget - int(num_probes)
        if budget >= p:
            fixed_m = p
        if fixed_m < 1:
            raise ValueError(
                f"num_matvecs={budget} leaves no Lanczos step after {num_probes} residual "
                f"probes; use num_matvecs >= {num_probes + 2} or fewer probes")
        pilot = 0
    elif not adaptive_rtol and budget >= p:
        fixed_m, pilot = p, 0  # the Krylov space can be the whole space: exact
    else:
        need = min_budget(target)
        if budget < need:
            what = "max_matvecs" if adaptive_rtol else "num_matvecs"
            raise ValueError(
                f"{_NAMES[target]} needs {what} >= {need} ({MIN_PROBES} residual probes "
                f"for a calibrated error bar plus Lanczos steps), got {budget}")
        pilot = default_num_pilot(budget if not adaptive_rtol else 6 * MIN_PROBES)
        pilot = min(pilot, budget - (need - MIN_PROBES))

    run = LanczosRecurrence(start, capacity=min(budget, p), generator=restart_generator(seed))
    gens = slice_generators(seed, J)
    slices = [_Slice() for _ in range(J)]
    used = 0
    if pilot:
        G = draw_per_slice(gens, p, pilot, kind="rademacher", dtype=dtype, device=device)
        HG = op.matmat(G)
        used += pilot
        for j, sl in enumerate(slices):
            sl.pilot_G, sl.pilot_HG = G[j], HG[j]
            if target != "stable_rank" and fixed_m is None:
                sl.lanczos = not _flat(HG[j].double(), budget)

    def record_probe(j: int, g: Tensor, hg: Tensor) -> None:
        dg, dhg = run.deflate(j, g, hg)
        dg, dhg, g, hg = dg.double(), dhg.double(), g.double(), hg.double()
        slices[j].fro.append(dhg.pow(2).sum(dim=0).cpu())
        slices[j].tr.append((dg * dhg).sum(dim=0).cpu())
        slices[j].fro_plain.append(hg.pow(2).sum(dim=0).cpu())
        slices[j].tr_plain.append((g * hg).sum(dim=0).cpu())

    # ---- Lanczos phase: one product per call; operators already done spend theirs on probes
    while any(sl.lanczos for sl in slices) and used < budget:
        active = np.array([sl.lanczos for sl in slices])
        V = torch.zeros(J, p, 1, dtype=dtype, device=device)
        probes = {}
        for j, sl in enumerate(slices):
            if sl.lanczos:
                V[j, :, 0] = run.next_vector(j)
            else:
                probes[j] = draw_per_slice([gens[j]], p, 1, kind="rademacher", dtype=dtype,
                                           device=device)[0]
                V[j] = probes[j]
        HV = op.matmat(V)
        used += 1
        run.advance(HV[..., 0], active)
        for j, g in probes.items():
            if not run.full(j):
                record_probe(j, g, HV[j])
        for j, sl in enumerate(slices):
            if sl.lanczos:
                sl.lanczos = _keep_going(run, j, sl, target, used, budget, fixed_m, rtol)

    # ---- probe phase
    while used < budget and not all(run.full(j) for j in range(J)):
        if adaptive_rtol:
            est = _finish(run, slices, used, rtol, target)
            reached = _reached(est, rtol, target)
            stuck = error_quantile(est, target)[1] >= rtol  # ‖H‖₂ alone misses: probes cannot help
            if (reached | stuck).all():
                break
            k = min(chunk, budget - used, max(1, _probes_needed(est, slices, rtol, target)))
        else:
            k = min(chunk, budget - used)
        G = draw_per_slice(gens, p, k, kind="rademacher", dtype=dtype, device=device)
        HG = op.matmat(G)
        used += k
        for j in range(J):
            if not run.full(j):
                record_probe(j, G[j], HG[j])
    est = _finish(run, slices, used, rtol, target)
    if adaptive_rtol:
        est.reached_rtol = _reached(est, rtol, target)
    return est


def _flat(HG: Tensor, budget: int) -> bool:
    """Whether the pilot shows a spectrum too flat for deflation to pay within the budget.

    With samples x = ‖Hg‖², r = 2·mean²/var ≈ ‖H‖_F⁴/‖H²‖_F² is the effective number of
    directions holding ‖H‖_F² (Satterthwaite). m Krylov steps capture at most about m/r of it,
    shrinking the variance by ~2m/r while costing m of the budget's probes (m/budget): with
    r > 2·budget no step pays, and the whole budget goes to probes (plain Hutchinson on the same
    probe stream).
    """
    x = HG.pow(2).sum(dim=0)
    v = _variance(x)
    return bool(v > 0 and 2 * float(x.mean()) ** 2 / v > 2 * budget)


def _variance(x: Tensor) -> float:
    return float(x.var(correction=1)) if x.numel() > 1 else math.inf


def _keep_going(run: LanczosRecurrence, j: int, sl: _Slice, target: str, used: int,
                budget: int, fixed_m: int | None, rtol: float | None) -> bool:
    """Whether operator j takes another Lanczos step (see the module docstring).

    The predicted gain of a step comes from the Frobenius mass the Krylov space captured: with
    R(m) = ‖H(I − P_m)‖_F² (estimated by the pilot mean, the only sampled part) and the exact
    captured mass C(m) = ‖HV_m‖_F², the remainder shrank per step by ρ = (R(m)/R(m−w))^{1/w},
    R(m−w) = R(m) + C(m) − C(m−w). The residual variance scales like R² for ‖H‖_F² (like R for
    tr(H), whose samples have variance 2‖(I−P)H(I−P)‖_F² ≤ 2R) if the remainder keeps its shape.
    """
    m = int(run.steps[j])
    sl.captured.append(run.frobenius_sq(j))
    if run.full(j) or used >= budget:
        return False
    if fixed_m is not None:
        return m < fixed_m
    if m < 2:
        return True  # the first Krylov direction is the random start: no trend yet
    G, HG = run.deflate(j, sl.pilot_G, sl.pilot_HG)
    G, HG = G.double(), HG.double()
    y = HG.pow(2).sum(dim=0)
    x = (G * HG).sum(dim=0) if target == "trace" else y
    v = _variance(x)
    remainder = float(y.mean())
    if not (v > 0 and remainder > 0 and math.isfinite(v)):
        return False  # the remainder is zero on the pilot probes: nothing left to deflate
    w = min(m - 1, 3)
    gained = sl.captured[-1] - sl.captured[-1 - w]
    rho = (remainder / (remainder + max(gained, 0.0))) ** (1.0 / w)
    ratio = rho if target == "trace" else rho**2
    sl.variance.append(v)
    if len(sl.variance) > w:  # a faster fall of the pilot variance itself (power-law tails)
        ratio = min(ratio, (v / sl.variance[-1 - w]) ** (1.0 / w))
    s_now = len(x) + budget - used  # probes if Lanczos stopped now (fixed budget)
    exact = run.trace(j) if target == "trace" else run.frobenius_sq(j)
    value = abs(exact + float(x.mean()))
    if target == "stable_rank":
        if m < min_budget(target) - MIN_PROBES:
            return True
        lam, _, predicted = spectral_norm_and_error(run, j)  # the likely error, not the bound
        if rtol is not None:  # a target is only met once ‖H‖₂ has stopped climbing
            predicted = max(predicted, spectral_norm_trend(run, j))
        rel_lam = 2 * predicted / lam if lam > 0 else math.inf
    else:
        rel_lam = 0.0
    if rtol is not None:
        if rel_lam > rtol / 2:
            return True
        q = _quantile(30)  # at a few dozen probes
        s_need = v * q**2 / ((rtol - rel_lam) * value) ** 2 if value > 0 else math.inf
        return s_need * (1 - ratio) > 1
    rel_f = math.sqrt(v / s_now) / value if value > 0 else 0.0
    return ratio < (s_now - 1) / s_now or rel_lam > rel_f


def _finish(run: LanczosRecurrence, slices: list[_Slice], used: int, rtol, target
            ) -> DeflatedEstimate:
    """Estimates from the final basis. Each quantity takes the deflated estimate or the plain
    one over the same probes (mean ‖Hg‖², gᵀHg), whichever has the smaller sample error: on a flat
    spectrum the projection costs Rademacher probes their advantage (Var ‖Hg‖² lacks the
    −2Σ(H²)_ii² of Gaussian-like vectors) and captures little, so plain wins there."""
    J = len(slices)
    fro, fro_se, tr, tr_se = (np.zeros(J) for _ in range(4))
    fro_raw, tr_raw = np.zeros(J), np.zeros(J)
    dof, quant, probes = np.zeros(J), np.full(J, np.nan), np.zeros(J, dtype=int)
    for j, sl in enumerate(slices):
        fs, ts, fp, tp = list(sl.fro), list(sl.tr), list(sl.fro_plain), list(sl.tr_plain)
        if sl.pilot_G is not None:
            G, HG = run.deflate(j, sl.pilot_G, sl.pilot_HG)
            G, HG = G.double(), HG.double()
            fs.insert(0, HG.pow(2).sum(dim=0).cpu())
            ts.insert(0, (G * HG).sum(dim=0).cpu())
            G0, HG0 = sl.pilot_G.double(), sl.pilot_HG.double()
            fp.insert(0, HG0.pow(2).sum(dim=0).cpu())
            tp.insert(0, (G0 * HG0).sum(dim=0).cpu())
        fro[j], tr[j] = run.frobenius_sq(j), run.trace(j)
        if run.full(j) or not fs:  # the Krylov space is the whole space: exact
            continue
        f, t = torch.cat(fs).unsqueeze(0), torch.cat(ts).unsqueeze(0)
        n = f.shape[1]
        fm, fse, d, q = mean_stderr(f)
        tm, tse, _, _ = mean_stderr(t)
        floor_f, floor_t = _stderr_floor(run, j, float(fm[0]), n)
        fro[j] += fm[0]
        tr[j] += tm[0]
        fro_se[j], tr_se[j] = max(fse[0], floor_f), max(tse[0], floor_t)
        pm, pse, _, _ = mean_stderr(torch.cat(fp).unsqueeze(0))
        qm, qse, _, _ = mean_stderr(torch.cat(tp).unsqueeze(0))
        lam, lam_err, _ = spectral_norm_and_error(run, j)  # (0, 0) without a Krylov step
        plain_f = max(pse[0], 0.5 * math.sqrt(2 * (lam + lam_err) ** 2 * max(pm[0], 0.0) / n))
        plain_t = max(qse[0], 0.7 * math.sqrt(2 * max(pm[0], 0.0) / n))
        # choose on the sample errors (the evidence of accuracy); report the floored one
        unwiden = 2 / q[0] if np.isfinite(q[0]) else 1.0
        fro_raw[j], tr_raw[j] = fse[0] * unwiden, tse[0] * unwiden
        if pse[0] < fse[0]:
            fro[j], fro_se[j], fro_raw[j] = pm[0], plain_f, pse[0] * unwiden
        if qse[0] < tse[0]:
            tr[j], tr_se[j], tr_raw[j] = qm[0], plain_t, qse[0] * unwiden
        dof[j], quant[j] = d[0], q[0]
        probes[j] = n
    return DeflatedEstimate(
        lanczos=run, frobenius_sq=fro, frobenius_sq_stderr=fro_se, trace=tr, trace_stderr=tr_se,
        lanczos_steps=run.steps.copy(), num_probes=probes, dof=dof, quantile=quant,
        num_matvecs=used, rtol=rtol, frobenius_sq_se=fro_raw, trace_se=tr_raw)


def _stderr_floor(run: LanczosRecurrence, j: int, remainder: float, s: int
                  ) -> tuple[float, float]:
    """Floors of the standard errors of the sampled remainders (‖H‖_F², tr(H)).

    A few probes can all miss an outlier the Krylov space has not captured yet; their sample
    variance then looks small exactly when the estimate is low (measured: 8.5 stderr off at 12
    products on five outliers). The variance of one probe has upper bounds that need no sample:
    Var ‖H(I−P)g‖² ≤ 2‖(I−P)H²(I−P)‖_F² ≤ 2Λ²R and Var gᵀ(I−P)H(I−P)g ≤ 2R, with
    R = ‖H(I−P)‖_F² (estimated by the mean) and Λ ≥ ‖H(I−P)‖₂, taken as the largest |θ| + r over
    Ritz values not yet converged (r > 1e-3·max|θ|), or β_m. Half the first bound floors the
    error of ‖H‖_F² (Λ overestimates on flat remainders, where half stays below the sample
    error), the second bound, nearly attained on flat remainders, floors that of tr(H); where
    outliers remain they widen the bar (tests/linalg/test_calibration.py).
    """
    theta, resid = run.ritz(j)
    m = int(run.steps[j])
    if m == 0:  # no Krylov step (flat pilot): the ‖H‖_F² samples are light-tailed, no floor
        return 0.0, 0.7 * math.sqrt(2 * max(remainder, 0.0) / s)
    lam = float(np.max(np.abs(theta)))
    open_ = resid > 1e-3 * lam
    big = float(np.max(np.abs(theta[open_]) + resid[open_])) if open_.any() else 0.0
    Lam = max(big, float(run.beta[j, m - 1]))
    R = max(remainder, 0.0)
    return (0.5 * math.sqrt(2 * Lam**2 * R / s), 0.7 * math.sqrt(2 * R / s))


def _quantile(dof) -> float:
    """t_{(1 + SHARE + MARGIN)/2}(dof): the share of runs aimed at lies within this many
    standard errors."""
    return float(stats.t.ppf((1 + SHARE + MARGIN) / 2, max(float(dof), 1.0)))


def error_quantile(est: DeflatedEstimate, target: str) -> tuple[np.ndarray, np.ndarray]:
    """The predicted SHARE-quantile of |relative error| of ``target`` per operator, split into
    (sampled part, bias part): t_{(1 + SHARE + MARGIN)/2}(dof) × the plain sample standard
    error of the sampled remainder over the estimate, and, for the stable rank, 2 × the
    Kato–Temple error of ‖H‖₂ over ‖H‖₂, or its growth over the last 3 steps if larger
    (:func:`spectral_norm_trend`; the Ritz value is below the truth, so it adds). 0 where the
    Krylov space is the whole space."""
    J = len(est.frobenius_sq)
    sampled, bias = np.zeros(J), np.zeros(J)
    for j in range(J):
        if est.lanczos.full(j):
            continue
        if target == "trace":
            se, value = est.trace_se[j], abs(est.trace[j])
        else:
            se, value = est.frobenius_sq_se[j], est.frobenius_sq[j]
        q = _quantile(est.dof[j]) if est.dof[j] >= 1 else math.inf
        sampled[j] = q * se / max(value, 1e-300)
        if target == "stable_rank":
            lam, _, predicted = spectral_norm_and_error(est.lanczos, j)
            predicted = max(predicted, spectral_norm_trend(est.lanczos, j))
            bias[j] = 2 * predicted / lam if lam > 0 else math.inf
    return sampled, bias


def _reached(est: DeflatedEstimate, rtol: float, target: str) -> np.ndarray:
    sampled, bias = error_quantile(est, target)
    exact = np.array([est.lanczos.full(j) for j in range(len(sampled))])
    return (sampled + bias <= rtol) & ((est.num_probes >= MIN_PROBES) | exact)


def _probes_needed(est: DeflatedEstimate, slices, rtol: float, target: str) -> int:
    """Probes still needed by the worst operator to meet rtol (1/s scaling of the variance)."""
    sampled, bias = error_quantile(est, target)
    need = 1
    for j in range(len(sampled)):
        s, room = int(est.num_probes[j]), rtol - bias[j]
        if s >= 2 and np.isfinite(sampled[j]) and sampled[j] > room > 0:
            need = max(need, math.ceil(s * (sampled[j] / room) ** 2) - s)
    return need
