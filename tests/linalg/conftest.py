"""Dense symmetric matrices with known spectra, built as Q diag(λ) Qᵀ in float64.

Q is the orthogonal factor of a seeded Gaussian matrix, so every truth (eigenvalues, tr, ‖·‖_F²,
stable rank) is known in closed form from λ, not recomputed by an eigensolver under test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

P = 200  # dimension of the "realistic" spectra: large enough that m = 60 ≪ p is a real test


def orthogonal(p: int, seed: int) -> np.ndarray:
    """A Haar-like random orthogonal matrix: Q of the QR of a seeded Gaussian.

    The factorization runs in torch (one thread, see tests/conftest.py): numpy's BLAS threads
    oversubscribe the two test workers.
    """
    G = torch.from_numpy(np.random.default_rng(seed).standard_normal((p, p)))
    q, r = torch.linalg.qr(G)
    return (q * torch.sign(torch.diagonal(r))).numpy()


def from_spectrum(lam, seed: int) -> torch.Tensor:
    """Q diag(λ) Qᵀ as a float64 tensor, symmetrized exactly (rounding leaves ~1e-16 asymmetry)."""
    lam = np.asarray(lam, dtype=np.float64)
    q = orthogonal(lam.size, seed)
    qt = torch.from_numpy(q)
    A = (qt * torch.from_numpy(lam)) @ qt.T
    return (A + A.T) / 2


@dataclass(frozen=True)
class Spectrum:
    """A test matrix and its exact spectral quantities."""

    name: str
    lam: np.ndarray  # eigenvalues, in no particular order
    A: torch.Tensor  # (p, p) float64

    @property
    def p(self) -> int:
        return int(self.lam.size)

    @property
    def trace(self) -> float:
        return float(self.lam.sum())

    @property
    def fro_sq(self) -> float:
        return float(np.sum(self.lam**2))

    @property
    def norm(self) -> float:
        return float(np.abs(self.lam).max())

    @property
    def srank(self) -> float:
        return self.fro_sq / self.norm**2

    def top(self, k: int, which: str = "LM") -> np.ndarray:
        if which == "LM":
            return self.lam[np.argsort(-np.abs(self.lam))][:k]
        if which == "LA":
            return np.sort(self.lam)[::-1][:k]
        return np.sort(self.lam)[:k]


def wishart(p: int = P, n: int = 2 * P, seed: int = 1) -> Spectrum:
    """Eigenvalues of X Xᵀ / n (Marchenko–Pastur bulk on [(1−√(p/n))², (1+√(p/n))²])."""
    X = np.random.default_rng(seed).standard_normal((p, n))
    lam = torch.linalg.eigvalsh(torch.from_numpy(X @ X.T / n)).numpy()
    return Spectrum("wishart", lam, from_spectrum(lam, seed + 100))


def power_law(p: int = P, a: float = 1.0, seed: int = 2) -> Spectrum:
    lam = np.arange(1, p + 1, dtype=np.float64) ** (-a)
    return Spectrum("power_law", lam, from_spectrum(lam, seed + 100))


def indefinite(p: int = P, seed: int = 3) -> Spectrum:
    """A bulk on [−1, 1] with two negative and two positive outliers; the largest is negative."""
    out = np.array([-20.0, -12.0, 8.0, 5.0])
    bulk = np.random.default_rng(seed).uniform(-1.0, 1.0, p - out.size)
    lam = np.concatenate([out, bulk])
    return Spectrum("indefinite", lam, from_spectrum(lam, seed + 100))


def outliers(p: int = P, seed: int = 4) -> Spectrum:
    """Five PSD outliers on a [0, 1] bulk: the Hessian-like shape the estimators are built for."""
    out = np.array([100.0, 50.0, 30.0, 20.0, 10.0])
    bulk = np.random.default_rng(seed).uniform(0.0, 1.0, p - out.size)
    lam = np.concatenate([out, bulk])
    return Spectrum("outliers", lam, from_spectrum(lam, seed + 100))


def projector(p: int, r: int, seed: int = 5) -> Spectrum:
    lam = np.concatenate([np.ones(r), np.zeros(p - r)])
    return Spectrum(f"projector{r}", lam, from_spectrum(lam, seed + 100))


SPECTRA = {f.__name__: f for f in (wishart, power_law, indefinite, outliers)}


@pytest.fixture(scope="session")
def spectra() -> dict[str, Spectrum]:
    return {name: make() for name, make in SPECTRA.items()}


@pytest.fixture(scope="session", params=list(SPECTRA))
def spectrum(request, spectra) -> Spectrum:
    return spectra[request.param]


@pytest.fixture(scope="session")
def stack(spectra) -> tuple[torch.Tensor, list[Spectrum]]:
    """All four spectra as one (4, p, p) operator, with the per-slice truths."""
    items = list(spectra.values())
    return torch.stack([s.A for s in items]), items


# ---------------------------------------------------------------- real Hessians (dense, float64)


def digits_mlp_hessian(trained: bool, n: int = 256, hidden: int = 8) -> Spectrum:
    """The dense Hessian of a digits MLP 64-hidden-10 (ReLU, cross-entropy, n samples), p = 610.

    At initialization the spectrum is flat and indefinite; after 300 full-batch Adam steps
    (lr 0.01) a few outliers dominate — the two regimes the estimators must both serve.
    """
    from sklearn.datasets import load_digits
    from torch import nn

    from hessrank import dense_hessian

    d = load_digits()
    x = torch.as_tensor(d.data[:n] / 16.0, dtype=torch.float64)
    y = torch.as_tensor(d.target[:n])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).double()
    loss = nn.functional.cross_entropy
    if trained:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(300):
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    H = dense_hessian(model, loss, (x, y))
    H = (H + H.T) / 2
    lam = torch.linalg.eigvalsh(H).numpy()
    return Spectrum("mlp-trained" if trained else "mlp-init", lam, H)


@pytest.fixture(scope="session")
def mlp_hessians() -> dict[str, Spectrum]:
    """Digits-MLP Hessians at initialization and after training, built once per session."""
    return {s.name: s for s in (digits_mlp_hessian(False), digits_mlp_hessian(True))}
