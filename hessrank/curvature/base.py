"""CurvatureOperator: the shared base of every curvature matrix of a model's mean loss.

For θ ∈ R^p (the selected parameters, :class:`~hessrank.curvature.params.ParameterSpace`) and
batches b = 1..B of sizes n_b (N = Σ n_b), the loss is L(θ) = Σ_b (n_b/N) L_b(θ), L_b the
batch-mean ``loss_fn``. A curvature matrix of L is the same size-weighted sum of per-batch
matrices, C = Σ_b (n_b/N) C_b, so unequal batches give the same operator as one big batch.

The base owns the batches, the loop over them, the block of k tangents (a loop or ``vmap``),
the per-batch linearizations it may keep, the finiteness and determinism checks and the
operator protocol (``shape == (1, p, p)``, ``matmat``, ``to_scipy``). It *executes* a
**route** — how products are computed — planned by :func:`hessrank.curvature.routes.plan_route`
from shapes and memory alone (never by timing) and recorded in ``op.route``. A subclass
supplies one hook, :meth:`_linearize`: given a batch's loss split at the model outputs
(:class:`BatchLoss`), return v ↦ C_b v.

The loss is a :class:`~hessrank.data.task.Task` (a plain ``loss_fn`` is wrapped by
``as_task``): it feeds the model (tensor, tuple or dict inputs; ``.logits`` of Hugging Face
style outputs) and refuses a model that computes its own loss from labels in its inputs.

The same hook serves a stack of equal-size *units* with their own parameter copies θ_u
(:meth:`unit_linearization`): the loss Σ_u L_u(θ_u) has a block-diagonal curvature, so one
call returns every C_u v_u (the federated operator's batched strategy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import vmap
from torch.utils import _pytree as pytree

from hessrank.curvature.data import Batches, as_batches
from hessrank.curvature.params import LossFn, OnParameterSpace, ParameterSpace
from hessrank.curvature.routes import RouteRequest, Workload, plan_route
from hessrank.curvature.stacked import couples_samples
from hessrank.data.inputs import slice_inputs
from hessrank.data.task import Task, as_task

Closure = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class BatchLoss:
    """One batch's loss as a function of θ, split at the model outputs.

    outputs(θ) → model outputs; loss_of_outputs(out) → scalar, so loss = loss_of_outputs ∘
    outputs. ``sample_dims`` leading dimensions of every output index samples (1 for a batch
    (n, ...), 2 for a stack of units (U, m, ...)); ``sample_weights`` (same leading shape) is
    ∂L/∂ℓ_i, the weight of sample i's loss in the batch loss (1/n for a batch mean; 0 for
    padding). ``targets`` are the labels the loss sees.
    """

    outputs: Callable
    loss_of_outputs: Callable
    sample_dims: int
    sample_weights: Tensor
    targets: Tensor

    def loss(self, params: dict[str, Tensor]) -> Tensor:
        return self.loss_of_outputs(self.outputs(params))


def all_reduce_sum(t: Tensor, process_group=None) -> Tensor:
    """Σ over the ranks of ``process_group`` (True: the default group), in place; ``t`` itself
    when ``process_group`` is None (one process)."""
    if process_group is None:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=None if process_group is True else
                    process_group)
    return t


def check_finite_product(out: Tensor, curvature: str) -> None:
    """Raise FloatingPointError when a product has NaN/inf entries (one reduction first: a
    NaN/inf entry always makes the sum non-finite, so the full check runs only then)."""
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
        raise FloatingPointError(
            f"a {curvature} product has NaN/inf entries; the loss is not twice "
            "differentiable at these weights or overflows in this dtype")


def check_no_labels_in_inputs(batches: Batches) -> None:
    """Refuse inputs that carry the labels (Hugging Face style ``labels=``): such a model
    computes its own loss, whose curvature in the outputs is not the task's (its GGN would be
    silently zero)."""
    x = batches.inputs[0]
    if isinstance(x, dict) and "labels" in x:
        raise ValueError(
            "the inputs carry 'labels', so the model would compute its own loss; pass the "
            "labels as the targets of (inputs, targets) instead, and the task's loss is used")


class OperatorOnSpace(OnParameterSpace):
    """The protocol part of an operator C of one loss on a :class:`ParameterSpace`, built on
    its ``apply_rows`` ((k, p) rows → (k, p) rows of C v): shape (1, p, p), blocks, vectors,
    the scipy view, and where products run (the space's mode and the route's attention
    kernel). Shared by the exact curvatures and K-FAC."""

    route: dict
    total_samples: int

    def apply_rows(self, R: Tensor, reduce: bool = True) -> Tensor:
        raise NotImplementedError

    def context(self):
        """Where products run: the parameter space's mode and, for a model with
        scaled-dot-product attention, the route's attention kernel."""
        return self.space.product_context(self.route.get("attention"))

    @property
    def shape(self) -> tuple[int, int, int]:
        p = self.space.dim
        return (1, p, p)

    @property
    def num_samples(self) -> int:
        """N, over all ranks when distributed."""
        return self.total_samples

    def matmat(self, V: Tensor) -> Tensor:
        """C V for V of shape (1, p, k), (p, k) or (p,); returns the same shape."""
        p, nd = self.space.dim, V.ndim
        W = V[None, :, None] if nd == 1 else V[None] if nd == 2 else V
        if W.ndim != 3 or W.shape[0] != 1 or W.shape[1] != p:
            raise ValueError(f"expected V of shape (1, {p}, k), got {tuple(V.shape)}")
        out = self.apply_block(W[0])
        return out[:, 0] if nd == 1 else out if nd == 2 else out[None]

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v)

    def apply_block(self, V: Tensor) -> Tensor:
        """C V for a (p, k) block (one pass over the data for the exact curvatures)."""
        if V.ndim != 2 or V.shape[0] != self.space.dim:
            raise ValueError(f"expected a block of shape ({self.space.dim}, k), "
                             f"got {tuple(V.shape)}")
        return self.apply_rows(self.space.rows(V)).T

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64) for cross-checks."""
        p = self.space.dim

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            Y = self.apply_block(torch.as_tensor(X.reshape(p, -1)))
            Y = Y.detach().cpu().to(torch.float64).numpy()
            return Y[:, 0] if X.ndim == 1 else Y

        return LinearOperator((p, p), matvec=mm, matmat=mm, rmatvec=mm, dtype=np.float64)


class CurvatureOperator(OperatorOnSpace):
    """A curvature matrix of a model's mean loss over ``data``, as a (1, p, p) operator.

    Args:
        model: the network; evaluated through a twin, never modified.
        loss_fn: a :class:`~hessrank.data.task.Task` (``ClassificationTask()``,
            ``NextTokenTask()``, ...) or a plain ``loss_fn(outputs, targets)`` returning the
            batch **mean** loss (wrapped by ``as_task``).
        data: an (inputs, targets) pair or an iterable of such batches (a DataLoader works);
            inputs may be a tensor, a tuple (``model(*x)``) or a dict (``model(**x)``).
        params: names of the parameters (default: all trainable); vectors are flat in order.
        mode: "eval" (default) or "train".
        cache: keep each batch's linearization across products: True, False or "auto" (on when
            the estimated memory, 4 × activations + 3 × p per batch, fits ``cache_budget_mb``).
        block: how a block of k tangents is pushed through: "loop", "vmap" or "auto" (vmap only
            for small, conv-free batches whose k copies of activations fit the budget).
        check_determinism: on first use, evaluate the first batch's gradient twice and raise if
            they differ (dropout in train mode, random augmentation, ...).
        batch_size: split a single (inputs, targets) pair into batches of this size.
        micro_batch_size: uncached products stream over micro-batches of at most this many
            samples (C_b = Σ_c (n_c/n_b) C_c, the same operator), so a product's peak memory
            is that of a micro-batch (an int turns the cache off; not with cache=True);
            None: whole batches; "auto" (default): micro-batches
            only when nothing is kept *because* the linearizations exceed
            ``cache_budget_mb`` — half the largest batch, halved again until one
            micro-batch's linearization fits the budget (peak ≈ 2× a gradient of the batch on
            a ResNet-18, against 3.3× unsplit; ``docs/scaling.md``). Never when samples are
            coupled (BatchNorm in train mode).
        cache_budget_mb: memory allowed for kept linearizations and vmap activations.
        sdpa: the attention kernel for models that call ``F.scaled_dot_product_attention``:
            "math" (default; the only CPU kernel with second derivatives in torch 2.13),
            "flash", "efficient" or "cudnn" (a kernel without them fails with one line).
        space: a :class:`ParameterSpace` to share (then ``model``, ``params``, ``mode`` are
            taken from it).
        process_group: a ``torch.distributed`` process group (or True for the default one):
            ``data`` is this rank's shard; every batch is weighted by n_b / N_total, N_total
            all-reduced once here, and every product, gradient and loss is summed over the
            ranks (the same operator as one process holding all shards; estimators need no
            change: the same seed draws the same probes on every rank).
    """

    curvature = ""
    """Name of the curvature matrix (subclasses): "hessian", "ggn", "fisher"."""
    additive = True
    """The curvature of a weighted sum of losses is the weighted sum of their curvatures
    (true of the Hessian, the GGN and the Fisher; :class:`~hessrank.curvature.protocol`)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Task | LossFn,
        data: Iterable | tuple | Batches,
        params: Sequence[str] | None = None,
        mode: str = "eval",
        *,
        cache: bool | str = "auto",
        block: str = "auto",
        check_determinism: bool = True,
        batch_size: int | None = None,
        micro_batch_size: int | str | None = "auto",
        cache_budget_mb: float = 2048.0,
        sdpa: str = "math",
        space: ParameterSpace | None = None,
        process_group=None,
    ) -> None:
        request = self._route_request(cache=cache, block=block, micro_batch_size=micro_batch_size,
                                      cache_budget_mb=float(cache_budget_mb), sdpa=sdpa)
        self.request = request
        self.space = space if space is not None else ParameterSpace(model, params, mode)
        self.task = as_task(loss_fn)
        s = self.space
        self.batches = as_batches(data, dtype=s.dtype, device=s.device, batch_size=batch_size)
        check_no_labels_in_inputs(self.batches)
        self.process_group = process_group
        local = self.batches.num_samples
        self.total_samples = int(self._all_reduce(torch.tensor(float(local),
                                                               dtype=torch.float64)))
        self.batch_weights = [n / self.total_samples for n in self.batches.sizes]
        local_loss, probe = s.checked_losses(self.task, self.batches)
        local_loss *= local / self.total_samples
        self.loss_value = float(self._all_reduce(torch.tensor(local_loss,
                                                              dtype=torch.float64)))
        self.cache_budget_mb = request.cache_budget_mb
        self.workload = Workload(
            curvature=self.curvature, dim=s.dim, element_size=s.element_size,
            batch_sizes=tuple(self.batches.sizes),
            activations_per_sample=probe.activations_per_sample, has_conv=s.has_conv(),
            couples_samples=couples_samples(s.model, s.mode), mode=s.mode,
            attention=probe.attention)
        self.route = plan_route(self.workload, request)
        self._cached: list[Closure | None] = [None] * len(self.batches)
        self._checked = not check_determinism
        self.num_matvecs = 0

    def _route_request(self, **kw) -> RouteRequest:
        """The request the route is planned from (the Hessian adds its ``hvp``)."""
        return RouteRequest(**kw)

    # ---- the hook ---------------------------------------------------------------------------
    def _linearize(self, f: BatchLoss, params: dict[str, Tensor]) -> Closure:
        """v ↦ C v for the batch loss ``f`` at ``params`` ({name: tangent} in and out); the
        primal work is done here, once, so the closure can be kept."""
        raise NotImplementedError

    # ---- route ------------------------------------------------------------------------------
    def estimated_cache_mb(self, samples: int | None = None, batches: int | None = None
                           ) -> float:
        """Rough memory of kept linearizations, 4 × activations + 3 × p per batch: of all
        batches by default, or of ``batches`` batches holding ``samples`` samples."""
        return self.workload.cache_mb(samples, batches)

    def activations_per_sample(self) -> float:
        """Output entries of all leaf modules per sample (one forward pass on batch 0)."""
        return self.workload.activations_per_sample

    # ---- operator protocol ------------------------------------------------------------------
    def _all_reduce(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t, self.process_group)

    @property
    def element_size(self) -> int:
        return self.space.element_size

    def apply_rows(self, R: Tensor, reduce: bool = True) -> Tensor:
        """(k, p) rows of tangents → (k, p) rows of C v: every batch, weighted, checked.

        ``reduce=False`` (distributed callers that sum several products in one all-reduce):
        this rank's share Σ_{b local} (n_b/N) C_b v, neither summed over the ranks nor checked
        for finiteness (the caller checks the sum)."""
        if not self._checked:
            with self.context():
                self.space.check_determinism(self.task, self.batches.inputs[0],
                                             self.batches.targets[0])
            self._checked = True
        tangents = self.space.tangents(R.to(dtype=self.dtype, device=self.device))
        out = None
        with self.context():
            for b, w in enumerate(self.batch_weights):
                cv = self._batch_product(b, tangents)
                if out is None:
                    out = cv.mul_(w) if w != 1.0 else cv
                else:
                    out.add_(cv, alpha=w)
        self.num_matvecs += R.shape[0]
        if not reduce:
            return out
        out = self._all_reduce(out)
        check_finite_product(out, self.curvature)
        return out

    # ---- vectors, loss, gradient ------------------------------------------------------------
    def unflatten(self, V: Tensor) -> dict[str, Tensor]:
        """(p, k) block → {name: (k, *shape)}."""
        return self.space.tangents(self.space.rows(V))

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.space.flatten(tensors)

    def parameters_vector(self) -> Tensor:
        return self.space.vector()

    def gradient_on(self, x, y: Tensor) -> Tensor:
        """∇ of the task's loss on (x, y), flat (p,), one plain reverse pass."""
        with self.context():
            return self.space.gradient(self.task, x, y)

    def gradient(self, reduce: bool = True) -> Tensor:
        """∇L(θ) flat (p,), the size-weighted mean over batches (``reduce=False``: this rank's
        share, not summed over the ranks)."""
        g = None
        for b, w in enumerate(self.batch_weights):
            gb = self.gradient_on(self.batches.inputs[b], self.batches.targets[b])
            g = gb.mul_(w) if g is None else g.add_(gb, alpha=w)
        return self._all_reduce(g) if reduce else g

    # ---- batch machinery --------------------------------------------------------------------
    def batch_loss(self, x, y: Tensor) -> BatchLoss:
        """The loss on one batch (x, y) split at the outputs (a plain batch mean)."""
        s, task = self.space, self.task
        n = int(y.shape[0])
        return BatchLoss(outputs=lambda p: s.outputs(task, p, x),
                         loss_of_outputs=lambda out: task(out, y), sample_dims=1,
                         sample_weights=torch.full((n,), 1.0 / n, dtype=s.dtype,
                                                   device=s.device), targets=y)

    def _closure(self, b: int) -> Closure:
        fn = self._cached[b]
        if fn is None:
            x, y = self.batches.inputs[b], self.batches.targets[b]
            fn = self._linearize(self.batch_loss(x, y), self.space.params)
            if self.route["cache"]:
                self._cached[b] = fn
        return fn

    def _batch_product(self, b: int, tangents: dict[str, Tensor]) -> Tensor:
        """C_b v for {name: (k, *shape)} tangents, as fresh (k, p) rows; uncached products
        with a micro-batch size stream: C_b v = Σ_c (n_c/n_b) C_c v, one micro-batch's
        linearization alive at a time."""
        m, n = self.route.get("micro_batch"), self.batches.sizes[b]
        if not m or m >= n:
            return self._closure_product(self._closure(b), tangents)
        x, y = self.batches.inputs[b], self.batches.targets[b]
        out = None
        for a in range(0, n, m):
            c = min(a + m, n)
            fn = self._linearize(self.batch_loss(slice_inputs(x, a, c), y[a:c]),
                                 self.space.params)
            part = self._closure_product(fn, tangents)
            del fn  # free this micro-batch's linearization before the next one is built
            w = (c - a) / n
            out = part.mul_(w) if out is None else out.add_(part, alpha=w)
            del part
        return out

    def _closure_product(self, fn: Closure, tangents: dict[str, Tensor]) -> Tensor:
        """fn applied to {name: (k, *shape)} tangents (a loop or a vmap block), (k, p) rows."""
        s = self.space
        k = tangents[s.names[0]].shape[0]
        if k == 1:
            o = fn({n: t[0] for n, t in tangents.items()})
            return torch.cat([o[n].reshape(1, -1) for n in s.names], dim=1)
        if self.route["block"] == "vmap":  # contiguous tangents batch faster than row views
            T = {n: t.contiguous() for n, t in tangents.items()}
            batched = getattr(fn, "batched", None)  # a closure may push a block natively
            return s.flat_rows(batched(T) if batched is not None else vmap(fn)(T))
        out = torch.empty(k, s.dim, dtype=s.dtype, device=s.device)
        for i in range(k):
            o = fn({n: t[i] for n, t in tangents.items()})
            torch.cat([o[n].reshape(-1) for n in s.names], out=out[i])
        return out

    # ---- stacks of units --------------------------------------------------------------------
    def units_loss(self, inputs, targets: Tensor, keep: Tensor, scale: Tensor) -> BatchLoss:
        """Σ_u L_u(θ_u) over U units of m samples (inputs (U, m, ...), keep (U, m) marks real
        rows, scale (U,) multiplies each unit's batch mean); padded rows' outputs are detached,
        so they add a constant and nothing to any derivative."""
        s, task = self.space, self.task

        def outputs(theta):
            return vmap(lambda th, x: s.outputs(task, th, x))(theta, inputs)

        def unit_loss(out, y, kp, sc):
            def masked(o):
                mask = kp.reshape(-1, *([1] * (o.ndim - 1)))
                return torch.where(mask, o, o.detach())
            return task(pytree.tree_map(masked, out), y) * sc

        def loss_of_outputs(out):
            return vmap(unit_loss)(out, targets, keep, scale).sum()

        m = keep.shape[1]
        weights = keep.to(s.dtype) * (scale[:, None].to(s.dtype) / m)
        return BatchLoss(outputs, loss_of_outputs, 2, weights, targets)

    def unit_linearization(self, inputs, targets: Tensor, keep: Tensor,
                           scale: Tensor) -> Callable[[Tensor], Tensor]:
        """R (U, p) ↦ (C_u R[u])_u for a stack of units (:meth:`units_loss`), each unit with
        its own copy of θ, through one kept linearization."""
        s = self.space
        U = int(keep.shape[0])
        # materialized copies: forward-mode products cannot write into an expanded tensor
        theta = {n: t.expand(U, *t.shape).clone() for n, t in s.params.items()}
        with self.context():
            fn = self._linearize(self.units_loss(inputs, targets, keep, scale), theta)

        def apply(R: Tensor) -> Tensor:
            with self.context():
                return s.flat_rows(fn(s.tangents(R)))

        return apply

    def units_gradient(self, inputs, targets: Tensor, keep: Tensor, scale: Tensor) -> Tensor:
        """(U, p): ∇L_u(θ) per unit (no graph kept)."""
        s = self.space
        U = int(keep.shape[0])
        theta = {n: t.expand(U, *t.shape) for n, t in s.params.items()}
        f = self.units_loss(inputs, targets, keep, scale)
        with self.context():
            g = torch.func.grad(f.loss)(theta)
        return s.flat_rows(g)

    # ---- re-routing -------------------------------------------------------------------------
    def _init_kwargs(self) -> dict:
        """Constructor keywords beyond the base's (subclasses with options extend this)."""
        return {}

    def with_data(self, data, **route) -> CurvatureOperator:
        """The same curvature (shared parameter space, same options and route unless
        overridden) on other data."""
        kw = {**self._init_kwargs(), "cache": self.route["cache"], "block": self.route["block"],
              "micro_batch_size": self.request.micro_batch_size, "sdpa": self.request.sdpa,
              **route}
        return type(self)(self.space.model, self.task, data, space=self.space,
                          check_determinism=False, cache_budget_mb=self.cache_budget_mb,
                          process_group=self.process_group, **kw)

    def rerouted(self, **route) -> CurvatureOperator:
        """The same operator (shared parameter space and batches) with other route settings,
        e.g. those returned by :func:`hessrank.curvature.tune`."""
        return self.with_data(self.batches, **route)
