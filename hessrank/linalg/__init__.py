"""Matrix-free numerics on symmetric operators; knows nothing about ``nn.Module``."""

from hessrank.linalg.deflated import DeflatedEstimate, deflated_estimate
from hessrank.linalg.density import DensityResult, spectral_density
from hessrank.linalg.diagonal import diagonal
from hessrank.linalg.lanczos import Krylov, LanczosRecurrence, lanczos, lanczos_tridiagonal
from hessrank.linalg.operator import DenseOperator, Operator, as_operator
from hessrank.linalg.ranks import exact_stable_rank, stable_rank
from hessrank.linalg.results import (
    DiagonalResult,
    EigenResult,
    StableRankResult,
    TraceResult,
)
from hessrank.linalg.trace import frobenius_sq, hutchinson, hutchpp, trace, xtrace

__all__ = [
    "DeflatedEstimate", "DenseOperator", "DensityResult", "DiagonalResult", "EigenResult",
    "Krylov", "LanczosRecurrence", "Operator", "StableRankResult", "TraceResult", "as_operator",
    "deflated_estimate", "diagonal", "exact_stable_rank", "frobenius_sq", "hutchinson", "hutchpp",
    "lanczos", "lanczos_tridiagonal", "spectral_density", "stable_rank", "trace", "xtrace",
]
