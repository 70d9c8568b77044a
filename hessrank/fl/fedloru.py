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

import torch
from torch import Tensor, nn

from hessrank.fl.base import ClientData
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import _load_strict, shared_keys, weighted_average
from hessrank.fl.fedlora import FedLoRA, init_generator
from hessrank.fl.layers import densify, factorize, factorized_layers
from hessrank.fl.local import LocalResult

__all__ = ["FedLoRU", "MFedLoRU", "PFedLoRU", "default_client_ranks"]


class FedLoRU(FedLoRA):
    """FedLoRA with a merge every ``config.merge_every`` rounds (0 disables merging) and
    optional training from scratch (``config.from_scratch``: W0 = 0, both factors random)."""

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

    def _from_scratch(self, config: TrainConfig) -> bool:
        return bool(config.from_scratch)

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
    client at setup). Local training alternates in two phases each round: first the personal
    pair (everything else frozen) for ``personal_steps`` steps (0: the same epochs/steps as the
    global phase), then the global pair A, B and the non-factorized trainables (personal pair
    frozen). Only the global tensors travel; the personal pair is never merged.
    """

    name = "pfedloru"

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
            "per layer (alpha_p/r_p) PB PA, PA random, PB = 0; local round = personal phase "
            "(personal_steps, 0: same schedule) then global phase; personal pair never sent, "
            "never merged; client_model(c) uses it",
        )

    def _worker_model(self) -> nn.Module:
        if self._worker is None:
            self._worker = copy.deepcopy(self._personal_template)
        return self._worker

    def _train_client(
        self, message: dict[str, Tensor], client: ClientData, lr: float, gen: torch.Generator
    ) -> tuple[dict[str, Tensor], LocalResult]:
        worker = self._worker_model()
        worker.load_state_dict(self._client_held(client.client_id), strict=False)
        worker.load_state_dict(message, strict=False)
        worker.load_state_dict(self.personal[client.client_id], strict=False)
        personal = {n for n in self.personal[client.client_id]}
        named = dict(worker.named_parameters())
        p_params = [named[n] for n in personal]
        g_params = [p for n, p in named.items() if p.requires_grad and n not in personal]
        steps = self.config.personal_steps or None
        first = self._local(worker, p_params, client, lr, gen, steps=steps)
        second = self._local(worker, g_params, client, lr, gen)
        state = worker.state_dict()
        self.personal[client.client_id] = {n: state[n].detach().clone() for n in personal}
        reply = {k: state[k].detach().clone() for k in message}
        seconds = first.seconds + second.seconds
        return reply, LocalResult(second.mean_loss, first.num_steps + second.num_steps, seconds)

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


class MFedLoRU(FedLoRU):
    """mFedLoRU: clients of rank r_c ≤ r train a *nested* truncation of the global factors.

    Nesting (our choice, recorded in ``config.notes``): client c receives the leading r_c
    components, A[:r_c] (rows) and B[:, :r_c] (columns), and trains the rank-r_c model
    W0 + (α/r)·B[:, :r_c]·A[:r_c] (the same scale α/r as the server, so a component means the
    same everywhere; components r_c..r are absent from its model). It replies with its
    (A_c, B_c). The server maps replies back to rank r coordinate-wise: component i of A (row)
    and B (column) becomes Σ_{c: r_c > i} n_c X_c[i] / Σ_{c: r_c > i} n_c, and keeps its
    current value when no sampled client holds it. Everything else is averaged as in FedAvg.
    Floats per client each way: Σ_layers r_c·(fan_in + out) + the non-factorized tensors.
    """

    name = "mfedloru"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        ranks = config.client_ranks or default_client_ranks(config.rank, config.clients)
        if len(ranks) != config.clients or not all(1 <= r <= config.rank for r in ranks):
            raise ValueError(
                f"client_ranks needs {config.clients} entries in [1, rank={config.rank}], got "
                f"{list(ranks)}; leave it unset for the default tiers r, r/2, r/4"
            )
        self.client_ranks = [int(r) for r in ranks]
        self._workers: dict[int, nn.Module] = {}
        self._factor_keys = {f"{n}.{f}" for n in self.layer_names for f in ("A", "B")}
        config.notes.setdefault(
            "nested_ranks",
            "client c trains A[:r_c], B[:, :r_c] at scale alpha/r (trailing components absent "
            "from its model); server averages each component over the clients holding it, "
            "weights n_c; components nobody holds keep their value",
        )
        config.notes.setdefault("client_ranks", ",".join(map(str, self.client_ranks)))

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
        self, message: dict[str, Tensor], client: ClientData, lr: float, gen: torch.Generator
    ) -> tuple[dict[str, Tensor], LocalResult]:
        worker = self._rank_worker(self.client_ranks[client.client_id])
        worker.load_state_dict(self._client_held(client.client_id), strict=False)
        worker.load_state_dict(message, strict=False)
        trainable = [p for p in worker.parameters() if p.requires_grad]
        result = self._local(worker, trainable, client, lr, gen)
        state = worker.state_dict()
        return {k: state[k].detach().clone() for k in message}, result

    def _aggregate(self, replies: list[dict[str, Tensor]], clients: list[ClientData]) -> None:
        sizes = [c.size for c in clients]
        plain = [{k: v for k, v in r.items() if k not in self._factor_keys} for r in replies]
        new = weighted_average(plain, sizes)
        state = self.model.state_dict()
        for key in self._factor_keys:
            current = state[key]
            dim = 0 if key.endswith(".A") else 1
            acc = torch.zeros_like(current)
            weight = torch.zeros(current.shape[dim], dtype=current.dtype)
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
