"""From (model, loss, data, params) to curvature operators: Hessian, GGN, Fisher, federated."""

from hessrank.curvature.base import CurvatureOperator, curvature_class
from hessrank.curvature.dense import dense_hessian
from hessrank.curvature.federated import FederatedHessian, FederatedOperator
from hessrank.curvature.fisher import FisherOperator
from hessrank.curvature.ggn import GGNOperator
from hessrank.curvature.hessian import HessianOperator
from hessrank.curvature.params import LossFn, ParameterSpace
from hessrank.curvature.tune import tune

__all__ = [
    "CurvatureOperator", "FederatedHessian", "FederatedOperator", "FisherOperator",
    "GGNOperator", "HessianOperator", "LossFn", "ParameterSpace", "curvature_class",
    "dense_hessian", "tune",
]
