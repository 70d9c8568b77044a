"""FisherOperator: empirical and Monte-Carlo Fisher, F = (1/n) Σ_i g_i g_iᵀ per batch.

g_i = J_iᵀ r_i is the gradient of sample i's loss ℓ_i (r_i = ∂ℓ_i/∂f_i), so F is a GGN whose
output-space matrix is per sample r_i r_iᵀ / n: a product is J v, then per sample
r_i (r_i · (J v)_i) / n, then a vjp back. "empirical": r at the data's labels. "mc": at labels
drawn once, at construction, from the model's predictive distribution (seeded; categorical
over dim 1 of the logits for integer targets, E F = G for cross-entropy; Gaussian for float
targets with the variance 1/(2c) that makes E F = G for a squared error c‖f − y‖²). The loss
must be a mean of per-sample losses (cross-entropy, MSE with reduction="mean").

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> FisherOperator(model, nn.functional.cross_entropy, (x, y), kind="mc", seed=0).shape
    (1, 23, 23)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad
from torch.utils import _pytree as pytree

from hessrank.curvature.base import BatchLoss
from hessrank.curvature.data import Batches
from hessrank.curvature.ggn import GGNOperator

KINDS = ("empirical", "mc")


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"kind='mc' needs tensor outputs (or .logits), got {type(out).__name__}")


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
        gen = torch.Generator().manual_seed(self.seed)
        s, ys = self.space, []
        with torch.no_grad(), s.mode_context():
            for x, y in zip(self.batches.inputs, self.batches.targets):
                out = _logits(s.forward(s.params, x)).detach()
                if not torch.is_floating_point(y):
                    logits = out.movedim(1, -1)
                    probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
                    draw = torch.multinomial(probs.cpu(), 1, generator=gen)
                    ys.append(draw.reshape(logits.shape[:-1]).to(y.dtype).to(y.device))
                else:
                    bump = out[:1].clone()
                    bump.view(-1)[0] += 1.0
                    c = float(self.loss_fn(out[:1], bump))  # c‖f − y‖² at ‖f − y‖ = 1
                    eps = torch.randn(out.shape, generator=gen, dtype=torch.float64)
                    ys.append(out + (eps / (2 * c) ** 0.5).to(out.dtype).to(out.device))
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
