"""Diagnostics for a reversal: what changes in the Hessian when the small-n excess flips sign.

Per (round, subject) three numbers explain a stable rank srank(H) = ‖H‖_F² / ‖H‖₂²:

1. **The split H = G + R** into the generalized Gauss–Newton matrix G = Jᵀ H_out J (positive
   semi-definite for cross-entropy) and the residual R = Σ_o (∂ℓ/∂f_o) ∇²f_o = H − G
   (:class:`~hessrank.linalg.stack.LinearCombination` ``([H, G], [1, −1])``). For each part
   P ∈ {H, G, R}: ‖P‖_F² and srank(P) (``hr.stable_rank``, Krylov-deflated, with stderr) and
   the extreme eigenvalues λ_max(P), λ_min(P) (``hr.lanczos``, the extreme Ritz values of one
   run, with their residual norms as error bars). A residual that grows late (‖R‖_F² / ‖H‖_F²
   rising) means the reversal lives in the part of H that the GGN does not see.
2. **The negative-eigenvalue mass** of H,

       ν(H) = Σ_{λ<0} λ² / Σ_λ λ²  ∈ [0, 1],

   from SLQ (``hr.spectral_density``): per probe l the Gauss quadratures
   a_l = Σ_i τ_{l,i}² θ_{l,i}² [θ_{l,i} < 0] and b_l = Σ_i τ_{l,i}² θ_{l,i}², ν̂ = ā / b̄
   (a ratio of means, consistent as the probes grow), ± the leave-one-probe-out jackknife.
3. **Outliers vs classes.** The bulk edge e is read from the SLQ density smoothed by a
   Gaussian of width σ (default 1 % of the spectral range): e is the largest x where the
   smoothed density ρ(x) exceeds κ · ρ₁, with ρ₁ = 1 / (p σ √(2π)) the peak height of a
   *single* eigenvalue's bump and κ = ``outlier_kappa`` (default 3): the bulk is where more
   than κ eigenvalues share one σ-window. The outliers are the converged Lanczos Ritz values
   (largest algebraic, residual ≤ tol·max|θ|) above e; Papyan (2019) predicts about C of them
   for C classes. Outliers closer than ~3σ to the bulk are not separated by this rule.

Every function returns tidy rows (:data:`COLUMNS`): one row per (subject, part, quantity).
Across replicates, :func:`reversal_tests` asks of each ingredient whether the small-n excess
reverses (n_small − n_large with the study's tests and four verdicts) and
:func:`summarize` gives per-round means.

Example:
    >>> lam = torch.cat([torch.linspace(-1, 1, 200), torch.tensor([20., 25., 30.])])
    >>> A = torch.diag(lam).double()
    >>> rows = outlier_rows(A, num_matvecs=60, density_probes=8, density_steps=60, seed=0)
    >>> int(rows.loc[rows["quantity"] == "num-outliers", "value"].iloc[0])
    3
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hessrank.analysis import inference as inf
from hessrank.analysis.subjects import build_operator, parse_subjects, realize
from hessrank.fl.rundir import RunDir
from hessrank.linalg import DensityResult, lanczos, spectral_density, stable_rank
from hessrank.linalg.operator import Operator, as_operator
from hessrank.linalg.stack import LinearCombination

__all__ = [
    "COLUMNS",
    "DIAGNOSTIC_KEYS",
    "bulk_edge",
    "diagnose",
    "diagnostics_seed",
    "negative_mass",
    "negative_mass_rows",
    "outlier_rows",
    "reversal_tests",
    "run_diagnostics",
    "split_rows",
    "summarize",
]

COLUMNS = ["subject", "subject_kind", "subject_size", "part", "quantity", "value", "stderr",
           "matvecs", "seconds", "seed"]
"""Columns of every diagnostics table (the study adds ``round``, ``replicate``).

part: "hessian", "ggn" or "residual" (H − GGN). quantity: "frobenius-sq", "stable-rank",
"lambda-max", "lambda-min" (split); "negative-mass" (hessian); "bulk-edge", "num-outliers",
"num-outliers-unconverged", "num-classes" (hessian)."""

DIAGNOSTIC_KEYS = ("subjects", "rounds", "matvecs", "density_probes", "density_steps",
                   "outlier_kappa")
"""Keys of a study spec's optional ``[diagnostics]`` section (:func:`run_diagnostics`)."""


def _row(j_name, part, quantity, value, stderr, matvecs, seconds, seed) -> dict[str, Any]:
    name, kind, size = j_name
    return {"subject": name, "subject_kind": kind, "subject_size": int(size), "part": part,
            "quantity": quantity, "value": float(value), "stderr": float(stderr),
            "matvecs": int(matvecs), "seconds": float(seconds), "seed": int(seed)}


