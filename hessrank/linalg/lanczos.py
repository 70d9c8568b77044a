"""Lanczos with full reorthogonalization (Lanczos 1950; Paige 1972 on why it is needed).

The core, :func:`lanczos_tridiagonal`, runs ``b`` independent recurrences for each of the J
stacked operators at once: one ``matmat`` call per step advances all J·b of them. Single runs
(eigenpairs, Krylov deflation) use b = 1; stochastic Lanczos quadrature uses b = probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hessrank.linalg.operator import Operator, as_operator, make_generator, random_block
from hessrank.linalg.results import EigenResult

_WHICH = ("LM", "LA", "SA")


@dataclass
class Krylov:
    """Output of :func:`lanczos_tridiagonal` for J operators × b starts and m steps.

    alpha: (J, b, m) diagonal of T (float64).
    beta: (J, b, m) off-diagonal; beta[..., i] couples steps i and i+1, so beta[..., -1] is the
        residual norm β_m of the last step (H Q = Q T + β_m q_{m+1} e_mᵀ).
        A zero marks an invariant subspace after which the recurrence restarted from a random
        vector orthogonal to the basis (T stays exact: it is block diagonal there).
    basis: (J, b, m, p) orthonormal Lanczos vectors in the operator's dtype, or None.
    """

    alpha: Tensor
    beta: Tensor
    basis: Tensor | None
    num_matvecs: int

    @property
    def steps(self) -> int:
        return int(self.alpha.shape[-1])

    def tridiagonal(self) -> Tensor:
        """T as a dense (J, b, m, m) float64 tensor."""
        T = torch.diag_embed(self.alpha)
        off = self.beta[..., :-1]
        return T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)


def restart_generator(seed: int) -> torch.Generator:
    """The stream for restart vectors, separate from the probes' so that a breakdown in one
    stacked recurrence does not shift the random draws of the others."""
    return make_generator(int(seed) + 104_729)


def _batched_norm(w: Tensor) -> Tensor:
    """Column norms of a (J, p, b) block, in float64, shape (J, b)."""
    return torch.linalg.vector_norm(w.to(torch.float64), dim=1)


def lanczos_tridiagonal(
    op: Operator | Tensor,
    starts: Tensor,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    keep_basis: bool = True,
) -> Krylov:
    """Run ``num_steps`` Lanczos steps from each start vector, with full reorthogonalization.

    Args:
        op: operator of shape (J, p, p) or a dense symmetric tensor.
        starts: (J, p, b) start vectors (need not be normalized; must be nonzero).
        num_steps: m ≤ p, the number of matvecs per recurrence.
        generator: for restart vectors after an invariant subspace is found (β below
            10·eps·‖H‖; a near-breakdown above that threshold continues from rounding noise,
            which full reorthogonalization keeps harmless).
        keep_basis: return the (J, b, m, p) basis (needed for Ritz vectors and deflation).
            Reorthogonalization needs it during the run in any case.
    Returns:
        :class:`Krylov` with the tridiagonals and (optionally) the basis. Each step costs one
        ``matmat`` on a block of b columns: b matvecs per stacked operator.
    """
    op = as_operator(op)
    J, p, _ = op.shape
    if starts.ndim != 3 or starts.shape[:2] != (J, p):
        raise ValueError(f"starts must have shape (J={J}, p={p}, b), got {tuple(starts.shape)}")
    m = int(num_steps)
    if m < 1:
        raise ValueError(f"num_steps must be >= 1, got {m}")
    if m > p:
        raise ValueError(f"num_steps={m} exceeds the dimension p={p}; use at most p steps")
    b = starts.shape[2]
    dtype, device = op.dtype, op.device
    gen = generator if generator is not None else make_generator(0)

    Q = torch.zeros(J, b, m, p, dtype=dtype, device=device)
    alpha = torch.zeros(J, b, m, dtype=torch.float64)
    beta = torch.zeros(J, b, m, dtype=torch.float64)
    q = starts.to(dtype=dtype, device=device)
    nrm = _batched_norm(q)
    if (nrm == 0).any():
        raise ValueError("a Lanczos start vector is zero")
    q = q / nrm.to(dtype=dtype, device=device).unsqueeze(1)
    scale = torch.zeros(J, b, dtype=torch.float64)  # running estimate of ‖H‖ per recurrence
    eps = torch.finfo(dtype).eps

    for i in range(m):
        Q[:, :, i, :] = q.transpose(1, 2)
        w = op.matmat(q)  # (J, p, b)
        a = torch.einsum("jpb,jpb->jb", q.to(torch.float64), w.to(torch.float64))
        alpha[:, :, i] = a.cpu()
        # Full reorthogonalization against every kept vector, twice ("twice is enough").
        basis = Q[:, :, : i + 1, :]  # (J, b, i+1, p)
        wt = w.transpose(1, 2)  # (J, b, p)
        for _ in range(2):
            coef = torch.einsum("jbip,jbp->jbi", basis, wt)
            wt = wt - torch.einsum("jbip,jbi->jbp", basis, coef)
        bnorm = torch.linalg.vector_norm(wt.to(torch.float64), dim=-1).cpu()  # (J, b)
        scale = torch.maximum(scale, a.abs().cpu() + bnorm)
        beta[:, :, i] = bnorm
        if i == m - 1:
            break
        # An exact invariant subspace: restart from a random vector orthogonal to the basis.
        dead = bnorm <= 10 * eps * scale.clamp_min(torch.finfo(torch.float64).tiny)
        if dead.any():
            fresh = random_block((J, b, p), gen, kind="gaussian", dtype=dtype, device=device)
            for _ in range(2):
                coef = torch.einsum("jbip,jbp->jbi", basis, fresh)
                fresh = fresh - torch.einsum("jbip,jbi->jbp", basis, coef)
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=-1, keepdim=True)
            beta[:, :, i] = torch.where(dead, torch.zeros_like(bnorm), bnorm)
            safe = torch.where(dead, torch.ones_like(bnorm), bnorm).to(dtype=dtype, device=device)
            wt = torch.where(dead.to(device).unsqueeze(-1), fresh, wt / safe.unsqueeze(-1))
        else:
            wt = wt / bnorm.to(dtype=dtype, device=device).unsqueeze(-1)
        q = wt.transpose(1, 2).contiguous()

    return Krylov(alpha=alpha, beta=beta, basis=Q if keep_basis else None, num_matvecs=m * b)


def ritz(krylov: Krylov) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values θ (J, b, m), eigenvectors Y of T (J, b, m, m), residuals β_m|Y[m−1, i]|."""
    theta, Y = torch.linalg.eigh(krylov.tridiagonal())
    resid = krylov.beta[..., -1:].abs() * Y[..., -1, :].abs()
    return theta, Y, resid


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LM":
        return torch.argsort(theta.abs(), dim=-1, descending=True)
    if which == "LA":
        return torch.argsort(theta, dim=-1, descending=True)
    return torch.argsort(theta, dim=-1)


