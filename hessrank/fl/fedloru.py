"""FedLoRU and its personalized (pFedLoRU) and heterogeneous-rank (mFedLoRU) variants
(Park et al., 2024, "Communication-efficient federated low-rank update").

FedLoRU is :class:`~hessrank.fl.fedlora.FedLoRA` plus accumulation: after the aggregation of
every round t with t % τ == 0 (τ = ``config.merge_every``), every factorized layer does
W0 ← W0 + (α/r)·B·A, then A is redrawn and B = 0 (function unchanged), so the sum of many
rank-r updates can reach high rank while only rank-r factors travel.

Communication of the merge (our accounting, recorded in ``config.notes``): every client holds
W0 and applies each merge itself from the merged pair (A, B) and the shared seed of the redraw.
A sampled client that has missed m merges since it last received a message first downloads,
per factorized layer, min(m·r·(fan_in + out), out·fan_in) floats (the m missed pairs, or W0
itself when that is smaller); the redrawn A and B = 0 are part of the next regular message.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from hessrank.fl.base import ClientData
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import _load_strict, count_floats, shared_keys, weighted_average
from hessrank.fl.fedlora import FedLoRA, init_generator
from hessrank.fl.layers import densify, factorize, factorized_layers, set_submodule
from hessrank.fl.local import LocalResult

__all__ = ["FedLoRU", "MFedLoRU", "PFedLoRU", "default_client_ranks"]


class FedLoRU(FedLoRA):
    """FedLoRA with a merge every ``config.merge_every`` rounds (0 disables merging).

    Training from scratch (W0 = 0, both factors random) is the default, as in the paper and
    the authors' code; ``from_scratch=False`` starts from the dense init with B = 0."""

    name = "fedloru"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        if config.merge_every < 0:
            raise ValueError(f"merge_every must be >= 0 (0: never merge), got {config.merge_every}")
        self.num_merges = 0
        self.synced = [0] * config.clients  # merges each client has applied
        config.notes.setdefault(
            "merge",
            "after aggregation of rounds t with t % merge_every == 0: W0 += (alpha/r) B A, "
            "A redrawn from the round generator, B = 0",
        )
        config.notes.setdefault(
            "merge_communication",
            "a sampled client that missed m merges downloads min(m r (fan_in+out), out fan_in) "
            "floats per layer before the round's message",
        )

    def _sync_floats(self, client_id: int) -> int:
        missed = self.num_merges - self.synced[client_id]
        self.synced[client_id] = self.num_merges
        if missed <= 0:
            return 0
        total = 0
        for layer in factorized_layers(self.model).values():
            pair = missed * layer.rank * (layer.fan_in + layer.out_dim)
            total += min(pair, layer.weight0.numel())
        return total

    def _after_round(self, round_idx: int, generator: torch.Generator) -> dict[str, float]:
        tau = self.config.merge_every
        if tau > 0 and round_idx % tau == 0:
            for layer in factorized_layers(self.model).values():
                layer.merge_(generator)
            self.num_merges += 1
            return {"merged": 1.0}
        return {"merged": 0.0}

    def state_tensors(self) -> dict[str, Tensor]:
        out = super().state_tensors()
        out["fedloru.num_merges"] = torch.tensor([self.num_merges], dtype=torch.int64)
        out["fedloru.synced"] = torch.tensor(self.synced, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        try:
            self.num_merges = int(tensors.pop("fedloru.num_merges")[0])
            self.synced = [int(v) for v in tensors.pop("fedloru.synced")]
        except KeyError as err:
            msg = f"FedLoRU state lacks {err.args[0]!r}; not a FedLoRU checkpoint"
            raise ValueError(msg) from None
        own = {k: v for k, v in tensors.items() if not k.startswith("personal.")}
        _load_strict(self.model, own, "factorized model")


class PFedLoRU(FedLoRU):
    """pFedLoRU: FedLoRU plus a personal pair per client that never leaves the client.

    Client c's layer is W_c = W0 + (α/r)·B·A + (α_p/r_p)·U_c·L_c, with L_c (r_p, fan_in) and
    U_c (out, r_p) stored as ``PA``/``PB`` (init: L_c random like A, U_c = 0, one draw per
    client at setup). Local training has two phases each round. Default (``personal_order =
    "global-first"``, the order of the authors' rebuttal): first the global pair A, B and the
    non-factorized trainables (personal pair frozen) on the configured schedule
    (``local_epochs`` / ``local_steps``), then the personal pair alone for ``personal_steps``
    steps — 0 means half as many steps as the global phase took (at least 1): "more epochs on
    the global pair", our reading, recorded in the notes. ``personal_order = "personal-first"``
    is the reverse (personal_steps 0: the same schedule as the global phase). Only the global
    tensors travel; the personal pair is never merged.
    """

    name = "pfedloru"
    stateless_clients = False  # the personal pairs live between rounds

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        gen = init_generator(config, 1)
        self._personal_template = copy.deepcopy(self.model)
        self.personal: list[dict[str, Tensor]] = []
        for _ in range(config.clients):  # one fresh draw per client, in client order
            pair: dict[str, Tensor] = {}
            for name, layer in factorized_layers(self._personal_template).items():
                layer.add_personal_(config.personal_rank, config.personal_alpha, gen)
                pair[f"{name}.PA"] = layer.PA.detach().clone()
                pair[f"{name}.PB"] = layer.PB.detach().clone()
            self.personal.append(pair)
        config.notes.setdefault(
            "personal",
            "per layer (alpha_p/r_p) PB PA, PA random, PB = 0; local round = "
            f"{config.personal_order} (global phase on the local schedule, personal phase "
            "personal_steps steps, 0: half the global steps when global-first, the same "
            "schedule when personal-first); personal pair never sent, never merged; "
            "client_model(c) uses it",
        )

    def _worker_model(self) -> nn.Module:
        if self._worker is None:
            self._worker = copy.deepcopy(self._personal_template)
        return self._worker

    def _train_client(
        self,
        message: dict[str, Tensor],
        client: ClientData,
        lr: float,
        gen: torch.Generator,
        held: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], LocalResult]:
        worker = self._worker_model()
        if held is None:
            held = self._client_held(client.client_id)
        worker.load_state_dict(held, strict=False)
        worker.load_state_dict(message, strict=False)
        worker.load_state_dict(self.personal[client.client_id], strict=False)
        personal = {n for n in self.personal[client.client_id]}
        named = dict(worker.named_parameters())
        p_params = [named[n] for n in personal]
        g_params = [p for n, p in named.items() if p.requires_grad and n not in personal]
        personal_first = self.config.personal_order == "personal-first"
        if personal_first:
            p_res = self._local(worker, p_params, client, lr, gen, steps=self._personal_steps())
            g_res = self._local(worker, g_params, client, lr, gen)
        else:
            g_res = self._local(worker, g_params, client, lr, gen)
            steps = self.config.personal_steps or max(1, g_res.num_steps // 2)
            p_res = self._local(worker, p_params, client, lr, gen, steps=steps)
        state = worker.state_dict()
        self.personal[client.client_id] = {n: state[n].detach().clone() for n in personal}
        reply = {k: state[k].detach().clone() for k in message}
        seconds = p_res.seconds + g_res.seconds
        return reply, LocalResult(g_res.mean_loss, p_res.num_steps + g_res.num_steps, seconds)

    def _personal_steps(self) -> int | None:
        """personal-first: ``personal_steps``, or (0) the global phase's schedule."""
        return self.config.personal_steps or None

    def client_model(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s dense model W0 + (α/r)·B·A + (α_p/r_p)·U_c·L_c."""
        if not 0 <= client_id < len(self.personal):
            raise ValueError(f"client_id must be in [0, {len(self.personal)}), got {client_id}")
        model = copy.deepcopy(self._personal_template)
        model.load_state_dict(self.model.state_dict(), strict=False)
        model.load_state_dict(self.personal[client_id], strict=False)
        return densify(model, self.template)

    def state_tensors(self) -> dict[str, Tensor]:
        out = super().state_tensors()
        for cid, pair in enumerate(self.personal):
            out.update({f"personal.{cid}.{k}": v.clone() for k, v in pair.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(tensors)
        for cid, pair in enumerate(self.personal):
            missing = [k for k in pair if f"personal.{cid}.{k}" not in tensors]
            if missing:
                raise ValueError(f"pFedLoRU state lacks personal tensors of client {cid}")
            self.personal[cid] = {k: tensors[f"personal.{cid}.{k}"].clone() for k in pair}


def default_client_ranks(rank: int, clients: int) -> list[int]:
    """Client c gets rank (r, r//2, r//4)[c % 3] (at least 1): three capacity tiers."""
    tiers = [rank, max(1, rank // 2), max(1, rank // 4)]
    return [tiers[c % 3] for c in range(clients)]


class _NestedLayer(nn.Module):
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

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A_c, B_c) in the shapes of the layer's A and B."""
        A, B = self.layer.A, self.layer.B
        return (A + (self.PA @ self.QA).reshape(A.shape), B + (self.PB @ self.QB).reshape(B.shape))

    def forward(self, x: Tensor) -> Tensor:
        A_c, B_c = self.factors()
        return self.layer.forward_with(x, A_c, B_c)

    def num_floats(self) -> int:
        return sum(t.numel() for t in (self.PA, self.QA, self.PB, self.QB))


def _uniform_like(shape: tuple[int, int], fan_in: int, like: Tensor, gen: torch.Generator):
    u = torch.rand(shape, generator=gen, dtype=like.dtype)
    return ((2.0 * u - 1.0) / math.sqrt(fan_in)).to(like.device)


class MFedLoRU(FedLoRU):
    """mFedLoRU: clients of rank r_c ≤ r (heterogeneous capacity), two schemes.

    ``mfedloru_scheme = "hierarchical"`` (default, the paper's scheme): every client receives
    the global rank-r factors A, B and trains *nested* low-rank updates of them,
    A_c = A + P_A·Q_A and B_c = B + P_B·Q_B with inner rank r_c (:class:`_NestedLayer`; A, B,
    W0 frozen on the client). It sends P_A, Q_A, P_B, Q_B — r_c·(r + fan_in) + r_c·(out + r)
    floats per layer — and the non-factorized trainables; the server maps the reply back to
    rank r (A_c, B_c) and averages A and B separately with weights n_c, exactly as FedLoRA;
    merges as FedLoRU. The nested pairs are redrawn every round from the round generator.
    (The authors' public code, haemPark/fedloru_official, has no mFedLoRU; the nesting, the
    inits and the fresh draw per round are our choices, recorded in ``config.notes``.)

    ``mfedloru_scheme = "width"`` (width slicing): client c receives the leading r_c
    components, A[:r_c] (rows) and B[:, :r_c] (columns), and trains the rank-r_c model
    W0 + (α/r)·B[:, :r_c]·A[:r_c] (components r_c..r absent from its model). The server
    maps replies back coordinate-wise: component i becomes Σ_{c: r_c > i} n_c X_c[i] /
    Σ_{c: r_c > i} n_c and keeps its value when no sampled client holds it. Floats per client
    each way: Σ_layers r_c·(fan_in + out) + the non-factorized tensors.
    """

    name = "mfedloru"
    stateless_clients = False  # hierarchical replies report their size through self._sent

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        ranks = config.client_ranks or default_client_ranks(config.rank, config.clients)
        if len(ranks) != config.clients or not all(1 <= r <= config.rank for r in ranks):
            raise ValueError(
                f"client_ranks needs {config.clients} entries in [1, rank={config.rank}], got "
                f"{list(ranks)}; leave it unset for the default tiers r, r/2, r/4"
            )
        self.client_ranks = [int(r) for r in ranks]
        self.scheme = config.mfedloru_scheme
        self._workers: dict[int, nn.Module] = {}
        self._factor_keys = {f"{n}.{f}" for n in self.layer_names for f in ("A", "B")}
        self._sent: dict[int, int] = {}
        if self.scheme == "hierarchical":
            config.notes.setdefault(
                "nested_ranks",
                "hierarchical: client c trains A + PA QA, B + PB QB (inner rank r_c; QA ~ "
                "U(+-1/sqrt(fan_in)), QB ~ U(+-1/sqrt(r)), PA = PB = 0, redrawn every round from "
                "the round generator); sends PA, QA, PB, QB; server averages A_c, B_c like FedLoRA",
            )
        else:
            config.notes.setdefault(
                "nested_ranks",
                "width: client c trains A[:r_c], B[:, :r_c] at scale alpha/r (trailing "
                "components absent from its model); server averages each component over the "
                "clients holding it, weights n_c; components nobody holds keep their value",
            )
        config.notes.setdefault("client_ranks", ",".join(map(str, self.client_ranks)))

    # ---- hierarchical ----------------------------------------------------------------
    def _train_nested(
        self,
        message: dict[str, Tensor],
        client: ClientData,
        lr: float,
        gen: torch.Generator,
        held: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], LocalResult]:
        worker = copy.deepcopy(self.model)  # the client's copy, then the message on top
        if held is None:
            held = self._client_held(client.client_id)
        worker.load_state_dict(held, strict=False)
        worker.load_state_dict(message, strict=False)
        rc = self.client_ranks[client.client_id]
        nested = {}
        for name, layer in factorized_layers(worker).items():
            nested[name] = _NestedLayer(layer, rc, gen)
            set_submodule(worker, name, nested[name])
        for m in nested.values():
            for p in m.layer.parameters():  # A, B (and W0) stay fixed; the bias trains
                p.requires_grad_(p is m.layer.bias)
        params = [p for p in worker.parameters() if p.requires_grad]
        result = self._local(worker, params, client, lr, gen)
        state = worker.state_dict()
        reply = {}
        for key in message:
            owner, _, leaf = key.rpartition(".")
            if owner in nested and leaf in ("A", "B"):
                A_c, B_c = nested[owner].factors()
                reply[key] = (A_c if leaf == "A" else B_c).detach().clone()
            else:
                src = f"{owner}.layer.{leaf}" if owner in nested else key
                reply[key] = state[src].detach().clone()
        plain = count_floats({k: v for k, v in reply.items() if k not in self._factor_keys})
        self._sent[client.client_id] = plain + sum(m.num_floats() for m in nested.values())
        return reply, result

    def _client_effective(self, reply: dict[str, Tensor], client_id: int) -> dict[str, Tensor]:
        if self.scheme == "hierarchical":  # the reply holds rank-r factors A_c, B_c
            return super()._client_effective(reply, client_id)
        worker = copy.deepcopy(self._rank_worker(self.client_ranks[client_id]))
        worker.load_state_dict({**self._client_held(client_id), **reply}, strict=False)
        return densify(worker, self.template).state_dict()

    def _reply_floats(self, reply: dict[str, Tensor], client_id: int) -> int:
        if self.scheme == "hierarchical":
            return self._sent.pop(client_id)
        return super()._reply_floats(reply, client_id)

    # ---- width slicing ---------------------------------------------------------------
    def _rank_worker(self, rank: int) -> nn.Module:
        if rank not in self._workers:
            cfg = self.config
            self._workers[rank] = factorize(
                copy.deepcopy(self.template), self.layer_names, rank=rank,
                alpha=cfg.lora_alpha * rank / cfg.rank,
                generator=torch.Generator(),  # values are overwritten; keep the global RNG
            )  # fmt: skip
        return self._workers[rank]

    def _download(self, client_id: int) -> dict[str, Tensor]:
        if self.scheme == "hierarchical":
            return super()._download(client_id)
        rc = self.client_ranks[client_id]
        state = self.model.state_dict()
        out = {}
        for k in shared_keys(self.model):
            v = state[k]
            if k in self._factor_keys:
                v = v[:rc] if k.endswith(".A") else v[:, :rc]
            out[k] = v
        return out

    def _train_client(
        self,
        message: dict[str, Tensor],
        client: ClientData,
        lr: float,
        gen: torch.Generator,
        held: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], LocalResult]:
        if held is None:
            held = self._client_held(client.client_id)
        if self.scheme == "hierarchical":
            return self._train_nested(message, client, lr, gen, held)
        worker = self._rank_worker(self.client_ranks[client.client_id])
        worker.load_state_dict(held, strict=False)
        worker.load_state_dict(message, strict=False)
        trainable = [p for p in worker.parameters() if p.requires_grad]
        result = self._local(worker, trainable, client, lr, gen)
        state = worker.state_dict()
        return {k: state[k].detach().clone() for k in message}, result

    def _aggregate(self, replies: list[dict[str, Tensor]], clients: list[ClientData]) -> None:
        if self.scheme == "hierarchical":
            super()._aggregate(replies, clients)
            return
        sizes = [c.size for c in clients]
        plain = [{k: v for k, v in r.items() if k not in self._factor_keys} for r in replies]
        new = weighted_average(plain, sizes)
        state = self.model.state_dict()
        for key in self._factor_keys:
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
