"""FisherOperator: empirical and Monte-Carlo Fisher, F = (1/n) Σ_i g_i g_iᵀ per batch.

g_i = J_iᵀ r_i is the gradient of sample i's loss ℓ_i (r_i = ∂ℓ_i/∂f_i), so F is a GGN whose
output-space matrix is per sample r_i r_iᵀ / n: a product is J v, then per sample
r_i (r_i · (J v)_i) / n, then a vjp back. "empirical": r at the data's labels. "mc": at labels
drawn once, at construction, from the model's predictive distribution by the task's
:meth:`~hessrank.data.task.Task.draw_targets` (seeded; categorical over the classes for
classification, per token for next-token prediction's (n, T, V) logits, Gaussian for
regression: E F = G for each), so "mc" needs a task, not a plain loss function. The loss must
be a mean of per-sample losses (a sample of next-token prediction is a sequence).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> FisherOperator(model, nn.functional.cross_entropy, (x, y), kind="mc", seed=0).shape
    (1, 23, 23)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad
from torch.utils import _pytree as pytree

from hessrank.curvature.base import BatchLoss
from hessrank.curvature.data import Batches
from hessrank.curvature.ggn import GGNOperator

KINDS = ("empirical", "mc")


class FisherOperator(GGNOperator):
    """Empirical or Monte-Carlo Fisher of a model's mean loss over ``data``.

    Args:
        kind: "empirical" (data labels) or "mc" (labels drawn from the model, once).
        seed: seeds the "mc" draws (a CPU generator; batches drawn in order).
        draw_labels: False when ``data`` already holds drawn labels (an operator derived from
            an "mc" one keeps its labels).
        other arguments: :class:`~hessrank.curvature.base.CurvatureOperator`.
    """

    curvature = "fisher"

    def __init__(self, model, loss_fn, data, params=None, mode="eval", *,
                 kind: str = "empirical", seed: int = 0, draw_labels: bool = True,
                 **kwargs) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.seed = kind, int(seed)
        super().__init__(model, loss_fn, data, params, mode, **kwargs)
        self.route["kind"] = kind
        if kind == "mc" and draw_labels:
            self.batches = self._draw_labels()

    def _init_kwargs(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "draw_labels": False}

    def _draw_labels(self) -> Batches:
        """Targets drawn from the model at every batch, in order, from one CPU generator."""
        gen = torch.Generator().manual_seed(self.seed)
        s, ys = self.space, []
        with torch.no_grad(), self.context():
            for x, y in zip(self.batches.inputs, self.batches.targets):
                out = s.outputs(self.task, s.params, x).detach()
                ys.append(self.task.draw_targets(out, y, gen))
        return Batches(self.batches.inputs, tuple(ys))

    def _output_curvature(self, f: BatchLoss, out) -> Callable:
        q_leaves, spec = pytree.tree_flatten(grad(f.loss_of_outputs)(out))
        d, w = f.sample_dims, f.sample_weights
        inv = torch.where(w > 0, 1.0 / torch.where(w > 0, w, 1.0), 0.0)

        def M(u):
            u_leaves = pytree.tree_flatten(u)[0]
            s = sum((q * v).reshape(*q.shape[:d], -1).sum(-1) for q, v in zip(q_leaves, u_leaves))
            coef = s * inv
            return pytree.tree_unflatten(
                [q * coef.reshape(*coef.shape, *([1] * (q.ndim - d))) for q in q_leaves], spec)

        return M
