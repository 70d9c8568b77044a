"""From (model, loss, data, params) to Hessian operators."""

from hessrank.curvature.dense import dense_hessian
from hessrank.curvature.federated import FederatedHessian
from hessrank.curvature.operator import HessianOperator

__all__ = ["FederatedHessian", "HessianOperator", "dense_hessian"]
