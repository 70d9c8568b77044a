"""SCAFFOLD: local SGD corrected by control variates (Karimireddy et al., 2020; option II).

Server state: the model x and the control variate c (one tensor per trainable parameter,
c = 0 at the start); client i's state: its control variate c_i (0 before its first round,
kept by the runtime between rounds). One round with sampled clients S of N:

    server → client i: x, c
    client i:          y ← x;  K times: y ← y − η_l (g_i(y) − c_i + c)       (local SGD, batches
                       as FedAvg's; g_i includes weight decay)
                       c_i⁺ = c_i − c + (x − y) / (K η_l)                      (option II)
    client → server:   y and Δc_i = c_i⁺ − c_i;  c_i ← c_i⁺ (kept on the client)
    server:            x ← x + η_g (1/|S|) Σ_{i∈S} (y_i − x)
                       c ← c + (1/N) Σ_{i∈S} Δc_i                               (= c + (|S|/N) mean)

The averages are uniform over S, as in the paper (FedAvg weighs by n_c); η_g =
``config.server_lr``. Float buffers follow the x rule; integer buffers come from the first
sampled client. The client sends y (the same number of floats as Δy = y − x). Floats per
client and direction: |x| + |c| (|θ| + trainables). Plain SGD only (momentum 0): option II
estimates the mean corrected gradient from the distance travelled.

With one client (N = |S| = 1, η_g = 1) c and c_i stay equal, the correction vanishes and
R rounds of K full-batch steps are R·K steps of centralized gradient descent
(``tests/fl/test_scaffold.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hessrank.fl.config import TrainConfig
from hessrank.fl.fedavg import FedAvg, LocalSGD, load_strict, reply_metrics
from hessrank.fl.local import local_sgd
from hessrank.fl.protocol import ClientData, ClientReply, ClientState, ClientTask

__all__ = ["Scaffold", "ScaffoldClient"]

_C, _DC, _STATE = "c.", "dc.", "scaffold.c."


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Scaffold(FedAvg):
    """SCAFFOLD's server: x and c (module docstring)."""

    name = "scaffold"

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        if config.momentum != 0.0:
            raise ValueError(
                f"SCAFFOLD (option II) takes plain SGD steps; set momentum=0 (got "
                f"{config.momentum})"
            )
        super().__init__(model, config)
        self.c = {n: torch.zeros_like(p.detach()) for n, p in _trainable(model).items()}

    def notes(self) -> dict[str, str]:
        return {
            "scaffold": "option II control variates; x <- x + server_lr * mean_S(y_i - x), "
            "c <- c + sum_S(dc_i)/N, uniform over the sampled clients; c_i = 0 before a "
            "client's first round; batches as FedAvg",
        }

    def download(self, client_id: int) -> dict[str, Tensor]:
        return {**super().download(client_id), **{_C + k: v for k, v in self.c.items()}}

    def full_reply(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        return reply.tensors

    def average(self, replies: list[dict[str, Tensor]], sizes: list[int]) -> None:
        x = self.model.state_dict()
        m, eta = len(replies), float(self.config.server_lr)
        new = {}
        for key in x:
            if key not in replies[0]:  # frozen tensors stay
                continue
            if not x[key].is_floating_point():
                new[key] = replies[0][key].clone()
                continue
            step = torch.zeros_like(x[key])
            for reply in replies:
                step.add_(reply[key] - x[key])
            new[key] = x[key] + eta * step.div_(m)
        for key, c in self.c.items():
            total = torch.zeros_like(c)
            for reply in replies:
                total.add_(reply[_DC + key])
            self.c[key] = c + total.div_(self.config.clients)
        self.model.load_state_dict(new, strict=False)

    def client_effective(self, task: ClientTask, reply: ClientReply) -> dict[str, Tensor]:
        state = dict(task.held)
        state.update({k: v for k, v in reply.tensors.items() if not k.startswith(_DC)})
        return {k: v.detach().clone() for k, v in state.items()}

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), **{_STATE + k: v.clone() for k, v in self.c.items()}}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        model = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
        load_strict(self.model, model, "model")
        missing = [k for k in self.c if _STATE + k not in tensors]
        if missing:
            raise ValueError(f"SCAFFOLD state lacks the control variate of {missing[:3]}")
        self.c = {k: tensors[_STATE + k].clone() for k in self.c}


class ScaffoldClient(LocalSGD):
    """SCAFFOLD's client: corrected local SGD, option II update of c_i (module docstring)."""

    def __call__(
        self, task: ClientTask, data: ClientData, state: ClientState, rng: torch.Generator
    ) -> tuple[ClientReply, ClientState]:
        worker, cfg = self.worker, self.config
        model_keys = [k for k in task.message if not k.startswith(_C)]
        worker.load_state_dict(task.held, strict=False)
        worker.load_state_dict({k: task.message[k] for k in model_keys}, strict=False)
        named = _trainable(worker)
        params = list(named.values())
        c = [task.message[_C + n] for n in named]
        c_i = [state[n] if n in state else torch.zeros_like(p.detach()) for n, p in named.items()]
        x = [p.detach().clone() for p in params]
        result = local_sgd(
            worker, params, data, self.task, lr=task.lr, batch_size=cfg.batch_size,
            epochs=cfg.local_epochs, steps=cfg.local_steps, momentum=0.0,
            weight_decay=cfg.weight_decay, generator=rng,
            correction=[cg - ci for cg, ci in zip(c, c_i)], max_grad_norm=cfg.max_grad_norm,
        )  # fmt: skip
        scale = 1.0 / (result.num_steps * task.lr)
        new_c = [ci - cg + (x0 - p.detach()) * scale for ci, cg, x0, p in zip(c_i, c, x, params)]
        out = worker.state_dict()
        reply = {k: out[k].detach().clone() for k in model_keys}
        reply.update({_DC + n: nc - ci for n, nc, ci in zip(named, new_c, c_i)})
        return ClientReply(reply, reply_metrics(result)), dict(zip(named, new_c))
