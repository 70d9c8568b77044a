"""hessrank: Hessian spectra and stable ranks of client and server losses in federated learning.

>>> import hessrank as hr
>>> op = hr.HessianOperator(model, loss_fn, (x, y))           # doctest: +SKIP
>>> hr.stable_rank(op, num_matvecs=40, seed=0).value           # doctest: +SKIP

The public names are imported on first use (PEP 562 module ``__getattr__``), so
``import hessrank`` — and with it ``hessrank --help`` — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.curvature import (
        CurvatureOperator,
        FederatedOperator,
        FisherOperator,
        GGNOperator,
        HessianOperator,
        KFACOperator,
        ParameterSpace,
        dense_hessian,
        tune,
    )
    from hessrank.linalg import (
        DenseOperator,
        DensityResult,
        DiagonalResult,
        EigenResult,
        StableRankResult,
        TraceResult,
        diagonal,
        exact_stable_rank,
        frobenius_sq,
        hutchinson,
        hutchpp,
        lanczos,
        spectral_density,
        stable_rank,
        trace,
        xtrace,
    )
    from hessrank.linalg.stack import LinearCombination, OperatorStack

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **dict.fromkeys((
        "CurvatureOperator", "FederatedOperator", "FisherOperator", "GGNOperator",
        "HessianOperator", "KFACOperator", "ParameterSpace", "dense_hessian", "tune",
    ), "hessrank.curvature"),
    **dict.fromkeys(("LinearCombination", "OperatorStack"), "hessrank.linalg.stack"),
    **dict.fromkeys((
        "DenseOperator", "DensityResult", "DiagonalResult", "EigenResult", "StableRankResult",
        "TraceResult", "diagonal", "exact_stable_rank", "frobenius_sq", "hutchinson", "hutchpp",
        "lanczos", "spectral_density", "stable_rank", "trace", "xtrace",
    ), "hessrank.linalg"),
}  # fmt: skip
"""Public name → the subpackage that defines it."""

__all__ = [
    "CurvatureOperator", "DenseOperator", "DensityResult", "DiagonalResult", "EigenResult",
    "FederatedOperator", "FisherOperator", "GGNOperator", "HessianOperator", "KFACOperator",
    "LinearCombination", "OperatorStack", "ParameterSpace", "StableRankResult", "TraceResult",
    "dense_hessian", "diagonal", "exact_stable_rank", "frobenius_sq", "hutchinson", "hutchpp",
    "lanczos", "spectral_density", "stable_rank", "trace", "tune", "xtrace",
]


_SUBPACKAGES = ("analysis", "curvature", "fl", "linalg")
"""Reachable as attributes after ``import hessrank`` alone, as when they were imported eagerly."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'hessrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
