"""GGNOperator: the generalized Gauss-Newton matrix G = Jᵀ H_out J (Schraudolph 2002).

With outputs f(θ) of the batch and the loss ℓ(f) as a function of them, H = Jᵀ (∂²ℓ/∂f²) J
+ Σ_o (∂ℓ/∂f_o) ∇²f_o; the GGN keeps the first term: J the Jacobian of the outputs in θ and
H_out the Hessian of the loss in the outputs (positive semi-definite for convex losses such as
cross-entropy and squared error). A product is a jvp through the model (J v), the output-space
matrix (H_out u by forward-over-reverse in the outputs) and a vjp back (Jᵀ w) whose closure
is kept per batch. H − G, the residual term, is ``LinearCombination([h, g], [1, -1])``
(:mod:`hessrank.linalg.stack`).

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> GGNOperator(model, nn.functional.cross_entropy, (x, y)).shape
    (1, 23, 23)
"""

from __future__ import annotations

from collections.abc import Callable

from torch.func import grad, jvp, vjp
from torch.utils import _pytree as pytree

from hessrank.curvature.base import BatchLoss, Closure, CurvatureOperator


class GGNOperator(CurvatureOperator):
    """Jᵀ H_out J of a model's mean loss over ``data`` (arguments: :class:`CurvatureOperator`)."""

    curvature = "ggn"

    def _output_curvature(self, f: BatchLoss, out) -> Callable:
        """u ↦ (∂²ℓ/∂f²) u at the outputs ``out`` (subclasses swap in another PSD matrix)."""
        g = grad(f.loss_of_outputs)
        return lambda u: jvp(g, (out,), (u,))[1]

    def _linearize(self, f: BatchLoss, params) -> Closure:
        out, vjp_fn = vjp(f.outputs, params)
        out = pytree.tree_map(lambda t: t.detach(), out)
        M = self._output_curvature(f, out)

        def product(v):
            _, Jv = jvp(f.outputs, (params,), (v,))
            return vjp_fn(M(Jv))[0]

        return product
