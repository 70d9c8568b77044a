"""The operator protocol shared by every estimator, and a dense adapter.

An operator is anything with ``shape == (J, p, p)`` — a stack of J symmetric p×p matrices —
``dtype``, ``device`` and ``matmat(V: Tensor[J, p, k]) -> Tensor[J, p, k]``. Estimators advance J
independent recurrences in lockstep, so one product call serves every stacked matrix.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor


@runtime_checkable
class Operator(Protocol):
    """A stack of J symmetric p×p linear maps applied to blocks of k vectors."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matmat(self, V: Tensor) -> Tensor: ...


class DenseOperator:
    """A dense symmetric matrix (p, p) or stack (J, p, p) seen as an :class:`Operator`.

    Used to unit-test the estimators on matrices with known spectra and as an exact mode for
    tiny models. Symmetry is checked to ``sym_rtol`` relative to the largest entry.
    """

    def __init__(self, matrix: Tensor | np.ndarray, *, sym_rtol: float = 1e-6) -> None:
        A = torch.as_tensor(matrix)
        if A.ndim == 2:
            A = A.unsqueeze(0)
        if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
            raise ValueError(f"expected a (p, p) or (J, p, p) matrix, got shape {tuple(A.shape)}")
        if not torch.is_floating_point(A):
            A = A.to(torch.float64)
        if not torch.isfinite(A).all():
            raise ValueError("the matrix has NaN or inf entries; estimators need finite values")
        scale = A.abs().max().clamp_min(torch.finfo(A.dtype).tiny)
        asym = (A - A.transpose(-1, -2)).abs().max()
        if asym > sym_rtol * scale:
            raise ValueError(
                f"the matrix is not symmetric (max |A - A^T| = {asym:.3g}); "
                "symmetrize it with (A + A.T) / 2 first"
            )
        self.matrix = A
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        J, p, _ = self.matrix.shape
        return (J, p, p)

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matmat(self, V: Tensor) -> Tensor:
        self.num_matvecs += V.shape[-1]
        return self.matrix @ V.to(self.matrix.dtype)


def as_operator(op: Operator | Tensor | np.ndarray) -> Operator:
    """Return ``op`` if it already is an operator, else wrap a dense symmetric matrix."""
    if isinstance(op, (Tensor, np.ndarray)):
        return DenseOperator(op)
    if not isinstance(op, Operator):
        raise TypeError(
            f"expected an operator with shape/dtype/device/matmat or a dense tensor, got {type(op)}"
        )
    J, p, q = op.shape
    if p != q:
        raise ValueError(f"operator must be square, got shape {op.shape}")
    return op


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every random draw of an estimator comes from one."""
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def random_block(
    shape: tuple[int, ...], gen: torch.Generator, *, kind: str, dtype: torch.dtype, device
) -> Tensor:
    """Random probes drawn on the CPU in float64 (so results do not depend on the device)."""
    if kind == "gaussian":
        X = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        X = torch.randint(0, 2, shape, generator=gen).to(torch.float64).mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown probe distribution {kind!r}; use 'gaussian' or 'rademacher'")
    return X.to(dtype=dtype, device=device)
