"""hessrank: Hessian spectra and stable ranks of client and server losses in federated learning.

>>> import hessrank as hr
>>> op = hr.HessianOperator(model, loss_fn, (x, y))           # doctest: +SKIP
>>> hr.stable_rank(op, num_matvecs=40, seed=0).value           # doctest: +SKIP
"""

from hessrank.curvature import FederatedHessian, HessianOperator, dense_hessian
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

__version__ = "0.1.0"

__all__ = [
    "DenseOperator", "DensityResult", "DiagonalResult", "EigenResult", "FederatedHessian",
    "HessianOperator", "StableRankResult", "TraceResult", "dense_hessian", "diagonal",
    "exact_stable_rank", "frobenius_sq", "hutchinson", "hutchpp", "lanczos", "spectral_density",
    "stable_rank", "trace", "xtrace",
]
