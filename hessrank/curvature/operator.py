"""Former home of HessianOperator (now :mod:`hessrank.curvature.hessian`); kept so that
``from hessrank.curvature.operator import LossFn, HessianOperator`` still works."""

from hessrank.curvature.hessian import HessianOperator
from hessrank.curvature.params import LossFn

__all__ = ["HessianOperator", "LossFn"]
