"""The round protocol: a server strategy and a client procedure (Flower's shape, docs/design.md).

A round is a sequence of message *phases* (FedAvg and the LoRA family: ``train``; FeDLRT:
``basis``, ``correction``, ``train``). In each phase the server :class:`Strategy`
*configures* one :class:`ClientTask` per sampled client, every task is answered by the
:class:`Client` procedure, and the strategy *aggregates* the replies; after the last phase it
makes its *server update* (FedLoRU's merge, FeDLRT's truncation) and reports the round
(:class:`RoundStats`). :func:`hessrank.fl.loop.run_round` drives this.

The two sides share nothing at run time:

- a :class:`Strategy` owns the global state, never trains and never sees a client's state;
- a :class:`Client` is a pure procedure ``client(task, data, state, rng) -> (reply, state)``
  that never aggregates: its result depends only on the task (the message), the client's
  local data, the client's own state and the random generator. What a client keeps between
  rounds (pFedLoRU's personal pair, mFedLoRU's tier, SCAFFOLD's control variate c_i) is its
  :data:`ClientState`, kept for it by the runtime in a :class:`ClientStates` store keyed by
  client id (in process: :mod:`hessrank.fl.runner`; under Flower the state travels with the
  task, :mod:`hessrank.fl.flower`) and saved in every checkpoint. A procedure never
  modifies the tensors of the state it receives; it returns new ones.

Both are built from the run's config and task (the loss) at construction: nothing is wired
by assigning attributes afterwards. Every tensor that travels is counted in floats, up
(client → server) and down (server → client).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hessrank.data.task import Task
    from hessrank.fl.config import TrainConfig

__all__ = [
    "Client",
    "ClientData",
    "ClientReply",
    "ClientState",
    "ClientStates",
    "ClientTask",
    "Execute",
    "NonFiniteError",
    "RoundStats",
    "Strategy",
    "check_finite_reply",
    "count_floats",
    "first_non_finite",
]

ClientState = dict[str, Tensor]
"""What one client keeps between rounds: named tensors (empty for stateless clients)."""


@dataclass(frozen=True)
class ClientData:
    """One client's local training set: ``inputs`` (n, ...) and ``targets`` (n, ...)."""

    client_id: int
    inputs: Tensor
    targets: Tensor

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class ClientTask:
    """One unit of client work the server asks for: a message of one phase to one client.

    phase: which step of the round (the strategy's :attr:`Strategy.phases`).
    client_id: the client that does the work (its local data is ``ClientData(client_id)``).
    message: the tensors the server sends (counted as communication by the strategy).
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


@dataclass
class RoundStats:
    """What one round reports to the runner (which logs it to metrics.jsonl).

    train_loss: the clients' local loss of the round (each strategy says which average).
    floats_up / floats_down: per sampled client, floats sent in each direction this round.
    ranks: per factorized layer, its rank after the round (empty for dense models).
    extra: anything else worth logging (JSON-serializable scalars).
    """

    train_loss: float
    floats_up: dict[int, int]
    floats_down: dict[int, int]
    ranks: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


Execute = Callable[
    [ClientTask, ClientData, ClientState, torch.Generator], tuple[ClientReply, ClientState]
]
"""How a round gets a task done: ``execute(task, data, state, rng) -> (reply, state)``. The
built-in engine calls the :class:`Client` in process; the Flower engine
(:mod:`hessrank.fl.flower`) sends the task, the state and the generator's state to a
ClientApp. Tasks are executed one at a time in the order a round issues them, all drawing
from ``rng``."""


class ClientStates:
    """The runtime's store of client states, keyed by client id.

    A client with no entry has the empty state (its procedure starts from its defaults,
    e.g. SCAFFOLD's c_i = 0). States are replaced, never modified in place, so a shallow
    :meth:`copy` is a snapshot. Saved in checkpoints as ``clients.{id}.{name}``.
    """

    def __init__(self, states: Mapping[int, ClientState] | None = None) -> None:
        self._states: dict[int, ClientState] = dict(states or {})

    def get(self, client_id: int) -> ClientState:
        return self._states.get(int(client_id), {})

    def put(self, client_id: int, state: ClientState) -> None:
        if state:
            self._states[int(client_id)] = dict(state)
        else:
            self._states.pop(int(client_id), None)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._states))

    def __len__(self) -> int:
        return len(self._states)

    def copy(self) -> ClientStates:
        return ClientStates(self._states)

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{id}.{name}`` → tensor, ids ascending (the checkpoint's ``clients.*``)."""
        return {f"{cid}.{k}": v for cid in self for k, v in sorted(self._states[cid].items())}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> ClientStates:
        """Inverse of :meth:`tensors`."""
        states: dict[int, ClientState] = {}
        for key, value in tensors.items():
            cid, _, name = key.partition(".")
            if not cid.isdigit() or not name:
                raise ValueError(f"client state key {key!r} is not '<client id>.<name>'")
            states.setdefault(int(cid), {})[name] = value
        return cls(states)


class Client(ABC):
    """A client procedure: ``client(task, data, state, rng) -> (reply, state)``.

    Built once per run (and once per Flower ClientApp process) from the dense model the
    config builds, the config and the task; keeps no state between calls (a scratch model it
    reuses is overwritten by every call).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, task: Task) -> None:
        self.config = config
        self.task = task

    @abstractmethod
    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        """Answer ``task`` on ``data`` from ``state``; return the reply and the new state."""

    def initial_states(self, num_clients: int) -> dict[int, ClientState]:
        """Every client's state before round 1 (drawn at setup, in client order); empty by
        default."""
        return {}

    def notes(self) -> dict[str, str]:
        """The choices the papers leave open on the client's side (for config.notes)."""
        return {}


class Strategy(ABC):
    """The server side of an algorithm: configure → aggregate per phase, then update.

    Owns the global model (``self.model``; the algorithm may replace layers by factorized
    ones in its constructor) and the server state; never trains.
    """

    name: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("train",)
    """The message phases of one round, in order."""
    personalized: ClassVar[bool] = False
    """Whether each client evaluates its own model (:meth:`client_model`)."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.config = config

    def notes(self) -> dict[str, str]:
        """The choices the papers leave open, as this strategy makes them (for config.notes)."""
        return {}

    @abstractmethod
    def configure(
        self, phase: str, round_idx: int, lr: float, clients: list[ClientData]
    ) -> list[ClientTask]:
        """The tasks of ``phase`` for the sampled ``clients`` (empty: the phase is skipped)."""

    @abstractmethod
    def aggregate(
        self, phase: str, tasks: list[ClientTask], replies: list[ClientReply],
        clients: list[ClientData],
    ) -> None:  # fmt: skip
        """Take the replies of ``phase`` (one per task, in order)."""

    @abstractmethod
    def update(self, round_idx: int, rng: torch.Generator) -> RoundStats:
        """The server update after the last phase; the round's statistics."""

    @abstractmethod
    def effective_model(self) -> nn.Module:
        """The global model as a plain dense network (same class and state_dict keys as the
        model built from the config), for evaluation, checkpoints and Hessian analysis."""

    @abstractmethod
    def state_tensors(self) -> dict[str, Tensor]:
        """Every server tensor needed to resume the run exactly (factors, bases, ...)."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""

    @abstractmethod
    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        """The dense effective state_dict a client's model-phase ``reply`` to ``task`` stands
        for (``record_updates``; the phase is the last of :attr:`phases`)."""

    def client_model(self, client_id: int, state: ClientState) -> nn.Module:
        """The dense model client ``client_id`` evaluates with, given its state: the global
        one unless :attr:`personalized`."""
        return self.effective_model()


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or weight (divergence).

    ``client_id`` names the client whose local work produced it (None: found after
    aggregation); the runner adds the round and the last finite checkpoint to the message.
    """

    def __init__(self, message: str, client_id: int | None = None) -> None:
        super().__init__(message)
        self.client_id = client_id


def count_floats(tensors: Mapping[str, Tensor]) -> int:
    """Number of floating-point entries in a message (integer tensors are bookkeeping)."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The first key whose floating-point tensor has a NaN or ±inf entry, else None.

    A NaN or ±inf entry makes the sum NaN or ±inf, so a finite sum proves every entry finite
    without the elementwise mask; a non-finite sum (possibly an overflow of finite entries) is
    settled by the elementwise check."""
    for key, t in tensors.items():
        if (t.is_floating_point() and not bool(torch.isfinite(t.sum()))
                and not bool(torch.isfinite(t).all())):
            return key
    return None


def check_finite_reply(tensors: Mapping[str, Tensor], client_id: int) -> None:
    """Raise :class:`NonFiniteError` naming the client and the tensor if a reply diverged."""
    key = first_non_finite(tensors)
    if key is not None:
        raise NonFiniteError(
            f"client {client_id} sent non-finite values in {key!r}", client_id=client_id
        )
