"""Matrix-free numerics on symmetric operators; knows nothing about ``nn.Module``."""

from hessrank.linalg.density import DensityResult, spectral_density
from hessrank.linalg.lanczos import Krylov, lanczos, lanczos_tridiagonal
from hessrank.linalg.operator import DenseOperator, Operator, as_operator
from hessrank.linalg.ranks import exact_stable_rank, stable_rank
from hessrank.linalg.results import EigenResult, StableRankResult, TraceResult
from hessrank.linalg.trace import deflated_estimate, frobenius_sq, hutchinson, hutchpp, trace

__all__ = [
    "DenseOperator", "DensityResult", "EigenResult", "Krylov", "Operator", "StableRankResult",
    "TraceResult", "as_operator", "deflated_estimate", "exact_stable_rank", "frobenius_sq",
    "hutchinson", "hutchpp", "lanczos", "lanczos_tridiagonal", "spectral_density",
    "stable_rank", "trace",
]