def _names(J: int, subjects: Sequence[tuple[str, str, int]] | None):
    if subjects is None:
        return [(f"op{j}", "operator", 0) for j in range(J)]
    if len(subjects) != J:
        raise ValueError(f"{len(subjects)} subject names for a stack of {J} operators")
    return list(subjects)


def split_rows(hessian: Operator | torch.Tensor, ggn: Operator | torch.Tensor, *,
               num_matvecs: int = 40, seed: int = 0,
               subjects: Sequence[tuple[str, str, int]] | None = None) -> pd.DataFrame:
    """‖P‖_F², srank(P), λ_max(P), λ_min(P) for P = H, G and R = H − G (module doc, 1).

    Args:
        hessian, ggn: operators of one shape (J, p, p) (dense tensors are wrapped).
        num_matvecs: budget of each estimator call (per part: one ``stable_rank`` and one
            ``lanczos`` run, so 2·num_matvecs products of P; R costs products of H and G).
        seed: seeds every draw (the same probes for the three parts: their differences are
            paired).
        subjects: (name, kind, size) per stacked operator, for the rows.
    Returns:
        Rows (:data:`COLUMNS`); λ stderr is the Ritz residual norm.
    """
    H, G = as_operator(hessian), as_operator(ggn)
    J = H.shape[0]
    names = _names(J, subjects)
    rows = []
    for part, op in (("hessian", H), ("ggn", G), ("residual", LinearCombination([H, G], [1, -1]))):
        t0 = time.perf_counter()
        sr = stable_rank(op, num_matvecs=num_matvecs, seed=seed)
        m = min(int(num_matvecs), op.shape[1])
        eig = lanczos(op, k=m, which="LA", num_matvecs=num_matvecs, seed=seed,
                      return_eigenvectors=False)
        dt = time.perf_counter() - t0
        mv = sr.num_matvecs + eig.num_matvecs
        for j, nm in enumerate(names):
            rows += [
                _row(nm, part, "frobenius-sq", sr.frobenius_sq[j], sr.frobenius_sq_stderr[j],
                     mv, dt, seed),
                _row(nm, part, "stable-rank", sr.value[j], sr.stderr[j], mv, dt, seed),
                _row(nm, part, "lambda-max", eig.eigenvalues[j, 0], eig.residual_norms[j, 0],
                     mv, dt, seed),
                _row(nm, part, "lambda-min", eig.eigenvalues[j, -1], eig.residual_norms[j, -1],
                     mv, dt, seed),
            ]
    return pd.DataFrame(rows, columns=COLUMNS)


def negative_mass(density: DensityResult) -> tuple[np.ndarray, np.ndarray]:
    """ν = Σ_{λ<0} λ² / Σ λ² per stacked operator from SLQ quadrature, ± probe jackknife
    (module doc, 2); each (J,). The stderr is NaN with fewer than 3 probes."""
    sq = density.nodes ** 2
    num = np.sum(density.weights * sq * (density.nodes < 0), axis=-1)  # (J, L)
    den = np.sum(density.weights * sq, axis=-1)
    vals, errs = [], []
    for j in range(num.shape[0]):
        pairs = np.column_stack([num[j], den[j]])
        v, se = inf.jackknife(pairs, statistic=lambda a: a[:, 0].mean() / a[:, 1].mean())
        vals.append(v)
        errs.append(se)
    return np.array(vals), np.array(errs)


def bulk_edge(density: DensityResult, *, kappa: float = 3.0,
              sigma: float | None = None) -> np.ndarray:
    """Upper edge of the bulk per stacked operator (module doc, 3): the largest grid point
    where the smoothed SLQ density exceeds κ / (p σ √(2π))."""
    if kappa <= 0:
        raise ValueError(f"outlier_kappa must be > 0, got {kappa}")
    lo, hi = float(density.nodes.min()), float(density.nodes.max())
    if sigma is None:
        sigma = 0.01 * max(hi - lo, 1e-12)
    grid, dens = density.smoothed(sigma=sigma)
    thresh = kappa / (density.dim * sigma * math.sqrt(2 * math.pi))
    out = np.empty(dens.shape[0])
    for j in range(dens.shape[0]):
        above = np.nonzero(dens[j] > thresh)[0]
        out[j] = grid[above[-1]] if above.size else grid[-1]
    return out


def negative_mass_rows(density: DensityResult, *, seed: int = 0, seconds: float = 0.0,
                       subjects: Sequence[tuple[str, str, int]] | None = None) -> pd.DataFrame:
    """Rows of ν(H) (part "hessian", quantity "negative-mass") from a density."""
    v, se = negative_mass(density)
    names = _names(v.shape[0], subjects)
    return pd.DataFrame([_row(nm, "hessian", "negative-mass", v[j], se[j],
                              density.num_matvecs, seconds, seed)
                         for j, nm in enumerate(names)], columns=COLUMNS)


