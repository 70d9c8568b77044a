"""Probe streams and error bars shared by the stochastic estimators (Student 1908 for the t).

Each stacked operator draws its probes from its own generator, seeded from (seed, j), so that an
estimator that gives different operators different schedules still gives each one a result that
depends on its own matrix and the seed only. Standard errors are widened from the normal to the
Student-t quantile for the number of samples behind them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from hessrank.linalg.operator import random_block

Z975 = float(stats.norm.ppf(0.975))
LEVEL = 0.975
"""Two-sided level of the interval value ± 2·stderr (see :func:`widen`)."""


def t_quantile(dof) -> np.ndarray:
    """t_{(1+LEVEL)/2}(dof), elementwise; NaN where dof < 1 (no error bar)."""
    d = np.asarray(dof, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(d >= 1, stats.t.ppf((1 + LEVEL) / 2, np.maximum(d, 1)), np.nan)


def widen(se: np.ndarray, dof) -> np.ndarray:
    """se · t_{0.9875}(dof) / 2: value ± 2·widened is the Student-t 97.5% interval.

    The normal ±2 se is too narrow with a handful of probes (it covered 85–89% at 20 products),
    and a 95% interval misses 10% of 30 seeds too often to be a contract (the chance that 4 or
    more of 30 miss is 6% per cell); at 97.5% that chance is under 1%.
    """
    q = t_quantile(dof)
    return np.where(np.asarray(dof) >= 1, np.asarray(se) * q / 2, np.asarray(se))


def mean_stderr(samples: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, t-widened standard error, dof and t quantile over the last axis of (J, s) samples.

    With one sample the standard error is NaN (dof 0).
    """
    s = samples.shape[-1]
    mean = samples.mean(dim=-1).numpy()
    dof = np.full(mean.shape, s - 1, dtype=float)
    if s < 2:
        return mean, np.full(mean.shape, np.nan), dof, np.full(mean.shape, np.nan)
    se = (samples.std(dim=-1, correction=1) / math.sqrt(s)).numpy()
    return mean, widen(se, dof), dof, t_quantile(dof)


def slice_generators(seed: int, J: int) -> list[torch.Generator]:
    """One CPU generator per stacked operator, seeded from (seed, j) by numpy's SeedSequence."""
    gens = []
    for j in range(J):
        g = torch.Generator(device="cpu")
        g.manual_seed(int(np.random.SeedSequence([int(seed), j, 7]).generate_state(1)[0]))
        gens.append(g)
    return gens


def draw_per_slice(gens: list[torch.Generator], p: int, k: int, *, kind: str, dtype,
                   device) -> Tensor:
    """A (J, p, k) block whose slice j comes from ``gens[j]`` only.

    Drawn probe by probe ((k, p) then transposed), so k draws of one probe and one draw of k
    probes give the same vectors: a slice's probes do not depend on how they were batched.
    """
    return torch.stack(
        [random_block((k, p), g, kind=kind, dtype=dtype, device=device).T for g in gens]
    )


def trace_stderr_floor(frobenius_sq: np.ndarray, s: int, factor: float = 0.7) -> np.ndarray:
    """``factor`` × the worst-case standard error of a mean of s samples gᵀMg (Gaussian or
    Rademacher g): Var gᵀMg ≤ 2‖M‖_F², so the floor is factor·sqrt(2‖M‖_F²/s).

    A few probes of an outlier-dominated matrix can all miss the outliers; their sample
    variance is then small exactly when the estimate is off. ‖M‖_F² comes from the same
    products (the mean of ‖Mg‖², or of ‖Hg‖² ≥ for a projected M = (I−P)H(I−P)), so the floor
    costs nothing; on flat spectra the bound is nearly attained (Var = 2‖M‖_F² − 2Σ M_ii² for
    Rademacher probes), so it widens the bar little there.
    """
    return factor * np.sqrt(2 * np.maximum(np.asarray(frobenius_sq, float), 0.0) / s)
