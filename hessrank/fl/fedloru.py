"""FedLoRU and its personalized variant pFedLoRU (Park et al., 2024, "Communication-efficient
federated low-rank update"); the heterogeneous-rank variant is :mod:`hessrank.fl.mfedloru`.

FedLoRU is :class:`~hessrank.fl.fedlora.FedLoRA` plus accumulation: after the aggregation of
every round t with t % τ == 0 (τ = ``config.merge_every``), every factorized layer does
W0 ← W0 + (α/r)·B·A, then A is redrawn and B = 0 (function unchanged), so the sum of many
rank-r updates can reach high rank while only rank-r factors travel. That is the paper's
description (ReLoRA's merge, ``merge_mode = "reinit"``, the default). The authors' public code
(haemPark/fedloru_official, the ``merge()`` its README command uses) adds B·A into W0 and keeps
A and B (``merge_mode = "accumulate"``): the function changes at the merge (the pair then
counts twice) and no draw is made. docs/deviations.md lists every such difference.

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

from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import reply_metrics
from hessrank.fl.fedlora import FedLoRA, LoRALocalSGD, init_generator
from hessrank.fl.layers import densify, factorized_layers
from hessrank.fl.local import LocalResult
from hessrank.fl.protocol import ClientData, ClientReply, ClientState, ClientTask

__all__ = ["FedLoRU", "MergeLedger", "PFedLoRU", "PersonalClient"]


class MergeLedger:
    """FedLoRU's merge schedule and its bookkeeping, for a server strategy (mixed in before
    it): a merge after the aggregation of every round t with t % τ == 0 (τ =
    ``config.merge_every``), the merges each client has applied, the catch-up download of a
    client that missed m merges (per layer min(m·r·(fan_in + out), out·fan_in) floats) and
    the ledger in the checkpoint. A subclass says how a merge is done (:meth:`merge`) and
    what a layer's pair costs (:meth:`merge_shapes`)."""

    config: TrainConfig

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self.num_merges = 0
        self.synced = [0] * config.clients  # merges each client has applied

    def merge(self, rng: torch.Generator) -> None:
        """Merge every pair into its base weights (drawing from ``rng``)."""
        raise NotImplementedError

    def merge_shapes(self) -> list[tuple[int, int, int]]:
        """(r, fan_in, out) of every merged pair."""
        raise NotImplementedError

    def sync_floats(self, client_id: int) -> int:
        missed = self.num_merges - self.synced[client_id]
        self.synced[client_id] = self.num_merges
        if missed <= 0:
            return 0
        return sum(min(missed * r * (fan_in + out), fan_in * out)
                   for r, fan_in, out in self.merge_shapes())  # fmt: skip

    def server_step(self, round_idx: int, rng: torch.Generator) -> dict[str, float]:
        tau = self.config.merge_every
        if tau > 0 and round_idx % tau == 0:
            self.merge(rng)
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
        super().load_state_tensors(tensors)


class FedLoRU(MergeLedger, FedLoRA):
    """FedLoRA with a merge every ``config.merge_every`` rounds (0 disables merging).

    Training from scratch (W0 = 0, both factors random) is the default, as in the paper and
    the authors' code; ``from_scratch=False`` starts from the dense init with B = 0."""

    name = "fedloru"

    def notes(self) -> dict[str, str]:
        return {
            **super().notes(),
            "merge": "after aggregation of rounds t with t % merge_every == 0: W0 += (alpha/r) "
            + ("B A, A redrawn from the round generator, B = 0" if self.config.merge_mode ==
               "reinit" else "B A, A and B kept (the authors' merge(); the layer then counts "
               "the pair twice)"),
            "merge_communication": "a sampled client that missed m merges downloads "
            "min(m r (fan_in+out), out fan_in) floats per layer before the round's message",
        }

    def merge_shapes(self) -> list[tuple[int, int, int]]:
        return [(layer.rank, layer.fan_in, layer.out_dim)
                for layer in factorized_layers(self.model).values()]  # fmt: skip

    def merge(self, rng: torch.Generator) -> None:
        reinit = self.config.merge_mode == "reinit"
        for layer in factorized_layers(self.model).values():
            layer.merge_(rng, reinit=reinit)


def _personal_model(factorized: nn.Module, config: TrainConfig) -> nn.Module:
    """A copy of ``factorized`` with a personal pair in every factorized layer (the values
    are placeholders, drawn from a private generator: the caller loads a client's pair)."""
    model = copy.deepcopy(factorized)
    scratch = torch.Generator()  # never the global RNG
    for layer in factorized_layers(model).values():
        layer.add_personal_(config.personal_rank, config.personal_alpha, scratch)
    return model