def outlier_rows(hessian: Operator | torch.Tensor, *, num_matvecs: int = 40,
                 density_probes: int = 8, density_steps: int | None = None, seed: int = 0,
                 kappa: float = 3.0, num_classes: int | None = None,
                 density: DensityResult | None = None,
                 subjects: Sequence[tuple[str, str, int]] | None = None) -> pd.DataFrame:
    """Bulk edge, number of outliers (converged and not) and, if given, the number of classes
    (module doc, 3). ``density`` reuses an SLQ run of the same operator."""
    H = as_operator(hessian)
    J, p, _ = H.shape
    names = _names(J, subjects)
    t0 = time.perf_counter()
    if density is None:
        density = spectral_density(H, num_probes=density_probes,
                                   lanczos_steps=density_steps or num_matvecs, seed=seed)
    edge = bulk_edge(density, kappa=kappa)
    m = min(int(num_matvecs), p)
    eig = lanczos(H, k=m, which="LA", num_matvecs=num_matvecs, seed=seed,
                  return_eigenvectors=False)
    dt = time.perf_counter() - t0
    mv = density.num_matvecs + eig.num_matvecs
    rows = []
    for j, nm in enumerate(names):
        above = eig.eigenvalues[j] > edge[j]
        conv = eig.converged[j]
        rows += [_row(nm, "hessian", "bulk-edge", edge[j], float("nan"), mv, dt, seed),
                 _row(nm, "hessian", "num-outliers", np.sum(above & conv), float("nan"), mv,
                      dt, seed),
                 _row(nm, "hessian", "num-outliers-unconverged", np.sum(above & ~conv),
                      float("nan"), mv, dt, seed)]
        if num_classes is not None:
            rows.append(_row(nm, "hessian", "num-classes", num_classes, float("nan"), 0, 0.0,
                             seed))
    return pd.DataFrame(rows, columns=COLUMNS)


def diagnose(hessian: Operator | torch.Tensor, ggn: Operator | torch.Tensor, *,
             num_matvecs: int = 40, density_probes: int = 8, density_steps: int | None = None,
             seed: int = 0, kappa: float = 3.0, num_classes: int | None = None,
             subjects: Sequence[tuple[str, str, int]] | None = None) -> pd.DataFrame:
    """All diagnostics of one stack of subjects: :func:`split_rows`, ν(H) and the outliers
    (one SLQ run of H feeds both)."""
    H = as_operator(hessian)
    t0 = time.perf_counter()
    dens = spectral_density(H, num_probes=density_probes,
                            lanczos_steps=density_steps or num_matvecs, seed=seed)
    dt = time.perf_counter() - t0
    return pd.concat([
        split_rows(H, ggn, num_matvecs=num_matvecs, seed=seed, subjects=subjects),
        negative_mass_rows(dens, seed=seed, seconds=dt, subjects=subjects),
        outlier_rows(H, num_matvecs=num_matvecs, seed=seed, kappa=kappa,
                     num_classes=num_classes, density=dens, subjects=subjects),
    ], ignore_index=True)


def diagnostics_seed(seed: int, round_idx: int, label: str) -> int:
    """Estimator seed of one (round, subject group): a 31-bit word of
    SeedSequence((seed, round, crc32(label), 2)) — independent probe streams per round and
    subject group (the 2 separates it from other streams of the same seed)."""
    words = [int(seed), int(round_idx), zlib.crc32(label.encode()), 2]
    return int(np.random.SeedSequence(words).generate_state(1)[0]) & 0x7FFFFFFF


