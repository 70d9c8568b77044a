"""The dense adapter and the operator boundary: shapes, symmetry, finiteness, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.linalg import DenseOperator, Operator, as_operator, hutchinson
from hessrank.linalg.operator import make_generator, random_block


def test_dense_operator_shapes_and_counter():
    A = torch.eye(5, dtype=torch.float64)
    op = DenseOperator(A)
    assert isinstance(op, Operator)
    assert op.shape == (1, 5, 5)
    assert op.dtype == torch.float64
    V = torch.ones(1, 5, 3, dtype=torch.float64)
    assert torch.equal(op.matmat(V), V)
    assert op.num_matvecs == 3  # one matvec per column
    assert DenseOperator(torch.zeros(4, 6, 6)).shape == (4, 6, 6)


def test_integer_and_numpy_matrices_become_float64():
    op = as_operator(np.eye(3, dtype=np.int64))
    assert op.dtype == torch.float64


def test_as_operator_passes_operators_through():
    op = DenseOperator(torch.eye(3))
    assert as_operator(op) is op


def test_nonsymmetric_matrix_rejected():
    A = torch.eye(4, dtype=torch.float64)
    A[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"not symmetric.*\(A \+ A\.T\) / 2"):
        as_operator(A)
    with pytest.raises(ValueError, match="not symmetric"):
        hutchinson(A, num_matvecs=2)  # estimators check at the boundary too


def test_symmetry_tolerance_is_relative():
    # An asymmetry of 1e-9 on entries of size 1e3 is rounding, not a different matrix.
    A = 1e3 * torch.eye(4, dtype=torch.float64)
    A[0, 1] += 1e-9
    DenseOperator(A)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_matrix_rejected(bad):
    A = torch.eye(4, dtype=torch.float64)
    A[2, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        as_operator(A)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (5,), (1, 2, 3, 3)])
def test_bad_shapes_rejected(shape):
    with pytest.raises(ValueError, match=r"expected a \(p, p\) or \(J, p, p\) matrix"):
        as_operator(torch.zeros(shape))


def test_non_operator_rejected():
    with pytest.raises(TypeError, match="expected an operator"):
        as_operator([[1.0, 0.0], [0.0, 1.0]])


def test_non_integer_seed_rejected():
    with pytest.raises(TypeError, match="seed must be an int"):
        make_generator(1.5)


def test_unknown_probe_distribution_rejected():
    with pytest.raises(ValueError, match="unknown probe distribution 'uniform'"):
        hutchinson(torch.eye(3, dtype=torch.float64), num_matvecs=2, distribution="uniform")


def test_rademacher_probes_are_signs():
    X = random_block((2, 50, 3), make_generator(0), kind="rademacher", dtype=torch.float64,
                     device="cpu")
    assert set(X.unique().tolist()) == {-1.0, 1.0}
