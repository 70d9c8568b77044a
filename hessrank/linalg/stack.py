"""Generic compositions of operators: stacks of independent operators and linear combinations.

``OperatorStack([A_1, ..., A_J])`` is the (J, p, p) operator with out[j] = A_j V[j] (each A_j
a (1, p, p) operator); ``LinearCombination([A, B], [1, -1])`` is A − B, e.g. the residual
H − G of a Hessian and its Gauss-Newton part (same J, same p).

Example:
    >>> from hessrank.linalg import DenseOperator
    >>> A, B = DenseOperator(torch.eye(3)), DenseOperator(2 * torch.eye(3))
    >>> LinearCombination([A, B], [1.0, -1.0]).matmat(torch.ones(1, 3, 1))[0, :, 0].tolist()
    [-1.0, -1.0, -1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hessrank.linalg.operator import Operator

__all__ = ["LinearCombination", "OperatorStack"]


def _check_shape(V: Tensor, shape: tuple[int, int, int]) -> None:
    J, p, _ = shape
    if V.ndim != 3 or V.shape[0] != J or V.shape[1] != p:
        raise ValueError(f"expected V of shape ({J}, {p}, k), got {tuple(V.shape)}")


class _Composite:
    """dtype and device of a composition: those of its first operator (all must agree)."""

    operators: list[Operator]

    @property
    def dtype(self) -> torch.dtype:
        return self.operators[0].dtype

    @property
    def device(self) -> torch.device:
        return self.operators[0].device


class OperatorStack(_Composite):
    """J independent (1, p, p) operators of the same dimension as one (J, p, p) operator."""

    def __init__(self, operators: Sequence[Operator]) -> None:
        if not operators:
            raise ValueError("OperatorStack needs at least one operator")
        p = operators[0].shape[1]
        for j, op in enumerate(operators):
            if op.shape[1] != p or op.shape[0] != 1:
                raise ValueError(
                    f"operator {j} has shape {tuple(op.shape)}, operator 0 has dimension {p}; "
                    "stack (1, p, p) operators over the same parameters"
                )
        self.operators = list(operators)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self.operators[0].shape[1]
        return (len(self.operators), p, p)

    def matmat(self, V: Tensor) -> Tensor:
        """V (J, p, k) → (J, p, k) with out[j] = A_j V[j]."""
        _check_shape(V, self.shape)
        out = torch.cat([op.matmat(V[j:j + 1]) for j, op in enumerate(self.operators)])
        self.num_matvecs += V.shape[2]
        return out


class LinearCombination(_Composite):
    """Σ_i c_i A_i for operators A_i of one shape (J, p, p) and real coefficients c_i."""

    def __init__(self, operators: Sequence[Operator], coefficients: Sequence[float]) -> None:
        if not operators or len(operators) != len(coefficients):
            raise ValueError(f"need one coefficient per operator, got {len(operators)} "
                             f"operators and {len(coefficients)} coefficients")
        shape = tuple(operators[0].shape)
        for i, op in enumerate(operators):
            if tuple(op.shape) != shape:
                raise ValueError(f"operator {i} has shape {tuple(op.shape)}, operator 0 has "
                                 f"{shape}; combine operators of one shape")
        self.operators = list(operators)
        self.coefficients = [float(c) for c in coefficients]
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.operators[0].shape)

    def matmat(self, V: Tensor) -> Tensor:
        _check_shape(V, self.shape)
        out = None
        for c, op in zip(self.coefficients, self.operators):
            y = op.matmat(V)
            out = y.mul(c) if out is None else out.add_(y, alpha=c)
        self.num_matvecs += V.shape[2]
        return out
