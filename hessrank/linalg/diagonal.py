"""diag(H) by Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad 2007) and XDiag
(Epperly, Tropp & Webber 2024): per-parameter curvature from Hessian-vector products.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.deflated import MIN_PROBES
from hessrank.linalg.operator import Operator, as_operator, make_generator, random_block
from hessrank.linalg.results import DiagonalResult
from hessrank.linalg.sampling import t_quantile, widen

METHODS = ("hutchinson", "xdiag")


def _mean_and_widened(samples: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t-widened standard error over the last axis of (J, p, s) samples."""
    s = samples.shape[-1]
    mean = samples.mean(dim=-1).numpy()
    se = (samples.std(dim=-1, correction=1) / np.sqrt(s)).numpy()
    dof = np.full(samples.shape[0], s - 1, dtype=float)
    return mean, widen(se, dof[:, None]), dof


def diagonal(
    op: Operator | Tensor,
    *,
    method: str = "xdiag",
    num_matvecs: int,
    seed: int = 0,
    chunk: int = 32,
) -> DiagonalResult:
    """diag(H) for each stacked operator.

    "hutchinson": d ≈ (1/s) Σ_i g_i ⊙ H g_i over s = num_matvecs Rademacher probes (exact for a
    diagonal H; the error of entry k comes from the off-diagonal row k).
    "xdiag": with s = ⌊num_matvecs/2⌋ Rademacher vectors Ω, Y = HΩ = QR and Z = HQ. Leaving
    column i out of the sketch, P_i = Q(I − s_i s_iᵀ)Qᵀ with s_i the normalized i-th column of
    R⁻ᵀ, and
        d_i = diag(P_i H) + ω_i ⊙ (I − P_i) H ω_i
            = diag(Q Zᵀ) − (Q s_i) ⊙ (Z s_i) + ω_i ⊙ (Q s_i)(s_iᵀ r_i),
    unbiased because ω_i is independent of P_i (r_i = R e_i). The estimate is the mean of the
    d_i: near exact where the sketch captures the outliers, Hutchinson-like on a flat spectrum.
    The leave-one-out algebra assumes HΩ has full column rank (s ≤ rank H, as for a
    Hessian); a rank-deficient sketch is not special-cased.

    Args:
        op: operator (J, p, p) or dense symmetric tensor.
        method: "xdiag" (default) or "hutchinson".
        num_matvecs: products per operator (hutchinson ≥ MIN_PROBES, xdiag ≥ 2·MIN_PROBES).
        seed: seeds every random draw.
    Returns:
        :class:`DiagonalResult` with value and per-entry stderr (J, p) (t-widened, dof on it).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> diagonal(A, method="hutchinson", num_matvecs=6).value.round(12).tolist()
        [[1.0, 2.0, 3.0, 4.0, 5.0]]
    """
    op = as_operator(op)
    J, p, _ = op.shape
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use 'hutchinson' or 'xdiag'")
    need = MIN_PROBES if method == "hutchinson" else 2 * MIN_PROBES
    if num_matvecs < need:
        raise ValueError(f"diagonal ({method}) needs num_matvecs >= {need}, got {num_matvecs}")
    gen = make_generator(seed)
    if method == "hutchinson":
        parts, done = [], 0
        while done < num_matvecs:
            k = min(chunk, num_matvecs - done)
            G = random_block((J, p, k), gen, kind="rademacher", dtype=op.dtype, device=op.device)
            parts.append((G.double() * op.matmat(G).double()).cpu())
            done += k
        mean, se, dof = _mean_and_widened(torch.cat(parts, dim=-1))
        return DiagonalResult(mean, se, num_matvecs, int(seed), method, dof=dof,
                              quantile=t_quantile(dof))
    s = min(num_matvecs // 2, p)
    Om = random_block((J, p, s), gen, kind="rademacher", dtype=op.dtype, device=op.device)
    Y = op.matmat(Om).double()
    Om = Om.double()
    Q, R = torch.linalg.qr(Y)
    Z = op.matmat(Q.to(op.dtype)).double()
    S = torch.linalg.pinv(R).transpose(1, 2)
    S = S / torch.linalg.vector_norm(S, dim=1, keepdim=True).clamp_min(1e-300)
    QS, ZS = Q @ S, Z @ S
    c = (S * R).sum(dim=1, keepdim=True)  # s_iᵀ r_i, (J, 1, s)
    base = (Q * Z).sum(dim=-1, keepdim=True)  # diag(Q Zᵀ), (J, p, 1)
    samples = (base - QS * ZS + Om * QS * c).cpu()
    mean, se, dof = _mean_and_widened(samples)
    return DiagonalResult(mean, se, 2 * s, int(seed), method, dof=dof, quantile=t_quantile(dof))
