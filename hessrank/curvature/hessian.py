"""HessianOperator: H = ∇²L, products by Hessian-vector products.

Routes (``hvp=``): "rev-rev" keeps the ``torch.func.vjp`` closure of the gradient (H
symmetric: vᵀH = (Hv)ᵀ); "fwd-rev" is ``jvp`` of the gradient (primal recomputed per product,
never cached); "graph" keeps a double-backward autograd graph — ``torch.autograd.grad`` with
a graph of the gradient built once per batch, then ``torch.autograd.grad(g, θ, v,
retain_graph=True)`` per product (PyHessian's fastest path; nothing is written to ``.grad``),
the graph built under :class:`~hessrank.curvature.kinks.FirstOrderKinks` (ReLU and max pooling
without the zero terms of their double backward). "auto" follows
:func:`~hessrank.curvature.routes.plan_route`: the kept graph when products are cached, the
``vjp`` closure when nothing is kept. A block of k tangents on the "graph" route is a loop of
single products, or (``block="vmap"``, small batches) ``vmap`` over a ``vjp`` closure built on
the first block.

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
from hessrank.curvature.kinks import FirstOrderKinks
from hessrank.curvature.routes import RouteRequest


class HessianOperator(CurvatureOperator):
    """The Hessian of a model's mean loss over ``data`` (see :class:`CurvatureOperator` for
    the arguments); ``hvp`` is "rev-rev", "fwd-rev", "graph" or "auto"."""

    curvature = "hessian"

    def __init__(self, model, loss_fn, data, params=None, mode="eval", *, hvp: str = "auto",
                 **kwargs) -> None:
        self._hvp = hvp
        super().__init__(model, loss_fn, data, params, mode, **kwargs)

    def _route_request(self, **kw) -> RouteRequest:
        return RouteRequest(hvp=self._hvp, **kw)

    def _init_kwargs(self) -> dict:
        return {"hvp": self.route["hvp"]}

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
            with FirstOrderKinks():
                loss = f.loss(dict(zip(names, leaves)))
            g = torch.autograd.grad(loss, leaves, create_graph=True)

        def product(v):
            hv = torch.autograd.grad(g, leaves, [v[n] for n in names], retain_graph=True)
            return dict(zip(names, hv))

        if self.route["block"] == "vmap":
            # small batches only (the vmap rule): blocks go through vmap over the vjp closure
            # (faster per vector than a loop there), single products stay on the graph; the
            # closure is built on the first block, so single products alone never pay for it
            @functools.cache
            def block_product():
                _, vjp_fn = vjp(grad(f.loss), params)
                return vmap(lambda v: vjp_fn(v)[0])

            product.batched = lambda V: block_product()(V)
        return product
