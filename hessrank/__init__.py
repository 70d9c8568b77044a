"""hessrank: Hessian spectra and stable ranks of client and server losses in federated learning.

>>> import hessrank as hr
>>> op = hr.HessianOperator(model, loss_fn, (x, y))           # doctest: +SKIP
>>> hr.stable_rank(op, num_matvecs=40, seed=0).value           # doctest: +SKIP
"""

from hessrank.curvature import (
    CurvatureOperator,
    FederatedHessian,
    FederatedOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    ParameterSpace,
    dense_hessian,
    tune,
)
from hessrank.linalg import (
    DenseOperator,
    DensityResult,
    EigenResult,
    StableRankResult,
    TraceResult,
    exact_stable_rank,
    frobenius_sq,
    hutchinson,
    hutchpp,
    lanczos,
    spectral_density,
    stable_rank,
    trace,
)
from hessrank.linalg.stack import LinearCombination, OperatorStack

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator", "DenseOperator", "DensityResult", "EigenResult", "FederatedHessian",
    "FederatedOperator", "FisherOperator", "GGNOperator", "HessianOperator",
    "LinearCombination", "OperatorStack", "ParameterSpace", "StableRankResult", "TraceResult",
    "dense_hessian", "exact_stable_rank", "frobenius_sq", "hutchinson", "hutchpp", "lanczos",
    "spectral_density", "stable_rank", "trace", "tune",
]
