"""From (model, task, data, params) to curvature operators: Hessian, GGN, Fisher, K-FAC,
federated stacks.

The names are imported on first use (PEP 562), so ``hessrank.curvature.registry`` — the list
of curvature names the CLI reads — is importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hessrank.curvature.base import CurvatureOperator
    from hessrank.curvature.dense import dense_hessian
    from hessrank.curvature.federated import FederatedOperator
    from hessrank.curvature.fisher import FisherOperator
    from hessrank.curvature.ggn import GGNOperator
    from hessrank.curvature.hessian import HessianOperator
    from hessrank.curvature.kfac import KFACOperator
    from hessrank.curvature.params import LossFn, ParameterSpace
    from hessrank.curvature.protocol import ClientOperator, UnitOperator
    from hessrank.curvature.registry import CURVATURES, curvature_class
    from hessrank.curvature.routes import RouteRequest, Workload, plan_route
    from hessrank.curvature.tune import tune

_EXPORTS = {
    "CurvatureOperator": "base", "dense_hessian": "dense", "FederatedOperator": "federated",
    "FisherOperator": "fisher", "GGNOperator": "ggn", "HessianOperator": "hessian",
    "KFACOperator": "kfac", "LossFn": "params", "ParameterSpace": "params",
    "ClientOperator": "protocol", "UnitOperator": "protocol", "CURVATURES": "registry",
    "curvature_class": "registry", "RouteRequest": "routes", "Workload": "routes",
    "plan_route": "routes", "tune": "tune",
}
"""Public name → the module of this package that defines it."""

__all__ = [
    "CURVATURES", "ClientOperator", "CurvatureOperator", "FederatedOperator", "FisherOperator",
    "GGNOperator", "HessianOperator", "KFACOperator", "LossFn", "ParameterSpace", "RouteRequest",
    "UnitOperator", "Workload", "curvature_class", "dense_hessian", "plan_route", "tune",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
