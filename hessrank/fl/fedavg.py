"""FedAvg: local SGD on sampled clients, size-weighted model averaging (McMahan et al., 2017).

One round with sampled clients S, n_c samples each, N_S = Σ_{c∈S} n_c:
    server → client c: θ                        (every parameter and float buffer)
    client c:          θ_c = E epochs (or s* steps) of SGD on L_c from θ
    client → server:   θ_c
    server:            θ ← Σ_{c∈S} (n_c / N_S) θ_c
Float buffers (BatchNorm running statistics) are averaged like parameters; integer buffers
(``num_batches_tracked``) are taken from the first sampled client and are not counted as
communication. The communication per sampled client is |θ| floats each way, |θ| = number of
parameters + number of float-buffer entries.

:class:`FedAvg` is the server strategy, :class:`LocalSGD` the client procedure. The LoRA
family keeps both and changes the model the server holds (:mod:`hessrank.fl.fedlora`);
FedProx keeps the strategy and changes the client's objective (:mod:`hessrank.fl.fedprox`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hessrank.data.task import Task
from hessrank.fl.config import TrainConfig
from hessrank.fl.local import LocalResult, local_sgd
from hessrank.fl.protocol import (
    Client,
    ClientData,
    ClientReply,
    ClientState,
    ClientTask,
    RoundStats,
    Strategy,
    count_floats,
)

__all__ = ["FedAvg", "LocalSGD", "load_strict", "reply_metrics", "shared_keys", "weighted_average"]


def shared_keys(model: nn.Module) -> list[str]:
    """state_dict keys that travel between server and clients: every trainable parameter
    (``requires_grad``) and every buffer (frozen parameters, e.g. LoRA's W0, stay put)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return [k for k in model.state_dict() if k not in frozen]


def weighted_average(states: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict:
    """Σ_i (w_i / Σ_j w_j) · states[i][k] for every floating key k; other keys from states[0].

    Args:
        states: client replies with identical keys and shapes.
        weights: non-negative, typically the client sizes n_c.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first)
        for state, w in zip(states, weights):
            acc.add_(state[key], alpha=float(w) / total)
        out[key] = acc
    return out


@dataclass
class _Round:
    """What a FedAvg-family server collects during one round."""

    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0


class FedAvg(Strategy):
    """FedAvg's server; see the module docstring for the round."""

    name = "fedavg"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self._round = _Round()

    def notes(self) -> dict[str, str]:
        return {
            "aggregation": "size-weighted mean (n_c) of trainable parameters and float "
            "buffers; integer buffers from the first sampled client",
            "local_optimizer": "SGD (momentum, weight decay as configured), momentum buffer "
            "reset every round; batches from fresh permutations drawn from the round generator",
        }

    # ---- what each client receives -----------------------------------------------------------
    def download(self, client_id: int) -> dict[str, Tensor]:
        """The server's message to one client: the shared state of the global model."""
        state = self.model.state_dict()
        return {k: state[k] for k in shared_keys(self.model)}

    def held(self, client_id: int) -> dict[str, Tensor]:
        """Tensors a client holds in sync without them being sent this round (frozen W0)."""
        state = self.model.state_dict()
        keys = set(shared_keys(self.model))
        return {k: v for k, v in state.items() if k not in keys}

    def sync_floats(self, client_id: int) -> int:
        """Extra floats a client must download before this round's message (FedLoRU merges)."""
        return 0

    # ---- the round ---------------------------------------------------------------------------
    def configure(
        self, phase: str, round_idx: int, lr: float, clients: list[ClientData]
    ) -> list[ClientTask]:
        self._round = _Round()
        tasks = []
        for c in clients:
            message = self.download(c.client_id)
            self._round.down[c.client_id] = self.sync_floats(c.client_id) + count_floats(message)
            tasks.append(ClientTask(phase, c.client_id, message, self.held(c.client_id), lr))
        return tasks

    def reply_floats(self, task: ClientTask, reply: ClientReply) -> int:
        """Floats the client sends for ``reply``."""
        return count_floats(reply.tensors)

    def aggregate(
        self, phase: str, tasks: list[ClientTask], replies: list[ClientReply],
        clients: list[ClientData],
    ) -> None:  # fmt: skip
        r = self._round
        for task, reply, c in zip(tasks, replies, clients):
            r.up[task.client_id] = self.reply_floats(task, reply)
            r.losses.append(float(reply.metrics["loss"]))
            r.sizes.append(c.size)
            r.seconds += float(reply.metrics["seconds"])
        self.average([self.full_reply(t, a) for t, a in zip(tasks, replies)], r.sizes)

    def full_reply(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        """The reply in the keys and shapes of the message (mFedLoRU maps nested factors)."""
        return reply.tensors

    def average(self, replies: list[dict[str, Tensor]], sizes: list[int]) -> None:
        """θ ← the size-weighted average of the replies."""
        self.model.load_state_dict(weighted_average(replies, sizes), strict=False)

    def server_step(self, round_idx: int, rng: torch.Generator) -> dict[str, float]:
        """Server work after aggregation (FedLoRU's merge); returns extra log entries."""
        return {}

    def update(self, round_idx: int, rng: torch.Generator) -> RoundStats:
        r = self._round
        extra = {"client_seconds": r.seconds}
        extra.update(self.server_step(round_idx, rng))
        n = sum(r.sizes)
        train_loss = sum(size * loss for size, loss in zip(r.sizes, r.losses)) / n
        return RoundStats(train_loss, r.up, r.down, ranks=self.ranks(), extra=extra)

    def ranks(self) -> dict[str, int]:
        """Rank per factorized layer (none for a dense model)."""
        return {}

    # ---- state -------------------------------------------------------------------------------
    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        state = dict(task.held)
        state.update(reply.tensors)
        return {k: v.detach().clone() for k, v in state.items()}

    def effective_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        load_strict(self.model, tensors, "model")


class LocalSGD(Client):
    """FedAvg's client: load what it holds and the message into its copy of the model,
    train the trainable parameters by :func:`~hessrank.fl.local.local_sgd`, reply with the
    message's keys and the metrics ``loss`` (mean local batch loss), ``steps`` and
    ``seconds``."""

    def __init__(self, model: nn.Module, config: TrainConfig, task: Task) -> None:
        super().__init__(model, config, task)
        self.worker = self.build_worker(copy.deepcopy(model))

    def build_worker(self, model: nn.Module) -> nn.Module:
        """The client's scratch model, from a copy of the dense model (LoRA: factorized)."""
        return model

    def local(
        self, model: nn.Module, params: list[nn.Parameter], data: ClientData, lr: float,
        rng: torch.Generator, steps: int | None = None,
    ) -> LocalResult:  # fmt: skip
        """:func:`local_sgd` with the config's schedule (``steps`` overrides local_steps),
        optimizer and clipping."""
        cfg = self.config
        return local_sgd(
            model, params, data, self.task, lr=lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps if steps is None else steps,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, generator=rng,
            max_grad_norm=cfg.max_grad_norm, stochastic=self.stochastic(),
        )  # fmt: skip

    def stochastic(self) -> bool:
        """Whether the worker's forward pass draws random numbers (LoRA: low-rank dropout)."""
        return False

    def worker_for(self, task: ClientTask, state: ClientState) -> nn.Module:
        """The model that trains ``task``: the client's one worker (a tiered client picks the
        worker of its rank)."""
        return self.worker

    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        if task.phase != "train":
            raise ValueError(f"this client has only the phase 'train', got {task.phase!r}")
        worker = self.worker_for(task, state)
        worker.load_state_dict(task.held, strict=False)
        worker.load_state_dict(task.message, strict=False)
        trainable = [p for p in worker.parameters() if p.requires_grad]
        result = self.local(worker, trainable, data, task.lr, rng)
        out = worker.state_dict()
        reply = {k: out[k].detach().clone() for k in task.message}
        return ClientReply(reply, reply_metrics(result)), state


def reply_metrics(result: LocalResult) -> dict[str, float]:
    """A local-training reply's metrics: ``loss``, ``steps``, ``seconds``."""
    return {"loss": result.mean_loss, "steps": float(result.num_steps),
            "seconds": result.seconds}  # fmt: skip


def load_strict(model: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """``load_state_dict`` with a one-line error naming missing/unexpected keys or the first
    tensor whose shape does not fit."""
    current = model.state_dict()
    expected = set(current)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} state does not match the algorithm's model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; was it saved by a run with another config?"
        )
    for key, value in current.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{what} state tensor {key!r} has shape {tuple(tensors[key].shape)}, the model "
                f"needs {tuple(value.shape)}; was it saved by a run with another config?"
            )
    model.load_state_dict(tensors)
