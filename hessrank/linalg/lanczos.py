"""Lanczos with full reorthogonalization (Lanczos 1950; Paige 1972 on why it is needed).

The core, :func:`lanczos_tridiagonal`, runs ``b`` independent recurrences for each of the J
stacked operators at once: one ``matmat`` call per step advances all J·b of them. Single runs
(eigenpairs, Krylov deflation) use b = 1; stochastic Lanczos quadrature uses b = probes.
"""

from __future__ import annotations

import math
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
    until_converged: bool = False,
) -> EigenResult:
    """k extreme eigenpairs of each stacked symmetric operator by Lanczos.

    Runs m = ``num_matvecs`` steps from a Gaussian start (one recurrence per stacked operator),
    takes the eigen-decomposition of the m×m tridiagonal T, and returns the k Ritz pairs
    selected by ``which``: "LM" largest magnitude (the Hessian is indefinite: ‖H‖₂ = max |λ|),
    "LA" largest algebraic, "SA" smallest algebraic (bottom of the spectrum).

    Args:
        op: operator (J, p, p) or dense symmetric (p, p) / (J, p, p) tensor.
        k: number of Ritz pairs returned (k ≤ num_matvecs).
        num_matvecs: Lanczos steps m (capped at p: m = p reconstructs the matrix exactly);
            with ``until_converged`` the most steps taken.
        seed: seeds the start vector and any restart; same seed, same result.
        tol: convergence threshold on residual / max|θ| (default 1e-8 in float64, 1e-4 else).
        return_eigenvectors: also return Ritz vectors (J, p, k).
        until_converged: stop as soon as the k selected Ritz pairs of every stacked operator
            have converged (residual ≤ tol · max|θ|; checked after each step from the
            tridiagonal, no extra product), at most ``num_matvecs`` steps.
    Returns:
        :class:`EigenResult` with residual norms β_m |e_mᵀ y_i| (some eigenvalue lies within
        that distance of θ_i), floored at the dtype's round-off eps·max|θ|·sqrt(p), and
        convergence flags.

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
    if tol is None:
        tol = 1e-8 if op.dtype == torch.float64 else 1e-4
    if until_converged:
        kr = _lanczos_until_converged(op, start[..., 0], m, k, which, tol,
                                      restart_generator(seed))
        m = kr.steps
    else:
        kr = lanczos_tridiagonal(
            op, start, m, generator=restart_generator(seed), keep_basis=return_eigenvectors
        )
    theta, Y, resid = ritz(kr)
    theta, Y, resid = theta[:, 0], Y[:, 0], resid[:, 0]  # b = 1
    idx = _order(theta, which)[:, :k]
    vals = torch.gather(theta, 1, idx)
    # The residual β_m|e_mᵀy| is computed from T in float64; the products behind T are no more
    # accurate than the operator's dtype, so it is floored at that round-off.
    floor = torch.finfo(op.dtype).eps * theta.abs().amax(dim=1, keepdim=True) * math.sqrt(p)
    res = torch.maximum(torch.gather(resid, 1, idx), floor)
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


def _lanczos_until_converged(op: Operator, start: Tensor, cap: int, k: int, which: str,
                             tol: float, generator: torch.Generator) -> Krylov:
    """Lanczos steps until the k pairs selected by ``which`` of every operator have residual
    ≤ tol · max|θ| (floored at the dtype's round-off, as :func:`lanczos` reports it), or
    ``cap`` steps; the run as a :class:`Krylov` with b = 1."""
    J, p = start.shape
    run = LanczosRecurrence(start, capacity=cap, generator=generator)
    eps = torch.finfo(op.dtype).eps
    while True:
        V = torch.stack([run.next_vector(j) for j in range(J)])[..., None]
        run.advance(op.matmat(V)[..., 0], np.ones(J, dtype=bool))
        m = int(run.steps[0])
        if m >= run.capacity:
            break
        if m < k:
            continue
        done = True
        for j in range(J):
            theta, resid = run.ritz(j)
            sel = _order(torch.as_tensor(theta)[None], which)[0, :k].numpy()
            top = float(np.abs(theta).max())
            if not np.all(np.maximum(resid[sel], eps * top * math.sqrt(p)) <= tol * top):
                done = False
                break
        if done:
            break
    m = int(run.steps[0])
    alpha = torch.as_tensor(run.alpha[:, None, :m])
    beta = torch.as_tensor(run.beta[:, None, :m])
    return Krylov(alpha=alpha, beta=beta, basis=run.Q[:, None, :m], num_matvecs=m)


class LanczosRecurrence:
    """One Lanczos recurrence per stacked operator, advanced one product at a time.

    Unlike :func:`lanczos_tridiagonal` each operator keeps its own step count: a call to
    :meth:`advance` moves only the ``active`` ones, so an estimator can stop some recurrences
    and spend those operators' products elsewhere in the same ``matmat`` call. Full
    reorthogonalization (twice) against the operator's own basis; an invariant subspace
    (β below 10·eps·‖H‖) restarts from a random vector orthogonal to the basis, with β = 0.

    After m steps of operator j: H V = V T + β_m q_{m+1} e_mᵀ, with V = ``basis(j)`` (m, p),
    T from ``alpha[j, :m]`` and ``beta[j, :m−1]``, β_m = ``beta[j, m−1]`` and q_{m+1} =
    ``next_vector(j)``.
    """

    def __init__(self, start: Tensor, capacity: int, generator: torch.Generator) -> None:
        J, p = start.shape
        self.dim = p
        self.capacity = min(int(capacity), p)
        self.dtype, self.device = start.dtype, start.device
        self.Q = torch.zeros(J, self.capacity, p, dtype=self.dtype, device=self.device)
        self.alpha = np.zeros((J, self.capacity))
        self.beta = np.zeros((J, self.capacity))
        self.steps = np.zeros(J, dtype=int)
        self._scale = np.zeros(J)
        self._gen = generator
        nrm = torch.linalg.vector_norm(start.to(torch.float64), dim=1)
        if (nrm == 0).any():
            raise ValueError("a Lanczos start vector is zero")
        self.q = start / nrm.to(self.dtype).to(self.device).unsqueeze(1)

    def full(self, j: int) -> bool:
        """Whether operator j's recurrence can take no further step (basis full)."""
        return int(self.steps[j]) >= self.capacity

    def basis(self, j: int) -> Tensor:
        return self.Q[j, : int(self.steps[j])]

    def next_vector(self, j: int) -> Tensor:
        return self.q[j]

    def advance(self, HQ: Tensor, active: np.ndarray) -> None:
        """Take one step for each active operator; ``HQ[j]`` = H_j q_j (p,), the product of the
        vector from :meth:`next_vector`."""
        eps = torch.finfo(self.dtype).eps
        for j in np.flatnonzero(active):
            i = int(self.steps[j])
            if i >= self.capacity:
                raise ValueError(f"the Lanczos recurrence of operator {j} is already full")
            q, w = self.q[j], HQ[j].to(self.dtype)
            self.Q[j, i] = q
            a = float(torch.dot(q.to(torch.float64), w.to(torch.float64)))
            basis = self.Q[j, : i + 1]
            for _ in range(2):
                w = w - basis.T @ (basis @ w)
            b = float(torch.linalg.vector_norm(w.to(torch.float64)))
            self._scale[j] = max(self._scale[j], abs(a) + b)
            self.alpha[j, i], self.beta[j, i] = a, b
            self.steps[j] = i + 1
            if i + 1 >= self.capacity:
                self.q[j] = w / b if b > 0 else torch.zeros_like(w)
                continue
            if b <= 10 * eps * max(self._scale[j], np.finfo(float).tiny):
                fresh = random_block((self.dim,), self._gen, kind="gaussian", dtype=self.dtype,
                                     device=self.device)
                for _ in range(2):
                    fresh = fresh - basis.T @ (basis @ fresh)
                self.beta[j, i] = 0.0
                self.q[j] = fresh / torch.linalg.vector_norm(fresh)
            else:
                self.q[j] = w / b

    def ritz(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values θ (m,) of operator j and their residual norms β_m|e_mᵀ y_i| (m,)."""
        m = int(self.steps[j])
        if m == 0:
            return np.zeros(0), np.zeros(0)
        T = np.diag(self.alpha[j, :m]) + np.diag(self.beta[j, : m - 1], 1) + np.diag(
            self.beta[j, : m - 1], -1)
        theta, Y = np.linalg.eigh(T)
        return theta, abs(self.beta[j, m - 1]) * np.abs(Y[-1, :])

    def frobenius_sq(self, j: int) -> float:
        """‖H V_m‖_F² = ‖T_m‖_F² + β_m² (exact)."""
        m = int(self.steps[j])
        if m == 0:
            return 0.0
        a, b = self.alpha[j, :m], self.beta[j, :m]
        return float(np.sum(a**2) + 2 * np.sum(b[: m - 1] ** 2) + b[m - 1] ** 2)

    def trace(self, j: int) -> float:
        """tr(V_mᵀ H V_m) = tr(T_m) (exact)."""
        return float(np.sum(self.alpha[j, : int(self.steps[j])]))

    def deflate(self, j: int, G: Tensor, HG: Tensor) -> tuple[Tensor, Tensor]:
        """((I − P)G, H(I − P)G) for probes G (p, k) with known HG, without new products.

        P = V Vᵀ; H V c = V T c + β_m q_{m+1} c_m with c = Vᵀ G (the Lanczos relation).
        """
        m = int(self.steps[j])
        if m == 0:
            return G, HG
        V = self.Q[j, :m]
        c = V @ G
        for_t = torch.as_tensor(
            np.diag(self.alpha[j, :m]) + np.diag(self.beta[j, : m - 1], 1)
            + np.diag(self.beta[j, : m - 1], -1), dtype=self.dtype, device=self.device)
        HVc = V.T @ (for_t @ c) + self.beta[j, m - 1] * torch.outer(self.q[j], c[m - 1])
        return G - V.T @ c, HG - HVc

    def project_out(self, j: int, G: Tensor) -> Tensor:
        """(I − V Vᵀ) G, twice (G: (p, k))."""
        V = self.Q[j, : int(self.steps[j])]
        for _ in range(2):
            G = G - V.T @ (V @ G)
        return G
