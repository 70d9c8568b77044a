"""One federated round, run by the runtime: phases of configure → client work → aggregate.

:class:`Federation` holds what the runtime runs: the server :class:`~hessrank.fl.protocol.
Strategy`, the :class:`~hessrank.fl.protocol.Client` procedure and the client states
(:class:`~hessrank.fl.protocol.ClientStates`). :meth:`Federation.round` is the round::

    for phase in strategy.phases:
        tasks = strategy.configure(phase, t, lr, sampled)
        for task in tasks:                         # one at a time, in order, all drawing
            reply, state = execute(task, data, states[task.client_id], rng)   # from rng
            states[task.client_id] = state
            observers see (task, reply)
        strategy.aggregate(phase, tasks, replies, sampled)
    stats = strategy.update(t, rng)                # server update

``execute`` is the engine: the client procedure itself (built-in), or a Flower ClientApp
(:mod:`hessrank.fl.flower`). Which clients a round samples (:func:`sample_clients`) and its
learning rate (:func:`learning_rate`) are the same for every algorithm. Observers
(:class:`RoundObserver`) see every round and reply; recording each client's update
(``record_updates``) is one (:class:`UpdateRecorder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hessrank.fl.protocol import (
    Client,
    ClientData,
    ClientReply,
    ClientStates,
    ClientTask,
    Execute,
    RoundStats,
    Strategy,
    check_finite_reply,
)
from hessrank.fl.registry import algorithm_entry

if TYPE_CHECKING:
    from hessrank.data.task import Task
    from hessrank.fl.config import TrainConfig

__all__ = ["Federation", "RoundObserver", "UpdateRecorder", "learning_rate", "sample_clients"]


def sample_clients(num_clients: int, fraction: float, generator: torch.Generator) -> list[int]:
    """max(1, ⌊C·K⌋) distinct client ids drawn uniformly without replacement, ascending.

    Always consumes one ``torch.randperm(K, generator)``, also for C = 1.
    """
    m = max(1, math.floor(fraction * num_clients + 1e-9))
    perm = torch.randperm(num_clients, generator=generator)
    return sorted(int(i) for i in perm[:m])


def learning_rate(config: TrainConfig, round_idx: int) -> float:
    """Learning rate of round t = 1..T.

    constant: λ; cosine: λ·½(1 + cos(π·(t−1)/T)); step: λ·decay^⌊(t−1)/step_every⌋.
    """
    t, total = round_idx - 1, max(config.rounds, 1)
    if config.lr_schedule == "constant":
        return float(config.lr)
    if config.lr_schedule == "cosine":
        return float(config.lr * 0.5 * (1.0 + math.cos(math.pi * t / total)))
    if config.lr_schedule == "step":
        return float(config.lr * config.lr_decay ** (t // max(config.lr_step_every, 1)))
    raise ValueError(
        f"unknown lr_schedule {config.lr_schedule!r}; choose constant, cosine or step"
    )


class RoundObserver:
    """Sees a round from outside: its start, every reply, its end. Methods do nothing by
    default; an observer never changes the round, but may stop it by raising
    :class:`~hessrank.fl.protocol.NonFiniteError` (the divergence checks,
    :mod:`hessrank.fl.divergence`)."""

    def round_started(self, round_idx: int, strategy: Strategy) -> None:
        """Before the first phase."""

    def replied(self, task: ClientTask, reply: ClientReply, strategy: Strategy) -> None:
        """After each client reply (already checked finite), before aggregation."""

    def round_ended(self, round_idx: int, stats: RoundStats) -> None:
        """After the server update."""


class UpdateRecorder(RoundObserver):
    """Each sampled client's update of a round to the dense effective weights,
    Δ_c = θ_c − θ (the format of :mod:`hessrank.fl.rundir`): θ is the global model at the
    round's start, θ_c what the client's reply in the last phase stands for
    (:meth:`~hessrank.fl.protocol.Strategy.client_effective`). :attr:`updates` holds the
    last round's."""

    def __init__(self) -> None:
        self.updates: dict[int, dict[str, Tensor]] = {}
        self._broadcast: dict[str, Tensor] = {}
        self._phase = ""

    def round_started(self, round_idx: int, strategy: Strategy) -> None:
        self._broadcast = strategy.effective_model().state_dict()
        self._phase = strategy.phases[-1]
        self.updates = {}

    def replied(self, task: ClientTask, reply: ClientReply, strategy: Strategy) -> None:
        if task.phase != self._phase:
            return
        state = strategy.client_effective(task, reply)
        self.updates[task.client_id] = {k: state[k] - v for k, v in self._broadcast.items()
                                        if v.is_floating_point()}  # fmt: skip


@dataclass
class Federation:
    """The server strategy, the client procedure and the client states of one run."""

    strategy: Strategy
    client: Client
    states: ClientStates = field(default_factory=ClientStates)

    @classmethod
    def build(cls, model: nn.Module, config: TrainConfig, task: Task) -> Federation:
        """The registry's strategy and client for ``config`` (the strategy factorizes
        ``model`` in place; the client works on its own copy) and the clients' initial
        states."""
        strategy_cls, client_cls = algorithm_entry(config.algo).classes(config)
        client = client_cls(model, config, task)  # copies the dense model first
        strategy = strategy_cls(model, config)
        return cls(strategy, client, ClientStates(client.initial_states(config.clients)))

    def notes(self) -> dict[str, str]:
        """The open choices of both sides (for ``config.notes``)."""
        return {**self.strategy.notes(), **self.client.notes()}

    def round(
        self,
        round_idx: int,
        clients: Sequence[ClientData],
        lr: float,
        rng: torch.Generator,
        execute: Execute | None = None,
        observers: Sequence[RoundObserver] = (),
    ) -> RoundStats:
        """One round with the sampled ``clients`` (module docstring); every task through
        ``execute`` (default: :attr:`client` in process)."""
        if not clients:
            raise ValueError("a round needs at least one sampled client")
        run = self.client if execute is None else execute
        strategy, sampled = self.strategy, list(clients)
        by_id = {c.client_id: c for c in sampled}
        for obs in observers:
            obs.round_started(round_idx, strategy)
        for phase in strategy.phases:
            tasks = strategy.configure(phase, round_idx, lr, sampled)
            if not tasks:
                continue
            replies = []
            for task in tasks:
                reply, state = run(task, by_id[task.client_id], self.states.get(task.client_id),
                                   rng)  # fmt: skip
                check_finite_reply({**reply.tensors, **state}, task.client_id)
                self.states.put(task.client_id, state)
                for obs in observers:
                    obs.replied(task, reply, strategy)
                replies.append(reply)
            strategy.aggregate(phase, tasks, replies, [by_id[t.client_id] for t in tasks])
        stats = strategy.update(round_idx, rng)
        for obs in observers:
            obs.round_ended(round_idx, stats)
        return stats
