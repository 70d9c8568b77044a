"""The curvature registry: one entry per curvature matrix, read by the operators' users, the
federated composition and the CLI (``hessrank analyze --curvature``).

Importing this module does not import torch (the CLI's ``--help`` reads the names); the class
of an entry is imported on first use. A new curvature is its operator module plus one entry
here.

Example:
    >>> sorted(CURVATURES)
    ['fisher', 'ggn', 'hessian', 'kfac']
    >>> curvature_class("ggn").__name__
    'GGNOperator'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Curvature:
    """A registered curvature: its name, where its operator class lives, one line of help."""

    name: str
    target: str
    help: str
    exact: bool = True
    """Products are exact (False: a structured approximation, e.g. K-FAC)."""

    def load(self) -> type:
        """The operator class (imported on first use)."""
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


CURVATURES = MappingProxyType({c.name: c for c in (
    Curvature("hessian", "hessrank.curvature.hessian:HessianOperator",
              "the Hessian ∇²L"),
    Curvature("ggn", "hessrank.curvature.ggn:GGNOperator",
              "the generalized Gauss-Newton matrix Jᵀ H_out J"),
    Curvature("fisher", "hessrank.curvature.fisher:FisherOperator",
              "the empirical Fisher (1/n) Σ g_i g_iᵀ"),
    Curvature("kfac", "hessrank.curvature.kfac:KFACOperator",
              "K-FAC, a Kronecker-factored approximation of the GGN (Linear and Conv2d "
              "layers; cheap, not exact)", exact=False),
)})
"""Name → :class:`Curvature`, in the order the CLI lists them."""


def curvature_class(name: str) -> type:
    """The operator class registered under ``name``."""
    if name not in CURVATURES:
        raise ValueError(f"unknown curvature {name!r}; choose from {', '.join(CURVATURES)}")
    return CURVATURES[name].load()


def curvature_help() -> str:
    """One help line for ``--curvature``: every name with its description."""
    return "; ".join(f"{c.name}: {c.help}" for c in CURVATURES.values())