class PFedLoRU(FedLoRU):
    """pFedLoRU's server: FedLoRU's, plus each client's model for evaluation.

    Names as in the authors' rebuttal: the globally shared pair is (L, U), the local one
    (A, B). Client c's layer is W_c = W0 + (α/r)·U·L + (α_p/r_p)·B_c·A_c: the shared pair is
    the layer's FedLoRU factors (tensors ``A`` = L, (r, fan_in), and ``B`` = U, (out, r),
    as in every LoRA-family checkpoint), the local pair A_c (r_p, fan_in), B_c (out, r_p) is
    stored as ``PA``/``PB`` in the client's state (:class:`PersonalClient`), never sent and
    never merged. (Before issue 23 these docs named the pairs the other way round; the
    arithmetic is unchanged.) Only the shared tensors travel, so server, aggregation and
    communication are FedLoRU's.
    """

    name = "pfedloru"
    personalized = True

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        super().__init__(model, config)
        self._personal_template = _personal_model(self.model, config)

    def notes(self) -> dict[str, str]:
        cfg = self.config
        return {
            **super().notes(),
            "personal": "pairs named as in the rebuttal: shared (L, U) = the layers' A, B "
            "tensors, local (A_c, B_c) = PA, PB in the client state; per layer (alpha_p/r_p) "
            "PB PA, PA random, PB = 0; local round = "
            f"{cfg.personal_order} (LU phase on the local schedule, AB phase "
            "personal_steps steps, 0: half the LU steps when LU-first, the same "
            "schedule when AB-first); local pair never sent, never merged; "
            "client_model(c) uses it",
        }

    def client_model(self, client_id: int, state: ClientState) -> nn.Module:
        """Client ``client_id``'s dense model W0 + (α/r)·U·L + (α_p/r_p)·B_c·A_c."""
        if not state:
            raise ValueError(f"client {client_id} has no personal pair in the client states")
        model = copy.deepcopy(self._personal_template)
        model.load_state_dict(self.model.state_dict(), strict=False)
        model.load_state_dict(state, strict=False)
        return densify(model, self.template)


class PersonalClient(LoRALocalSGD):
    """pFedLoRU's client: two local phases per round, on the shared pair L, U and on its own
    local pair A_c, B_c (the rebuttal's names, :class:`PFedLoRU`).

    Default (``personal_order = "LU-first"``, the order of the authors' rebuttal): first
    the shared pair L, U and the non-factorized trainables (local pair frozen) on the
    configured schedule (``local_epochs`` / ``local_steps``), then the local pair alone
    for ``personal_steps`` steps — 0 means half as many steps as the LU phase took (at
    least 1): "more epochs on the global pair", our reading, recorded in the notes.
    ``personal_order = "AB-first"`` is the reverse (personal_steps 0: the same schedule
    as the LU phase). State: the local pair (init: A_c random like L, B_c = 0, one
    draw per client at setup, :meth:`initial_states`). The old names of the orders,
    ``global-first`` / ``personal-first``, are accepted with a deprecation warning.
    """

    def build_worker(self, model: nn.Module) -> nn.Module:
        return _personal_model(super().build_worker(model), self.config)

    def initial_states(self, num_clients: int) -> dict[int, ClientState]:
        cfg = self.config
        gen = init_generator(cfg, 1)
        template = copy.deepcopy(self.worker)
        states = {}
        for cid in range(num_clients):  # one fresh draw per client, in client order
            pair: ClientState = {}
            for name, layer in factorized_layers(template).items():
                layer.add_personal_(cfg.personal_rank, cfg.personal_alpha, gen)
                pair[f"{name}.PA"] = layer.PA.detach().clone()
                pair[f"{name}.PB"] = layer.PB.detach().clone()
            states[cid] = pair
        return states

    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        if not state:
            raise ValueError(f"client {task.client_id} has no personal pair in its state")
        worker, cfg = self.worker, self.config
        worker.load_state_dict(task.held, strict=False)
        worker.load_state_dict(task.message, strict=False)
        worker.load_state_dict(state, strict=False)
        named = dict(worker.named_parameters())
        p_params = [named[n] for n in state]
        g_params = [p for n, p in named.items() if p.requires_grad and n not in state]
        if cfg.personal_order == "AB-first":
            p_res = self.local(worker, p_params, data, task.lr, rng,
                               steps=cfg.personal_steps or None)  # fmt: skip
            g_res = self.local(worker, g_params, data, task.lr, rng)
        else:
            g_res = self.local(worker, g_params, data, task.lr, rng)
            steps = cfg.personal_steps or max(1, g_res.num_steps // 2)
            p_res = self.local(worker, p_params, data, task.lr, rng, steps=steps)
        out = worker.state_dict()
        reply = {k: out[k].detach().clone() for k in task.message}
        result = LocalResult(g_res.mean_loss, p_res.num_steps + g_res.num_steps,
                             p_res.seconds + g_res.seconds)  # fmt: skip
        return ClientReply(reply, reply_metrics(result)), {
            n: out[n].detach().clone() for n in state
        }
