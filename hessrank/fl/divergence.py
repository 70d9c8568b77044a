"""Divergence caught before overflow: a loss ratio and a weight bound checked every round.

A run diverges long before a float overflows: on heterogeneous least squares at lr 0.3 with
25 local steps, FeDLRT's corrected variants reach a training loss of 1e27–1e31 in float32
after 50 rounds, every value still finite (docs/deviations.md has the command). So besides
the finiteness checks of :mod:`hessrank.fl.protocol`, a run stops when

- a client's local loss (its reply's ``loss`` metric: the mean mini-batch loss of its local
  steps, or FeDLRT's loss at the global point) or the training loss of the global model
  exceeds ``divergence_factor`` × L₀, with L₀ the training loss at round 0; or
- a weight a client sends in the round's model phase, or one the server holds after the
  round, exceeds ``weight_bound`` in magnitude.

Either check is off at 0 (and the loss check when L₀ ≤ 0). They read, never change, the
round: a run that does not trip them has the same weights as without them. The runner stops
on :class:`DivergedError`, keeps the last good checkpoint and names round and client in one
line (:mod:`hessrank.fl.runner`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from hessrank.fl.loop import RoundObserver
from hessrank.fl.protocol import ClientReply, ClientTask, NonFiniteError, Strategy

if TYPE_CHECKING:
    from hessrank.fl.config import TrainConfig

__all__ = ["DivergedError", "DivergenceGuard", "largest_weight"]


class DivergedError(NonFiniteError):
    """Training diverged while every value was still finite (a loss or weight too large)."""


def largest_weight(tensors: Mapping[str, Tensor]) -> tuple[str, float] | None:
    """(key, max |entry|) of the floating-point tensor with the largest entry; None if none."""
    best: tuple[str, float] | None = None
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            value = float(t.detach().abs().max())
            if best is None or value > best[1]:
                best = (key, value)
    return best


class DivergenceGuard(RoundObserver):
    """The checks of the module docstring for one run.

    Args:
        initial_loss: L₀, the training loss of the model at round 0.
        factor: ``divergence_factor`` (0: no loss check).
        weight_bound: ``weight_bound`` (0: no weight check).
    """

    def __init__(self, initial_loss: float | None, factor: float, weight_bound: float) -> None:
        usable = initial_loss is not None and math.isfinite(initial_loss) and initial_loss > 0
        self.initial_loss = float(initial_loss) if usable else None
        self.factor = float(factor)
        self.loss_limit = self.factor * self.initial_loss if usable and factor > 0 else None
        self.weight_bound = float(weight_bound) if weight_bound > 0 else None
        self._phase = ""
        self._worst: tuple[float, int] | None = None  # (largest local loss, client) this round

    @classmethod
    def from_config(cls, config: TrainConfig, initial_loss: float | None) -> DivergenceGuard:
        return cls(initial_loss, config.divergence_factor, config.weight_bound)

    def _loss_text(self, value: float) -> str:
        return (f"{value:.3g} exceeds divergence_factor {self.factor:g} x the initial training "
                f"loss {self.initial_loss:.4g}")  # fmt: skip

    def _worst_text(self) -> str:
        if self._worst is None:
            return ""
        return f" (largest local loss this round: {self._worst[0]:.3g}, client {self._worst[1]})"

    def check_loss(self, value: float | None, who: str, client_id: int | None = None) -> None:
        """Raise :class:`DivergedError` if ``value`` exceeds the loss limit; a check of the
        aggregated model (``client_id`` None) names the client with the round's largest
        local loss."""
        if self.loss_limit is not None and value is not None and value > self.loss_limit:
            where = self._worst_text() if client_id is None else ""
            raise DivergedError(f"{who} {self._loss_text(value)}{where}", client_id=client_id)

    def check_weights(
        self, tensors: Mapping[str, Tensor], who: str, client_id: int | None = None
    ) -> None:
        """Raise :class:`DivergedError` if an entry of ``tensors`` exceeds the weight bound."""
        if self.weight_bound is None:
            return
        largest = largest_weight(tensors)
        if largest is not None and largest[1] > self.weight_bound:
            where = self._worst_text() if client_id is None else ""
            raise DivergedError(
                f"{who} holds |{largest[0]}| = {largest[1]:.3g} > weight_bound "
                f"{self.weight_bound:g}{where}", client_id=client_id,
            )  # fmt: skip

    # ---- as a round observer -----------------------------------------------------------------
    def round_started(self, round_idx: int, strategy: Strategy) -> None:
        self._phase = strategy.phases[-1]
        self._worst = None

    def replied(self, task: ClientTask, reply: ClientReply, strategy: Strategy) -> None:
        cid = task.client_id
        if "loss" in reply.metrics:
            loss = float(reply.metrics["loss"])
            if self._worst is None or loss > self._worst[0]:
                self._worst = (loss, cid)
            self.check_loss(loss, f"client {cid}'s local loss", cid)
        if task.phase == self._phase:
            self.check_weights(reply.tensors, f"client {cid}'s reply", cid)