def lanczos(
    op: Operator | Tensor,
    k: int = 10,
    *,
    which: str = "LM",
    num_matvecs: int = 60,
    seed: int = 0,
    tol: float | None = None,
    return_eigenvectors: bool = True,
) -> EigenResult:
    """k extreme eigenpairs of each stacked symmetric operator by Lanczos.

    Runs m = ``num_matvecs`` steps from a Gaussian start (one recurrence per stacked operator),
    takes the eigen-decomposition of the m×m tridiagonal T, and returns the k Ritz pairs
    selected by ``which``: "LM" largest magnitude (the Hessian is indefinite: ‖H‖₂ = max |λ|),
    "LA" largest algebraic, "SA" smallest algebraic (bottom of the spectrum).

    Args:
        op: operator (J, p, p) or dense symmetric (p, p) / (J, p, p) tensor.
        k: number of Ritz pairs returned (k ≤ num_matvecs).
        num_matvecs: Lanczos steps m (capped at p: m = p reconstructs the matrix exactly).
        seed: seeds the start vector and any restart; same seed, same result.
        tol: convergence threshold on residual / max|θ| (default 1e-8 in float64, 1e-4 else).
        return_eigenvectors: also return Ritz vectors (J, p, k).
    Returns:
        :class:`EigenResult` with residual norms β_m |e_mᵀ y_i| and convergence flags.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> lanczos(A, k=2, num_matvecs=50).eigenvalues.round(6)[0].tolist()
        [100.0, 99.0]
    """
    op = as_operator(op)
    if which not in _WHICH:
        raise ValueError(f"unknown which={which!r}; use one of {', '.join(_WHICH)}")
    J, p, _ = op.shape
    m = min(int(num_matvecs), p)
    if k < 1 or k > m:
        raise ValueError(
            f"cannot return k={k} eigenpairs from a budget of {num_matvecs} matvecs "
            f"(dimension {p}); need 1 <= k <= min(num_matvecs, p)"
        )
    gen = make_generator(seed)
    start = random_block((J, p, 1), gen, kind="gaussian", dtype=op.dtype, device=op.device)
    kr = lanczos_tridiagonal(
        op, start, m, generator=restart_generator(seed), keep_basis=return_eigenvectors
    )
    theta, Y, resid = ritz(kr)
    theta, Y, resid = theta[:, 0], Y[:, 0], resid[:, 0]  # b = 1
    idx = _order(theta, which)[:, :k]
    vals = torch.gather(theta, 1, idx)
    res = torch.gather(resid, 1, idx)
    if tol is None:
        tol = 1e-8 if op.dtype == torch.float64 else 1e-4
    scale = theta.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    converged = res <= tol * scale
    vecs = None
    if return_eigenvectors:
        Ysel = torch.gather(Y, 2, idx.unsqueeze(1).expand(J, m, k))  # (J, m, k)
        basis = kr.basis[:, 0]  # (J, m, p)
        vecs = torch.einsum("jmp,jmk->jpk", basis, Ysel.to(basis.dtype))
    return EigenResult(
        eigenvalues=vals.numpy(),
        residual_norms=res.numpy(),
        converged=converged.numpy(),
        num_matvecs=kr.num_matvecs,
        seed=int(seed),
        which=which,
        eigenvectors=vecs,
    )


def spectral_norm_error(theta: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """Error bound on the top-|θ| Ritz value: min(r, r² / gap) (Kato–Temple style).

    theta, resid: (J, m) Ritz values and residual norms of one recurrence per operator.
    The gap is the distance from the top Ritz value to the nearest other Ritz value.
    """
    J, m = theta.shape
    out = np.empty(J)
    for j in range(J):
        i = int(np.argmax(np.abs(theta[j])))
        r = float(resid[j, i])
        others = np.delete(theta[j], i)
        gap = float(np.min(np.abs(others - theta[j, i]))) if others.size else np.inf
        out[j] = min(r, r * r / gap) if gap > 0 else r
    return out
