"""mFedLoRU: FedLoRU with clients of rank r_c ≤ r (heterogeneous capacity; Park et al., 2024).

Client c's rank r_c is its *tier*, part of its state (``config.client_ranks``, default the
tiers r, r/2, r/4 cycled, :func:`client_ranks`). Two schemes, one strategy and one client
procedure each (``config.mfedloru_scheme`` picks the pair in the registry):

``hierarchical`` (the paper's scheme; :class:`HierarchicalMFedLoRU`, :class:`NestedClient`):
every client receives the global rank-r factors A, B and trains *nested* low-rank updates of
them, A_c = A + P_A·Q_A and B_c = B + P_B·Q_B with inner rank r_c (:class:`NestedLayer`; A, B,
W0 frozen on the client). It sends P_A, Q_A, P_B, Q_B — r_c·(r + fan_in) + r_c·(out + r)
floats per layer — and the non-factorized trainables; the server maps the reply back to
rank r (A_c, B_c, :meth:`HierarchicalMFedLoRU.full_reply`) and averages A and B separately
with weights n_c, exactly as FedLoRA; merges as FedLoRU. The nested pairs are drawn afresh
every round from the round generator. (The authors' public code, haemPark/fedloru_official,
has no mFedLoRU; the nesting, the inits and the fresh draw per round are our choices,
recorded in ``config.notes``.)

``width`` (width slicing; :class:`WidthMFedLoRU`, :class:`WidthClient`): client c receives
the leading r_c components, A[:r_c] (rows) and B[:, :r_c] (columns), and trains the rank-r_c
model W0 + (α/r)·B[:, :r_c]·A[:r_c] (components r_c..r absent from its model). The server
maps replies back coordinate-wise: component i becomes Σ_{c: r_c > i} n_c X_c[i] /
Σ_{c: r_c > i} n_c and keeps its value when no sampled client holds it. Floats per client
each way: Σ_layers r_c·(fan_in + out) + the non-factorized tensors.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from hessrank.data.task import Task
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import reply_metrics, shared_keys, weighted_average
from hessrank.fl.fedlora import LoRALocalSGD
from hessrank.fl.fedloru import FedLoRU
from hessrank.fl.layers import densify, factorize, factorized_layers, set_submodule
from hessrank.fl.protocol import ClientData, ClientReply, ClientState, ClientTask

__all__ = [
    "HierarchicalMFedLoRU",
    "NestedClient",
    "NestedLayer",
    "WidthClient",
    "WidthMFedLoRU",
    "client_ranks",
]


def client_ranks(config: TrainConfig) -> list[int]:
    """r_c per client: ``config.client_ranks``, or (r, r//2, r//4)[c % 3] (at least 1)."""
    if config.client_ranks is not None:
        ranks = [int(r) for r in config.client_ranks]
    else:
        tiers = [config.rank, max(1, config.rank // 2), max(1, config.rank // 4)]
        ranks = [tiers[c % 3] for c in range(config.clients)]
    if len(ranks) != config.clients or not all(1 <= r <= config.rank for r in ranks):
        raise ValueError(
            f"client_ranks needs {config.clients} entries in [1, rank={config.rank}], got "
            f"{ranks}; leave it unset for the default tiers r, r/2, r/4"
        )
    return ranks


def _tier(state: ClientState, client_id: int) -> int:
    if "rank" not in state:
        raise ValueError(f"client {client_id} has no tier ('rank') in its state")
    return int(state["rank"])


class _MFedLoRU(FedLoRU):
    """What both schemes' servers share: the tiers and the factor keys."""

    name = "mfedloru"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self.client_ranks = client_ranks(config)
        self.factor_keys = {f"{n}.{f}" for n in self.layer_names for f in ("A", "B")}

    def notes(self) -> dict[str, str]:
        return {**super().notes(), "client_ranks": ",".join(map(str, self.client_ranks))}


class _TieredClient(LoRALocalSGD):
    def initial_states(self, num_clients: int) -> dict[int, ClientState]:
        return {c: {"rank": torch.tensor(r, dtype=torch.int64)}
                for c, r in enumerate(client_ranks(self.config))}  # fmt: skip


# ---- hierarchical ------------------------------------------------------------------------------
class NestedLayer(nn.Module):
    """A LoRA layer whose global factors are adapted by rank-r_c updates (mFedLoRU client).

    A_c = A + P_A·Q_A (P_A: r × r_c, Q_A: r_c × fan_in) and B_c = B + P_B·Q_B (P_B: out × r_c,
    Q_B: r_c × r), in the matrix views of A and B; the layer computes W0 + (α/r)·B_c·A_c.
    Init: Q_A ~ U(±1/√fan_in), Q_B ~ U(±1/√r), P_A = P_B = 0 (so A_c = A, B_c = B at the start).
    A, B, W0 are frozen; only P_A, Q_A, P_B, Q_B train.
    """

    def __init__(self, layer: nn.Module, rank_c: int, generator: torch.Generator) -> None:
        super().__init__()
        self.layer = layer
        r, fan_in, out = layer.rank, layer.fan_in, layer.out_dim
        A = layer.A
        self.QA = nn.Parameter(_uniform_like((rank_c, fan_in), fan_in, A, generator))
        self.PA = nn.Parameter(A.new_zeros(r, rank_c))
        self.QB = nn.Parameter(_uniform_like((rank_c, r), r, A, generator))
        self.PB = nn.Parameter(A.new_zeros(out, rank_c))

    def forward(self, x: Tensor) -> Tensor:
        A_c, B_c = nested_factors(self.layer.A, self.layer.B, self.PA, self.QA, self.PB, self.QB)
        return self.layer.forward_with(x, A_c, B_c)


def nested_factors(
    A: Tensor, B: Tensor, PA: Tensor, QA: Tensor, PB: Tensor, QB: Tensor
) -> tuple[Tensor, Tensor]:
    """(A_c, B_c) = (A + P_A·Q_A, B + P_B·Q_B) in the shapes of A and B."""
    return A + (PA @ QA).reshape(A.shape), B + (PB @ QB).reshape(B.shape)


def _uniform_like(shape: tuple[int, int], fan_in: int, like: Tensor, gen: torch.Generator):
    u = torch.rand(shape, generator=gen, dtype=like.dtype)
    return ((2.0 * u - 1.0) / math.sqrt(fan_in)).to(like.device)


_NESTED = ("PA", "QA", "PB", "QB")


class HierarchicalMFedLoRU(_MFedLoRU):
    """The hierarchical scheme's server (module docstring)."""

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "nested_ranks": "hierarchical: client c trains A + PA QA, B + PB QB (inner rank r_c; "
            "QA ~ U(+-1/sqrt(fan_in)), QB ~ U(+-1/sqrt(r)), PA = PB = 0, redrawn every round "
            "from the round generator); sends PA, QA, PB, QB; server averages A_c, B_c like "
            "FedLoRA",
        }

    def full_reply(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        """The message's keys with A_c, B_c rebuilt from the nested factors the client sent."""
        got, out = reply.tensors, {}
        for key in task.message:
            owner, _, leaf = key.rpartition(".")
            if key in self.factor_keys:
                nested = [got[f"{owner}.{f}"] for f in _NESTED]
                A_c, B_c = nested_factors(task.message[f"{owner}.A"],
                                          task.message[f"{owner}.B"], *nested)  # fmt: skip
                out[key] = A_c if leaf == "A" else B_c
            else:
                out[key] = got[key]
        return out


class NestedClient(_TieredClient):
    """The hierarchical scheme's client: trains P_A, Q_A, P_B, Q_B (drawn from the round
    generator every round) and the non-factorized trainables; replies with those."""

    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        worker = copy.deepcopy(self.worker)  # layers are replaced below: a fresh copy
        worker.load_state_dict(task.held, strict=False)
        worker.load_state_dict(task.message, strict=False)
        rc = _tier(state, task.client_id)
        nested = {}
        for name, layer in factorized_layers(worker).items():
            nested[name] = NestedLayer(layer, rc, rng)
            set_submodule(worker, name, nested[name])
        for m in nested.values():
            for p in m.layer.parameters():  # A, B (and W0) stay fixed; the bias trains
                p.requires_grad_(p is m.layer.bias)
        params = [p for p in worker.parameters() if p.requires_grad]
        result = self.local(worker, params, data, task.lr, rng)
        out = worker.state_dict()
        reply = {}
        for key in task.message:
            owner, _, leaf = key.rpartition(".")
            if owner in nested and leaf in ("A", "B"):
                continue
            src = f"{owner}.layer.{leaf}" if owner in nested else key
            reply[key] = out[src].detach().clone()
        for owner, m in nested.items():
            reply.update({f"{owner}.{f}": getattr(m, f).detach().clone() for f in _NESTED})
        return ClientReply(reply, reply_metrics(result)), state


# ---- width ---------------------------------------------------------------------------------------
def rank_model(template: nn.Module, names: list[str], config: TrainConfig, rank: int) -> nn.Module:
    """The dense ``template`` factorized at rank r_c with scale α/r (= (α r_c/r)/r_c): the
    leading r_c components of the global model (factor values are placeholders)."""
    return factorize(
        copy.deepcopy(template), names, rank=rank, alpha=config.lora_alpha * rank / config.rank,
        generator=torch.Generator(),  # values are overwritten; keep the global RNG
        dropout=config.lowrank_dropout,
    )  # fmt: skip


class WidthMFedLoRU(_MFedLoRU):
    """The width scheme's server (module docstring)."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self._workers: dict[int, nn.Module] = {}

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "nested_ranks": "width: client c trains A[:r_c], B[:, :r_c] at scale alpha/r "
            "(trailing components absent from its model); server averages each component over "
            "the clients holding it, weights n_c; components nobody holds keep their value",
        }

    def download(self, client_id: int) -> dict[str, Tensor]:
        rc = self.client_ranks[client_id]
        state = self.model.state_dict()
        out = {}
        for k in shared_keys(self.model):
            v = state[k]
            if k in self.factor_keys:
                v = v[:rc] if k.endswith(".A") else v[:, :rc]
            out[k] = v
        return out

    def _rank_model(self, rank: int) -> nn.Module:
        if rank not in self._workers:
            self._workers[rank] = rank_model(self.template, self.layer_names, self.config, rank)
        return self._workers[rank]

    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        worker = copy.deepcopy(self._rank_model(self.client_ranks[task.client_id]))
        worker.load_state_dict({**task.held, **reply.tensors}, strict=False)
        return densify(worker, self.template).state_dict()

    def average(self, replies: list[dict[str, Tensor]], sizes: list[int]) -> None:
        plain = [{k: v for k, v in r.items() if k not in self.factor_keys} for r in replies]
        new = weighted_average(plain, sizes)
        state = self.model.state_dict()
        for key in self.factor_keys:
            current = state[key]
            dim = 0 if key.endswith(".A") else 1
            acc = torch.zeros_like(current)
            weight = torch.zeros(current.shape[dim], dtype=current.dtype, device=current.device)
            for reply, n in zip(replies, sizes):
                rc = reply[key].shape[dim]
                acc.narrow(dim, 0, rc).add_(reply[key], alpha=float(n))
                weight[:rc] += float(n)
            held = weight > 0
            shape = [1] * current.dim()
            shape[dim] = -1
            w = torch.where(held, weight, torch.ones_like(weight)).reshape(shape)
            mask = held.reshape(shape)
            new[key] = torch.where(mask, acc / w, current)
        self.model.load_state_dict(new, strict=False)


class WidthClient(_TieredClient):
    """The width scheme's client: FedAvg's local SGD in its rank-r_c model."""

    def __init__(self, model: nn.Module, config: TrainConfig, task: Task) -> None:
        self.template = copy.deepcopy(model)
        super().__init__(model, config, task)
        self.layer_names = list(factorized_layers(self.worker))
        self._workers: dict[int, nn.Module] = {}

    def worker_for(self, task: ClientTask, state: ClientState) -> nn.Module:
        """The rank-r_c model of this client's tier (built once per tier)."""
        rc = _tier(state, task.client_id)
        if rc not in self._workers:
            self._workers[rc] = rank_model(self.template, self.layer_names, self.config, rc)
        return self._workers[rc]
