"""What the federated composition consumes from a client's curvature operator.

:class:`~hessrank.curvature.federated.FederatedOperator` builds one operator per client with
``cls(model, task, data, space=shared_space, check_determinism=False, **kwargs)`` and then
uses only the members declared here. Two protocols, one per strategy:

- :class:`ClientOperator` (the "per-client" strategy): products of rows of tangents, the
  sample count, the route, and how the server's matrix follows from the clients'. For an
  *additive* curvature — the matrix of the server loss L = Σ_c w_c L_c is Σ_c w_c C_c, true of
  the Hessian, the GGN and the Fisher — each client's operator pushes its own and the
  server's tangents in one block. A non-additive one (K-FAC: the server's Kronecker factors
  are the weighted means of the clients', and A⊗G of the means is not the mean of the A_c⊗G_c)
  supplies ``combine(clients, weights)``, the server's operator.
- :class:`UnitOperator` (the "stacked" strategy): additionally the data, the memory budget,
  per-unit gradients and linearizations over equal-size padded units
  (:mod:`hessrank.curvature.stacked`) and an operator of the same kind on other data.

Both are ``runtime_checkable``: ``isinstance(op, UnitOperator)`` decides whether the stacked
strategy can apply (presence of the members; their behaviour is tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from hessrank.curvature.data import Batches
from hessrank.curvature.params import ParameterSpace
from hessrank.data.task import Task


@runtime_checkable
class ClientOperator(Protocol):
    """A client's curvature operator as the per-client strategy uses it."""

    curvature: str
    """Registry name ("hessian", "ggn", "fisher", "kfac")."""
    additive: bool
    """C(Σ_c w_c L_c) = Σ_c w_c C(L_c) (else the class provides :meth:`combine`)."""
    space: ParameterSpace
    """The shared parameter space (model twin, θ, flat layout)."""
    task: Task
    route: dict
    """How products are computed (JSON-serializable; recorded with results)."""

    @property
    def num_samples(self) -> int:
        """The client's sample count (over all ranks under a process group)."""

    def apply_rows(self, R: Tensor, reduce: bool = True) -> Tensor:
        """(k, p) rows of tangents → (k, p) rows of C v; ``reduce=False``: this rank's share,
        not summed over the ranks (the composition sums the whole stack once)."""

    def context(self) -> Any:
        """The context products run in (mode, attention kernel)."""


@runtime_checkable
class CombinableOperator(ClientOperator, Protocol):
    """A non-additive client operator: the server's operator comes from the clients'."""

    @classmethod
    def combine(cls, clients: Sequence[Any], weights: Sequence[float]) -> ClientOperator:
        """The operator of the server loss Σ_c w_c L_c from the clients' operators."""


@runtime_checkable
class UnitOperator(ClientOperator, Protocol):
    """A client operator the stacked strategy can lay out as padded units."""

    batches: Batches
    cache_budget_mb: float

    def activations_per_sample(self) -> float: ...

    def gradient(self, reduce: bool = True) -> Tensor: ...

    def units_gradient(self, inputs, targets: Tensor, keep: Tensor, scale: Tensor) -> Tensor: ...

    def unit_linearization(self, inputs, targets: Tensor, keep: Tensor, scale: Tensor
                           ) -> Callable[[Tensor], Tensor]: ...

    def with_data(self, data, **route) -> UnitOperator: ...
