"""HessianOperator: H = ∇²L, products by Hessian-vector products.

Routes (``hvp=``): "rev-rev" keeps the ``torch.func.vjp`` closure of the gradient (H
symmetric: vᵀH = (Hv)ᵀ); "fwd-rev" is ``jvp`` of the gradient (primal recomputed per product,
never cached); "graph" keeps a double-backward autograd graph — ``torch.autograd.grad`` with
a graph of the gradient built once per batch, then ``torch.autograd.grad(g, θ, v,
retain_graph=True)`` per product (PyHessian's fastest path; nothing is written to ``.grad``),
a block of tangents in one call with ``is_grads_batched=True``.
"auto" follows the rule in :meth:`HessianOperator._choose_route`.

Example:
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> HessianOperator(model, nn.functional.cross_entropy, (x, y)).shape
    (1, 23, 23)
"""

from __future__ import annotations

import functools

import torch
from torch.func import grad, jvp, vjp, vmap

from hessrank.curvature.base import BatchLoss, Closure, CurvatureOperator

HVP_ROUTES = ("rev-rev", "fwd-rev", "graph")


class HessianOperator(CurvatureOperator):
    """The Hessian of a model's mean loss over ``data`` (see :class:`CurvatureOperator` for
    the arguments); ``hvp`` is "rev-rev", "fwd-rev", "graph" or "auto"."""

    curvature = "hessian"

    def __init__(self, model, loss_fn, data, params=None, mode="eval", *, hvp: str = "auto",
                 **kwargs) -> None:
        if hvp not in (*HVP_ROUTES, "auto"):
            raise ValueError(f"hvp must be one of {HVP_ROUTES + ('auto',)}, got {hvp!r}")
        self._hvp = hvp
        super().__init__(model, loss_fn, data, params, mode, **kwargs)

    def _init_kwargs(self) -> dict:
        return {"hvp": self.route["hvp"]}

    def _choose_route(self, cache, block) -> dict:
        """Rule: "fwd-rev" only when asked (it measured slower than rev-rev everywhere and
        cannot be kept); otherwise the base's cache and block rule, with the kept
        double-backward graph when products are cached (2–13 % faster per product than the
        ``vjp`` closure, and as fast for blocks, which it pushes in one batched backward;
        ``docs/performance.md``) and the ``vjp`` closure when nothing is kept."""
        if self._hvp == "fwd-rev" and cache is True:
            raise ValueError("cache=True keeps a reverse-over-reverse linearization; "
                             "use hvp='rev-rev', 'graph' or 'auto' with it, or cache=False")
        route = super()._choose_route(False if self._hvp == "fwd-rev" else cache, block)
        hvp = self._hvp
        if hvp == "auto":
            hvp = "graph" if route["cache"] else "rev-rev"
        route["hvp"] = hvp
        return route

    def _linearize(self, f: BatchLoss, params) -> Closure:
        hvp = self.route["hvp"] if f.sample_dims == 1 else "rev-rev"
        if hvp == "rev-rev":
            _, vjp_fn = vjp(grad(f.loss), params)
            return lambda v: vjp_fn(v)[0]
        if hvp == "fwd-rev":
            g = grad(f.loss)
            return lambda v: jvp(g, (params,), (v,))[1]
        names = list(params)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            loss = f.loss(dict(zip(names, leaves)))
            g = torch.autograd.grad(loss, leaves, create_graph=True)

        def product(v):
            hv = torch.autograd.grad(g, leaves, [v[n] for n in names], retain_graph=True)
            return dict(zip(names, hv))

        def batched(V):  # a block of k tangents {name: (k, *shape)} in one batched backward
            hv = torch.autograd.grad(g, leaves, [V[n] for n in names], retain_graph=True,
                                     is_grads_batched=True)
            return dict(zip(names, hv))

        product.batched = batched
        if self.route["block"] == "vmap":
            # small batches only (the vmap rule): blocks go through vmap over the vjp closure,
            # measured 8 % faster per vector than the batched double backward (client MLP,
            # k = 8), while single products stay on the graph (14 % faster); the closure is
            # built on the first block, so single products alone never pay for it
            @functools.cache
            def block_product():
                _, vjp_fn = vjp(grad(f.loss), params)
                return vmap(lambda v: vjp_fn(v)[0])

            product.batched = lambda V: block_product()(V)
        return product
