"""Stochastic Lanczos quadrature (Golub & Meurant 1994; Ubaru, Chen & Saad 2017).

For a unit probe v, m Lanczos steps give T = Y diag(θ) Yᵀ and the Gauss quadrature
vᵀ f(H) v ≈ Σ_i τ_i² f(θ_i) with τ_i = Y[0, i]. Averaging over Rademacher probes scaled to unit
norm, tr f(H) ≈ p · mean_l Σ_i τ_{l,i}² f(θ_{l,i}). The raw tridiagonals are kept so a density
can be re-smoothed or re-integrated later without new products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.lanczos import lanczos_tridiagonal, restart_generator
from hessrank.linalg.operator import Operator, as_operator, make_generator, random_block


@dataclass(frozen=True)
class DensityResult:
    """Quadrature nodes and weights of SLQ for J stacked operators.

    alpha, beta: (J, L, m) raw tridiagonals for L probes of m steps (float64).
    nodes: (J, L, m) Ritz values θ; weights: (J, L, m) τ² (each probe's weights sum to 1).
    dim: p, the operator dimension (weights integrate to p · density).
    """

    alpha: np.ndarray
    beta: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    num_matvecs: int
    seed: int

    @classmethod
    def from_tridiagonals(
        cls, alpha: np.ndarray, beta: np.ndarray, dim: int, num_matvecs: int, seed: int
    ) -> DensityResult:
        a = torch.as_tensor(alpha, dtype=torch.float64)
        b = torch.as_tensor(beta, dtype=torch.float64)[..., :-1]
        T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
        theta, Y = torch.linalg.eigh(T)
        return cls(
            alpha=np.asarray(alpha, dtype=np.float64),
            beta=np.asarray(beta, dtype=np.float64),
            nodes=theta.numpy(),
            weights=Y[..., 0, :].pow(2).numpy(),
            dim=int(dim),
            num_matvecs=int(num_matvecs),
            seed=int(seed),
        )

    def trace_fn(self, f: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """tr f(H) per stacked operator and its standard error over probes, each (J,)."""
        per_probe = self.dim * np.sum(self.weights * f(self.nodes), axis=-1)  # (J, L)
        L = per_probe.shape[-1]
        if L > 1:
            se = per_probe.std(axis=-1, ddof=1) / math.sqrt(L)
        else:
            se = np.full(per_probe.shape[:-1], np.nan)
        return per_probe.mean(axis=-1), se

    def smoothed(
        self, grid: np.ndarray | None = None, *, sigma: float | None = None, num_points: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        """Density on a grid by Gaussian smoothing of the quadrature, normalized to integrate to 1.

        Returns (grid (G,), density (J, G)). ``sigma`` defaults to 1% of the spectral range. The
        default grid has at least 10 points per σ so that the density integrates to 1 on it.
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        width = max(hi - lo, 1e-12)
        if sigma is None:
            sigma = 0.01 * width
        if grid is None:
            span = hi - lo + 10 * sigma
            num_points = max(num_points, min(int(10 * span / sigma) + 1, 20_000))
            grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
        z = (grid[None, None, None, :] - self.nodes[..., None]) / sigma
        kern = np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
        dens = np.einsum("jlm,jlmg->jg", self.weights, kern) / self.nodes.shape[1]
        return grid, dens

    def effective_rank(self) -> tuple[np.ndarray, np.ndarray]:
        """Entropy effective rank exp(−Σ q_i log q_i), q_i = |λ_i| / Σ|λ| (Roy & Vetterli 2007).

        With S = Σ|λ|: −Σ q log q = log S − (1/S) Σ |λ| log|λ|, both traces from SLQ.
        The standard error is propagated from the probe-to-probe spread of both traces.
        """
        tiny = 1e-300
        per_probe_S = self.dim * np.sum(self.weights * np.abs(self.nodes), axis=-1)
        ent_f = np.abs(self.nodes) * np.log(np.maximum(np.abs(self.nodes), tiny))
        per_probe_E = self.dim * np.sum(self.weights * ent_f, axis=-1)
        S, E = per_probe_S.mean(-1), per_probe_E.mean(-1)
        erank = np.exp(np.log(S) - E / S)
        L = per_probe_S.shape[-1]
        if L < 2:
            return erank, np.full(erank.shape, np.nan)
        # delta method on g(S, E) = exp(log S − E/S)
        dS = erank * (1.0 / S + E / S**2)
        dE = erank * (-1.0 / S)
        cov = np.array(
            [np.cov(per_probe_S[j], per_probe_E[j]) / L for j in range(per_probe_S.shape[0])]
        )
        var = dS**2 * cov[:, 0, 0] + dE**2 * cov[:, 1, 1] + 2 * dS * dE * cov[:, 0, 1]
        return erank, np.sqrt(np.maximum(var, 0.0))


def spectral_density(
    op: Operator | Tensor,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 40,
    seed: int = 0,
    chunk: int = 16,
) -> DensityResult:
    """SLQ spectral density: ``num_probes`` Lanczos runs of ``lanczos_steps`` steps each.

    All probes of a chunk advance together (one ``matmat`` of ``chunk`` columns per step), with
    full reorthogonalization inside each run. Costs num_probes × lanczos_steps matvecs.
    """
    op = as_operator(op)
    J, p, _ = op.shape
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    m = min(int(lanczos_steps), p)
    if m < 1:
        raise ValueError(f"lanczos_steps must be >= 1, got {lanczos_steps}")
    gen, restart = make_generator(seed), restart_generator(seed)
    alphas, betas = [], []
    done = 0
    while done < num_probes:
        b = min(chunk, num_probes - done)
        V = random_block((J, p, b), gen, kind="rademacher", dtype=op.dtype, device=op.device)
        kr = lanczos_tridiagonal(op, V, m, generator=restart, keep_basis=False)
        alphas.append(kr.alpha)
        betas.append(kr.beta)
        done += b
    alpha = torch.cat(alphas, dim=1).numpy()
    beta = torch.cat(betas, dim=1).numpy()
    return DensityResult.from_tridiagonals(alpha, beta, p, num_probes * m, int(seed))
