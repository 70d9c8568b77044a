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

:class:`FedAvg` also holds the round skeleton (broadcast, local training, aggregation) that
FedLoRA/FedLoRU reuse by overriding the hooks ``_download``, ``_train_client``,
``_aggregate`` and ``_after_round``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.fl.base import (
    ClientData,
    ClientReply,
    ClientTask,
    Execute,
    FederatedAlgorithm,
    RoundStats,
    check_finite_reply,
)
from hessrank.fl.config import TrainConfig
from hessrank.fl.local import LocalResult, LossFn, local_sgd

__all__ = ["FedAvg", "count_floats", "shared_keys", "weighted_average"]


def shared_keys(model: nn.Module) -> list[str]:
    """state_dict keys that travel between server and clients: every trainable parameter
    (``requires_grad``) and every buffer (frozen parameters, e.g. LoRA's W0, stay put)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return [k for k in model.state_dict() if k not in frozen]


def count_floats(tensors: dict[str, Tensor]) -> int:
    """Number of floating-point entries in a message (integer tensors are bookkeeping)."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


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


class FedAvg(FederatedAlgorithm):
    """FedAvg on a dense model; see the module docstring for the round.

    ``loss_fn`` (batch-mean loss of (outputs, targets)) defaults to cross-entropy; the runner
    sets it to the dataset's loss.
    """

    name = "fedavg"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self.loss_fn: LossFn = F.cross_entropy
        self._worker: nn.Module | None = None
        config.notes.setdefault(
            "aggregation",
            "size-weighted mean (n_c) of trainable parameters and float buffers; integer "
            "buffers from the first sampled client",
        )
        config.notes.setdefault(
            "local_optimizer",
            "SGD (momentum, weight decay as configured), momentum buffer reset every round; "
            "batches from fresh permutations drawn from the round generator",
        )

    # ---- hooks -------------------------------------------------------------------------
    def _worker_model(self) -> nn.Module:
        """A scratch copy of the global model that clients train in (built once)."""
        if self._worker is None:
            self._worker = copy.deepcopy(self.model)
        return self._worker

    def _download(self, client_id: int) -> dict[str, Tensor]:
        """The server's message to one client: the shared state of the global model."""
        state = self.model.state_dict()
        return {k: state[k] for k in shared_keys(self.model)}

    def _sync_floats(self, client_id: int) -> int:
        """Extra floats a client must download before this round's message (FedLoRU merges)."""
        return 0

    def _local(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        client: ClientData,
        lr: float,
        generator: torch.Generator,
        steps: int | None = None,
    ) -> LocalResult:
        """:func:`local_sgd` with the config's schedule (``steps`` overrides local_steps)."""
        cfg = self.config
        return local_sgd(
            model, params, client, self.loss_fn, lr=lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps if steps is None else steps,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, generator=generator,
        )  # fmt: skip

    def _client_held(self, client_id: int) -> dict[str, Tensor]:
        """Tensors a client holds in sync without them being sent this round (frozen W0)."""
        state = self.model.state_dict()
        keys = set(shared_keys(self.model))
        return {k: v for k, v in state.items() if k not in keys}

    def _train_client(
        self,
        message: dict[str, Tensor],
        client: ClientData,
        lr: float,
        gen: torch.Generator,
        held: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], LocalResult]:
        """Client code: load what the client holds (``held``, default the server's copy) and
        the message, train locally, reply with the same keys."""
        worker = self._worker_model()
        if held is None:
            held = self._client_held(client.client_id)
        worker.load_state_dict(held, strict=False)
        worker.load_state_dict(message, strict=False)
        trainable = [p for p in worker.parameters() if p.requires_grad]
        result = self._local(worker, trainable, client, lr, gen)
        state = worker.state_dict()
        return {k: state[k].detach().clone() for k in message}, result

    def _client_effective(self, reply: dict[str, Tensor], client_id: int) -> dict[str, Tensor]:
        """The dense effective state_dict the client's ``reply`` stands for (update records)."""
        state = dict(self._client_held(client_id))
        state.update(reply)
        return {k: v.detach().clone() for k, v in state.items()}

    def _reply_floats(self, reply: dict[str, Tensor], client_id: int) -> int:
        """Floats the client actually sends for ``reply`` (a reply may be reconstructed from a
        smaller message, e.g. mFedLoRU's nested factors)."""
        return count_floats(reply)

    def _aggregate(
        self, replies: list[dict[str, Tensor]], clients: list[ClientData]
    ) -> None:
        new = weighted_average(replies, [c.size for c in clients])
        self.model.load_state_dict(new, strict=False)

    def _after_round(self, round_idx: int, generator: torch.Generator) -> dict[str, float]:
        """Server work after aggregation (FedLoRU's merge); returns extra log entries."""
        return {}

    # ---- protocol ----------------------------------------------------------------------
    def client_work(
        self, task: ClientTask, data: ClientData, generator: torch.Generator
    ) -> ClientReply:
        """Phase ``train``: local training from the message; replies with the message's keys
        and the metrics ``loss`` (mean local batch loss), ``steps`` and ``seconds``."""
        if task.phase != "train":
            raise ValueError(f"{self.name} has only the phase 'train', got {task.phase!r}")
        reply, result = self._train_client(task.message, data, task.lr, generator, task.held)
        metrics = {"loss": result.mean_loss, "steps": float(result.num_steps),
                   "seconds": result.seconds}  # fmt: skip
        return ClientReply(reply, metrics)

    def run_round(
        self,
        round_idx: int,
        clients: list[ClientData],
        lr: float,
        generator: torch.Generator,
        execute: Execute | None = None,
    ) -> RoundStats:
        """One round; clients are visited in the given order, all drawing from ``generator``:
        broadcast (``_download``) -> ``client_work`` per client (through ``execute``) ->
        ``_aggregate`` -> ``_after_round``."""
        if not clients:
            raise ValueError("a round needs at least one sampled client")
        run = self._execute(execute)
        replies, losses, seconds = [], [], 0.0
        up: dict[int, int] = {}
        down: dict[int, int] = {}
        for client in clients:
            message = self._download(client.client_id)
            down[client.client_id] = self._sync_floats(client.client_id) + count_floats(message)
            task = ClientTask("train", client.client_id, message,
                              self._client_held(client.client_id), lr)  # fmt: skip
            answer = run(task, client, generator)
            reply = answer.tensors
            check_finite_reply(reply, client.client_id)
            up[client.client_id] = self._reply_floats(reply, client.client_id)
            if self.record is not None:
                self.record[client.client_id] = self._client_effective(reply, client.client_id)
            replies.append(reply)
            losses.append(float(answer.metrics["loss"]))
            seconds += float(answer.metrics["seconds"])
        self._aggregate(replies, clients)
        extra = {"client_seconds": seconds}
        extra.update(self._after_round(round_idx, generator))
        n = sum(c.size for c in clients)
        train_loss = sum(c.size * loss for c, loss in zip(clients, losses)) / n
        return RoundStats(train_loss, up, down, ranks=self._ranks(), extra=extra)

    def _ranks(self) -> dict[str, int]:
        return {}

    def effective_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        _load_strict(self.model, tensors, "model")


def _load_strict(model: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
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
