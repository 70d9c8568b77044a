"""The round protocol every federated algorithm implements (DESIGN.md §5).

A round is: server broadcast -> client work -> aggregation -> server update. In code:
:meth:`FederatedAlgorithm.run_round` builds, phase by phase (``phases``), one
:class:`ClientTask` per sampled client (phase, client id, message tensors, tensors the client
holds), has each one done by an ``execute`` function (:data:`Execute`; by default the
algorithm's own :meth:`FederatedAlgorithm.client_work` in process, under ``--engine flower`` a
Flower ClientApp, :mod:`hessrank.fl.flower`), and aggregates the :class:`ClientReply` s.
Client work is a pure function of (task, local data, round generator). Every tensor that
travels is counted in floats, up (client -> server) and down (server -> client).

Phases: FedAvg, FedProx, FedLoRA, FedLoRU (+p/m): ``train``. FeDLRT: ``basis`` (basis
gradients at the global point), ``correction`` (∇_S̃ L_c at the augmented point, full
correction only), ``train`` (local coefficient steps); the server augments between the first
two and truncates after the last.

Adding an algorithm: a module with a subclass (FedProx, 56 lines, overrides only the local
objective of FedAvg), one line in ``config.ALGORITHM_REGISTRY`` (the only registry) with its
config fields in ``config.py``, and each field's help line in ``cli.py``: three library files
(plus its test).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hessrank.fl.config import TrainConfig


@dataclass(frozen=True)
class ClientData:
    """One client's local training set: ``inputs`` (n, ...) and integer ``targets`` (n,)."""

    client_id: int
    inputs: Tensor
    targets: Tensor

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class RoundStats:
    """What one round reports to the runner (which logs it to metrics.jsonl).

    train_loss: size-weighted mean over the sampled clients of their mean local loss.
    floats_up / floats_down: per sampled client, floats sent in each direction this round.
    ranks: per factorized layer, its rank after the round (FeDLRT; empty otherwise).
    extra: anything else worth logging (JSON-serializable scalars).
    """

    train_loss: float
    floats_up: dict[int, int]
    floats_down: dict[int, int]
    ranks: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientTask:
    """One unit of client work the server asks for: a message of one phase to one client.

    phase: which step of the round (FedAvg family: ``"train"``; FeDLRT: ``"basis"``,
        ``"correction"``, ``"train"``; see each algorithm's :attr:`FederatedAlgorithm.phases`).
    client_id: the client that does the work (its local data is ``ClientData(client_id)``).
    message: the tensors the server sends (counted as communication by the algorithm).
    held: tensors the client holds in sync without receiving them this round (LoRA's frozen
        W0 after the merges it has applied); not communication. Sent along by engines whose
        clients are separate processes.
    lr: the round's learning rate.
    """

    phase: str
    client_id: int
    message: dict[str, Tensor]
    held: dict[str, Tensor] = field(default_factory=dict)
    lr: float = 0.0


@dataclass
class ClientReply:
    """What a client returns for a :class:`ClientTask`: tensors and scalar metrics."""

    tensors: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


Execute = Callable[[ClientTask, "ClientData", torch.Generator], ClientReply]
"""How a round gets client work done: ``execute(task, data, generator) -> reply``. The built-in
engine calls :meth:`FederatedAlgorithm.client_work` in process; the Flower engine
(:mod:`hessrank.fl.flower`) sends the task (and the generator's state) to a ClientApp. Tasks
are executed one at a time in the order a round issues them, all drawing from ``generator``."""


class FederatedAlgorithm(ABC):
    """Base class of FedAvg, FedLoRA, FedLoRU (+p/m) and FeDLRT.

    Subclasses set ``name`` and implement the abstract methods. ``__init__`` receives the dense
    model built from the config (already seeded) and may replace layers by factorized ones.
    """

    name: str = ""
    phases: tuple[str, ...] = ("train",)
    """The message phases of one round, in order (the ``phase`` of its :class:`ClientTask`)."""
    stateless_clients: bool = True
    """Whether :meth:`client_work` is a pure function of (task, local data, generator); False
    for algorithms whose clients keep state between rounds (pFedLoRU's personal pairs), which
    only the built-in engine runs."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        self.record: dict[int, dict[str, Tensor]] | None = None
        """When a dict (the runner sets it for ``record_updates``), :meth:`run_round` stores
        in it, per sampled client, the client's *effective dense* state after local training
        (the state_dict keys of :meth:`effective_model`)."""

    @abstractmethod
    def run_round(
        self,
        round_idx: int,
        clients: list[ClientData],
        lr: float,
        generator: torch.Generator,
        execute: Execute | None = None,
    ) -> RoundStats:
        """Run one communication round with the sampled ``clients`` at learning rate ``lr``:
        server broadcast -> client work (every task through ``execute``, default
        :meth:`client_work` in process) -> aggregation -> server update."""

    @abstractmethod
    def client_work(
        self, task: ClientTask, data: ClientData, generator: torch.Generator
    ) -> ClientReply:
        """The client's side of one phase: a function of (task, local data, generator) only
        (plus the config the algorithm was built from)."""

    def _execute(self, execute: Execute | None) -> Execute:
        return execute if execute is not None else self.client_work

    @abstractmethod
    def effective_model(self) -> nn.Module:
        """The global model as a plain dense network (same class and state_dict keys as the
        model built from the config), for evaluation, checkpoints and Hessian analysis."""

    @abstractmethod
    def state_tensors(self) -> dict[str, Tensor]:
        """Every tensor needed to resume the run exactly (factors, bases, personal pairs...)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""

    def client_model(self, client_id: int) -> nn.Module:
        """The model a client evaluates with; the global one except for personalized methods."""
        return self.effective_model()


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or weight (divergence).

    ``client_id`` names the client whose local work produced it (None: found after
    aggregation); the runner adds the round and the last finite checkpoint to the message.
    """

    def __init__(self, message: str, client_id: int | None = None) -> None:
        super().__init__(message)
        self.client_id = client_id


def first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The first key whose floating-point tensor has a NaN or ±inf entry, else None."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key
    return None


def check_finite_reply(tensors: dict[str, Tensor], client_id: int) -> None:
    """Raise :class:`NonFiniteError` naming the client and the tensor if a reply diverged."""
    key = first_non_finite(tensors)
    if key is not None:
        raise NonFiniteError(
            f"client {client_id} sent non-finite values in {key!r}", client_id=client_id
        )