def run_diagnostics(run_dir: str | Path, *, seed: int = 0, rounds: Sequence[int] | None = None,
                    subjects: str = "server,subset:50x5,subset:500x5", matvecs: int = 40,
                    density_probes: int = 8, density_steps: int | None = None,
                    outlier_kappa: float = 3.0, dtype: torch.dtype | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """:func:`diagnose` at each chosen saved round of a training run, for the server and
    random subsets (the subject syntax of ``hessrank analyze``; subset draws come from
    ``seed`` exactly as in ``analyze``, so with the same seed draw d is the same subset as the
    analysis's draw d). Estimator seeds: :func:`diagnostics_seed` per (round, group).

    Returns the rows of :data:`COLUMNS` with ``round`` first.
    """
    from tqdm.auto import tqdm

    run = RunDir(run_dir)
    saved = run.rounds()
    chosen = saved if rounds is None else [int(r) for r in rounds]
    missing = sorted(set(chosen) - set(saved))
    if missing:
        raise ValueError(f"{run_dir} has no checkpoints for rounds {missing}; saved: {saved}")
    specs = parse_subjects(subjects)
    bad = sorted({s.kind for s in specs} - {"server", "subset"})
    if bad:
        raise ValueError(f"diagnostics subjects are server and subset:NxD, got {bad}")
    client_data = run.client_data()
    groups = realize(specs, client_data=client_data, seed=seed)
    loss_fn = run.task()
    num_classes = int(torch.cat([y for _, y in client_data]).max()) + 1
    frames = []
    for r in tqdm(chosen, desc="diagnostics", disable=not progress):
        model = run.load_model(r, dtype=dtype)
        for g in groups:
            s = diagnostics_seed(seed, r, g.label)
            H = build_operator(g, model, loss_fn, curvature="hessian")
            G = build_operator(g, model, loss_fn, curvature="ggn")
            names = [(sub.name, sub.kind, sub.size) for sub in g.subjects]
            rows = diagnose(H, G, num_matvecs=matvecs, density_probes=density_probes,
                            density_steps=density_steps, seed=s, kappa=outlier_kappa,
                            num_classes=num_classes, subjects=names)
            frames.append(rows.assign(round=int(r)))
    table = pd.concat(frames, ignore_index=True)
    return table[["round", *COLUMNS]]


REVERSAL_TESTS = (
    # (name, part, quantity, transform, min_effect): fixed with the diagnostics, before the
    # replicated diagnostics were run
    ("hessian_srank", "hessian", "stable-rank", "log", 0.05),
    ("ggn_srank", "ggn", "stable-rank", "log", 0.05),
    ("residual_srank", "residual", "stable-rank", "log", 0.05),
    ("residual_share", "derived", "residual-share", "identity", 0.005),
    ("negative_mass", "hessian", "negative-mass", "identity", 0.001),
)
"""What :func:`reversal_tests` tests, each as n_small − n_large of one diagnostic:
residual-share = ‖R‖_F² / ‖H‖_F² (how much of H the GGN misses)."""


def _with_derived(table: pd.DataFrame) -> pd.DataFrame:
    """Adds rows of part "derived", quantity "residual-share" = ‖R‖_F² / ‖H‖_F²."""
    t = table if "replicate" in table.columns else table.assign(replicate=0)
    key = ["replicate", "round", "subject", "subject_kind", "subject_size"]
    fro = t[t["quantity"] == "frobenius-sq"].pivot_table(index=key, columns="part",
                                                         values="value")
    share = (fro["residual"] / fro["hessian"]).rename("value").reset_index()
    share = share.assign(part="derived", quantity="residual-share", stderr=float("nan"))
    return pd.concat([t, share], ignore_index=True)


def reversal_tests(table: pd.DataFrame, *, phases=None, last_round: int | None = None,
                   small: int = 50, large: int = 500, alpha: float = 0.05,
                   adjust: str = "holm", method: str = "t", num_resamples: int = 4000,
                   seed: int = 0) -> pd.DataFrame:
    """n_small − n_large of each diagnostic of :data:`REVERSAL_TESTS` per phase, by
    :func:`hessrank.analysis.inference.test_hypotheses` (by default the t-test on the
    replicate statistics, four verdicts; one family). Answers "does the GGN alone also
    reverse?" (ggn_srank) and "does the part of H that the GGN misses grow at small n?"
    (residual_share, negative_mass)."""
    t = _with_derived(table)
    units, deltas, transforms = {}, {}, {}
    for name, part, quantity, transform, delta in REVERSAL_TESTS:
        sub = t[t["part"] == part]
        units[name] = inf.subset_size_units(sub, small, large, quantity, transform)
        deltas[name], transforms[name] = delta, transform
    return inf.test_hypotheses(units, min_effect=deltas, phases=phases, last_round=last_round,
                               alpha=alpha, adjust=adjust, method=method,
                               num_resamples=num_resamples, seed=seed, transform=transforms)


SUMMARY_QUANTITIES = (
    ("hessian", "stable-rank"), ("ggn", "stable-rank"), ("residual", "stable-rank"),
    ("derived", "residual-share"), ("hessian", "negative-mass"), ("hessian", "lambda-min"),
    ("hessian", "num-outliers"),
)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (round, subject size, part, quantity) of :data:`SUMMARY_QUANTITIES`: the mean over
    replicates and draws, the SD over them and their count (server: size N)."""
    t = _with_derived(table)
    keep = pd.Series(False, index=t.index)
    for part, q in SUMMARY_QUANTITIES:
        keep |= (t["part"] == part) & (t["quantity"] == q)
    g = t[keep].groupby(["round", "subject_kind", "subject_size", "part", "quantity"])["value"]
    return g.agg(mean="mean", sd="std", n="count").reset_index()
