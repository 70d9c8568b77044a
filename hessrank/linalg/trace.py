"""Trace and Frobenius estimators: Hutchinson (1989), Hutch++ (Meyer et al. 2021), XTrace
(Epperly, Tropp & Webber 2024), and the Krylov-deflated estimators of hessrank.linalg.deflated.

Every estimator works on a stack of J operators and spends ``num_matvecs`` products per
stacked operator. Standard errors are sample standard errors of the stochastic part, widened
from the normal to the Student-t quantile of their degrees of freedom (``dof`` on the result);
every budget accepted leaves at least ``MIN_PROBES`` samples behind the error bar.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.deflated import MIN_PROBES, deflated_estimate
from hessrank.linalg.operator import Operator, as_operator, make_generator, random_block
from hessrank.linalg.results import TraceResult
from hessrank.linalg.sampling import (
    draw_per_slice,
    mean_stderr,
    slice_generators,
    trace_stderr_floor,
)

MIN_HUTCHINSON = 10
"""Smallest budget of plain Hutchinson (undeflated samples keep every outlier's heavy tail)."""
MIN_SKETCH_BUDGET = 20
"""Smallest budget of the sketching trace estimators (Hutch++, XTrace) whose error bars held."""


def _check_budget(num_matvecs: int, minimum: int, what: str) -> None:
    if num_matvecs < minimum:
        raise ValueError(f"{what} needs num_matvecs >= {minimum}, got {num_matvecs}")


def _probe_chunks(total: int, chunk: int):
    done = 0
    while done < total:
        k = min(chunk, total - done)
        yield k
        done += k


def _probe_samples(op: Operator, num_probes: int, seed: int, kind: str, chunk: int,
                   statistic) -> Tensor:
    """(..., J, s) float64 samples statistic(G, H G) over s random probes, ``chunk`` per product.

    Probes come from the per-operator streams of hessrank.linalg.sampling, the same streams the
    deflated estimators draw from: at one seed they see the same probes, so comparisons between
    them are paired.
    """
    J, p, _ = op.shape
    gens = slice_generators(seed, J)
    samples = []
    for k in _probe_chunks(num_probes, chunk):
        G = draw_per_slice(gens, p, k, kind=kind, dtype=op.dtype, device=op.device)
        samples.append(statistic(G.double(), op.matmat(G).double()).cpu())
    return torch.cat(samples, dim=-1)


def hutchinson(
    op: Operator | Tensor,
    *,
    num_matvecs: int,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk: int = 32,
) -> TraceResult:
    """tr(H) ≈ (1/s) Σ_i g_iᵀ H g_i with E[g gᵀ] = I (Hutchinson 1989).

    Args:
        op: operator (J, p, p) or dense symmetric tensor.
        num_matvecs: s probes, one product each (≥ MIN_HUTCHINSON = 10: at 6 the error bar
            covered 83–87% on a power-law spectrum, whose top eigenvalue holds 60% of ‖H‖_F²).
        distribution: "rademacher" (lowest variance for a fixed matrix) or "gaussian".
        chunk: probes per ``matmat`` call (memory vs. per-call overhead).
    Returns:
        TraceResult with value and sample standard error, one entry per stacked operator.
    """
    op = as_operator(op)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(
            f"unknown probe distribution {distribution!r}; use 'gaussian' or 'rademacher'")
    _check_budget(num_matvecs, MIN_HUTCHINSON, "hutchinson")
    samples = _probe_samples(
        op, num_matvecs, seed, distribution, chunk,
        lambda G, HG: torch.stack([(G * HG).sum(dim=1), HG.pow(2).sum(dim=1)]))
    # full worst-case floor: undeflated samples keep every outlier, the heaviest tails
    return _result(samples[0], num_matvecs, seed, f"hutchinson-{distribution}",
                   frobenius=samples[1], factor=1.0)


def _result(samples: Tensor, num_matvecs: int, seed: int, method: str, offset=0.0,
            frobenius: Tensor | None = None, factor: float = 0.7) -> TraceResult:
    """Mean and t-widened stderr; for trace samples with their ‖Mg‖² (``frobenius``) the
    stderr is floored by :func:`trace_stderr_floor`."""
    mean, se, dof, q = mean_stderr(samples)
    J, s = samples.shape
    if frobenius is not None:
        se = np.maximum(se, trace_stderr_floor(frobenius.mean(dim=-1).numpy(), s, factor))
    return TraceResult(np.asarray(offset) + mean, se, num_matvecs, int(seed), method, dof=dof,
                       quantile=q, num_probes=np.full(J, s))


def frobenius_sq_hutchinson(
    op: Operator | Tensor, *, num_matvecs: int, seed: int = 0, chunk: int = 32
) -> TraceResult:
    """‖H‖_F² = tr(H²) ≈ (1/s) Σ_i ‖H g_i‖², Rademacher g — the recipe of PyHessian-style code."""
    op = as_operator(op)
    _check_budget(num_matvecs, MIN_PROBES, "frobenius_sq (hutchinson)")
    samples = _probe_samples(op, num_matvecs, seed, "rademacher", chunk,
                             lambda G, HG: HG.pow(2).sum(dim=1))
    return _result(samples, num_matvecs, seed, "hutchinson")


def _project_out(basis: Tensor, G: Tensor) -> Tensor:
    """(I − B Bᵀ) G for orthonormal rows of ``basis`` (J, m, p) and G (J, p, k), twice."""
    for _ in range(2):
        G = G - torch.einsum("jmp,jmk->jpk", basis, torch.einsum("jmp,jpk->jmk", basis, G))
    return G


def hutchpp(
    op: Operator | Tensor, *, num_matvecs: int, seed: int = 0, chunk: int = 32
) -> TraceResult:
    """tr(H) by Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    A third of the budget sketches S (p×s), Q = orth(H S); tr(Qᵀ H Q) is exact on that range
    (another third), and Hutchinson with the rest estimates tr((I−QQᵀ) H (I−QQᵀ)); the sketch
    shrinks where needed to leave MIN_PROBES probes. num_matvecs ≥ 20: below that the probes
    left after a partial sketch of an outlier spectrum gave error bars that covered < 90%
    (tests/linalg/test_calibration.py).
    The standard error is that of the Hutchinson part; the sketch part is exact given Q.
    """
    op = as_operator(op)
    _check_budget(num_matvecs, MIN_SKETCH_BUDGET, "hutchpp")
    J, p, _ = op.shape
    gen = make_generator(seed)
    s = min(max(1, min(num_matvecs // 3, (num_matvecs - MIN_PROBES) // 2)), p)
    g = num_matvecs - 2 * s
    S = random_block((J, p, s), gen, kind="rademacher", dtype=op.dtype, device=op.device)
    Qm, _ = torch.linalg.qr(op.matmat(S))  # (J, p, s)
    HQ = op.matmat(Qm)
    exact = torch.einsum("jpk,jpk->j", Qm.double(), HQ.double()).cpu()
    samples, fro = [], []
    basis = Qm.transpose(1, 2)
    for k in _probe_chunks(g, chunk):
        G = random_block((J, p, k), gen, kind="rademacher", dtype=op.dtype, device=op.device)
        G = _project_out(basis, G)
        HG = op.matmat(G).double()
        samples.append(torch.einsum("jpk,jpk->jk", G.double(), HG).cpu())
        fro.append(HG.pow(2).sum(dim=1).cpu())  # ‖H(I−QQᵀ)g‖² ≥ ‖(I−QQᵀ)H(I−QQᵀ)g‖² in mean
    return _result(torch.cat(samples, dim=1), num_matvecs, seed, "hutch++", exact.numpy(),
                   frobenius=torch.cat(fro, dim=1))


def xtrace(
    op: Operator | Tensor, *, num_matvecs: int, seed: int = 0
) -> TraceResult:
    """tr(H) by XTrace (Epperly, Tropp & Webber 2024): every probe is both sketch and probe.

    With s = ⌊num_matvecs/2⌋ Gaussian vectors Ω, Y = HΩ = QR and Z = HQ (2s products). For each
    i, Q_(i) spans the sketch without column i: Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ with s_i the
    normalized i-th column of R⁻ᵀ. Since ω_i is independent of Q_(i),
        t_i = tr(Q_(i)ᵀ H Q_(i)) + u_iᵀ H u_i,  u_i = (I − Q_(i)Q_(i)ᵀ) ω_i,
    is unbiased: tr(Q_(i)ᵀHQ_(i)) = tr(K) − s_iᵀ K s_i with K = QᵀZ, and H u_i = y_i − Z(w_i −
    s_i (s_iᵀ w_i)), w_i = Qᵀω_i, needs no further product. num_matvecs ≥ 20 (as Hutch++).
    The estimate is the mean of the t_i and the standard error their spread / sqrt(s)
    (t-widened; the t_i are exchangeable, not independent, as in the paper's error estimate),
    floored like Hutchinson's by the residual ‖H u_i‖² (sampling.trace_stderr_floor).
    The leave-one-out algebra assumes HΩ has full column rank (s ≤ rank H, as for a
    Hessian); a rank-deficient sketch is not special-cased.
    """
    op = as_operator(op)
    _check_budget(num_matvecs, MIN_SKETCH_BUDGET, "xtrace")
    J, p, _ = op.shape
    s = min(num_matvecs // 2, p)
    gen = make_generator(seed)
    Om = random_block((J, p, s), gen, kind="gaussian", dtype=op.dtype, device=op.device)
    Y = op.matmat(Om).double()
    Om = Om.double()
    Q, R = torch.linalg.qr(Y)
    Z = op.matmat(Q.to(op.dtype)).double()
    K = Q.transpose(1, 2) @ Z
    K = (K + K.transpose(1, 2)) / 2
    S = torch.linalg.pinv(R).transpose(1, 2)  # columns ∝ R⁻ᵀ e_i
    S = S / torch.linalg.vector_norm(S, dim=1, keepdim=True).clamp_min(1e-300)
    W = Q.transpose(1, 2) @ Om  # (J, s, s)
    d = (S * W).sum(dim=1, keepdim=True)  # s_iᵀ w_i
    C = W - S * d
    U = Om - Q @ C
    HU = Y - Z @ C
    sKs = (S * (K @ S)).sum(dim=1)
    trK = torch.diagonal(K, dim1=1, dim2=2).sum(-1, keepdim=True)
    samples = (trK - sKs + (U * HU).sum(dim=1)).cpu()
    return _result(samples, 2 * s, seed, "xtrace", frobenius=HU.pow(2).sum(dim=1).cpu(),
                   factor=1.0)


def trace(
    op: Operator | Tensor,
    *,
    num_matvecs: int | None = None,
    seed: int = 0,
    method: str = "auto",
    rtol: float | None = None,
    max_matvecs: int = 400,
) -> TraceResult:
    """tr(H) by "auto" (default), "deflated", "hutchinson", "hutch++" or "xtrace".

    "auto" is the Krylov-deflated estimator with the split chosen from the variance it
    estimates (hessrank.linalg.deflated): on flat, indefinite spectra (initialization) it spends
    its budget on probes, as plain Hutchinson, where Hutch++ and a fixed deflation measured 2–3×
    worse; on outlier-dominated spectra it deflates them. "deflated" is the same estimator.
    ``rtol`` (auto/deflated only) spends products until the estimate is predicted to be within
    rtol of the truth in 90 % of runs (:func:`~hessrank.linalg.deflated.error_quantile`).
    """
    if method in ("auto", "deflated"):
        est = deflated_estimate(op, num_matvecs=num_matvecs, seed=seed, rtol=rtol,
                                max_matvecs=max_matvecs, target="trace")
        return TraceResult(est.trace, est.trace_stderr, est.num_matvecs, int(seed),
                           "deflated-adaptive", dof=est.dof, quantile=est.quantile,
                           num_probes=est.num_probes, rtol=rtol, reached_rtol=est.reached_rtol)
    if method not in _TRACE_METHODS:
        raise ValueError(
            f"unknown method {method!r}; use one of {', '.join(['auto', *_TRACE_METHODS])}")
    if rtol is not None:
        raise ValueError(f"rtol= needs method='auto' or 'deflated', not {method!r}")
    if num_matvecs is None:
        raise ValueError("pass num_matvecs= (a fixed budget)")
    return _TRACE_METHODS[method](op, num_matvecs=num_matvecs, seed=seed)


def frobenius_sq(
    op: Operator | Tensor,
    *,
    num_matvecs: int | None = None,
    seed: int = 0,
    method: str = "deflated",
    num_probes: int | None = None,
    rtol: float | None = None,
    max_matvecs: int = 400,
) -> TraceResult:
    """‖H‖_F² = tr(H²) by Krylov deflation plus sampled residual.

    With the Lanczos basis V (p×m, orthonormal) and tridiagonal T:
    ‖HV‖_F² = ‖T‖_F² + β_m² exactly; ‖H(I − VVᵀ)‖_F² = E‖H(I − VVᵀ)g‖², g Rademacher.
    The outliers that dominate a Hessian's Frobenius norm are captured deterministically by the
    Krylov space; only the bulk is sampled. The split between Lanczos steps and probes is chosen
    from the data (hessrank.linalg.deflated), so a flat spectrum gets plain Hutchinson's
    accuracy and an outlier-dominated one the deflation's.

    Args:
        op: symmetric operator, shape (J, p, p), or a dense (p, p) tensor.
        num_matvecs: total products spent (Lanczos steps + residual probes), fixed budget.
        seed: seeds every random draw; same seed, same result.
        method: "deflated" (default) or "hutchinson" (plain (1/s) Σ ‖H g‖², for comparison).
        num_probes: a fixed split for "deflated" (num_matvecs − num_probes Lanczos steps).
        rtol, max_matvecs: spend products until the estimate is predicted to be within
            ``rtol`` of the truth in 90 % of runs (at most ``max_matvecs``).
    Returns:
        TraceResult(value, stderr, num_matvecs, ...) with one entry per stacked operator.
    """
    if method == "hutchinson":
        if rtol is not None:
            raise ValueError("rtol= needs method='deflated'")
        return frobenius_sq_hutchinson(op, num_matvecs=num_matvecs, seed=seed)
    if method != "deflated":
        raise ValueError(f"unknown method {method!r}; use 'deflated' or 'hutchinson'")
    est = deflated_estimate(op, num_matvecs=num_matvecs, seed=seed, num_probes=num_probes,
                            rtol=rtol, max_matvecs=max_matvecs, target="frobenius")
    return TraceResult(
        est.frobenius_sq, est.frobenius_sq_stderr, est.num_matvecs, int(seed), "krylov-deflated",
        dof=est.dof, quantile=est.quantile, num_probes=est.num_probes, rtol=rtol,
        reached_rtol=est.reached_rtol)


_TRACE_METHODS = {"hutchinson": hutchinson, "hutch++": hutchpp, "xtrace": xtrace}
