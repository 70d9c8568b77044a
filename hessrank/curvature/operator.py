"""HessianOperator: products with the Hessian of a model's loss over a dataset, via torch.func.

For parameters θ (the selected subset, flattened in ``params`` order, p entries) and batches
b = 1..B of sizes n_b (N = Σ n_b), the loss is the dataset mean L(θ) = Σ_b (n_b/N) L_b(θ) with
L_b the batch-mean ``loss_fn``; the operator is H = ∇²L = Σ_b (n_b/N) ∇²L_b, so unequal batches
give the same operator as the whole data in one batch.

Products are Hessian-vector products by ``torch.func``: reverse-over-reverse (``vjp`` of
``grad``) or forward-over-reverse (``jvp`` of ``grad``), over a block of k tangents either by
``vmap`` or by a loop. With ``cache=True`` each batch's reverse-over-reverse linearization (the
``vjp`` closure of the gradient) is built once and reused, so a product costs only the
tangent pass. ``"auto"`` settings follow the rule documented in :meth:`HessianOperator.calibrate`
(memory first, then a short interleaved timing with a margin in favour of the default).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from hessrank.curvature.data import Batches, as_batches

LossFn = Callable[[Tensor, Tensor], Tensor]
_HVP_MODES = ("rev-rev", "fwd-rev")
_BLOCK_MODES = ("vmap", "loop")
_CALIBRATION: dict[tuple, tuple[str, str]] = {}


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: str):
    """Temporarily put every submodule in ``mode`` ("eval" or "train"), then restore flags."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def functional_model(model: nn.Module, mode: str) -> nn.Module:
    """The module to evaluate functionally in ``mode``.

    "eval" uses ``model`` itself. "train" uses a private copy whose BatchNorm layers normalize
    with batch statistics and stop tracking running statistics: the in-place running-mean
    update is not a function of the weights and torch.func refuses to differentiate through it.
    The caller's model is never modified.
    """
    if mode == "eval":
        return model
    twin = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(twin)
    return twin


def select_params(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """Names of the parameters to differentiate: ``params`` checked, or every trainable one."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, t in named.items() if t.requires_grad]
        if not names:
            raise ValueError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "pass params=[...] with the names to differentiate"
            )
        return names
    names = list(params)
    if not names:
        raise ValueError("params is empty; pass at least one parameter name or None for all")
    for n in names:
        if n not in named:
            raise ValueError(f"unknown parameter {n!r}; valid names: {', '.join(named)}")
    if len(set(names)) != len(names):
        raise ValueError(f"params lists a name twice: {names}")
    return names


def check_finite_params(model: nn.Module) -> None:
    """Raise naming the first parameter or buffer with NaN/inf entries."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                raise ValueError(
                    f"{kind} {name!r} has NaN or inf entries; the Hessian is undefined there "
                    "(check the checkpoint or the training run that produced it)"
                )


def private_twin(model: nn.Module, mode: str) -> nn.Module | None:
    """A structural copy of ``model`` fixed in ``mode`` that shares its parameter and buffer
    tensors (no weights are copied), or None when the model cannot be deep-copied.

    Products then never walk the module tree to set and restore ``training`` flags, and the
    caller's model is never touched. "train" also stops BatchNorm from tracking running
    statistics (see :func:`functional_model`).
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        twin = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - exotic modules: fall back to the caller's model
        return None
    if mode == "train":
        torch.func.replace_all_batch_norm_modules_(twin)
    twin.train(mode == "train")
    return twin


class HessianOperator:
    """The Hessian of a model's mean loss over ``data``, as a (1, p, p) operator.

    Args:
        model: the network; it is evaluated functionally and never modified.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch **mean** loss.
        data: an (inputs, targets) pair or an iterable of such batches (a DataLoader works);
            read once at construction.
        params: names of the parameters to differentiate (default: all trainable); the others
            are held fixed. Vectors are flat in this order.
        mode: "eval" (BatchNorm running statistics, dropout off; default) or "train".
        hvp: "rev-rev", "fwd-rev" or "auto" (see the rule in :meth:`calibrate`).
        block: "vmap", "loop" or "auto" — how a block of k tangents is pushed through.
        cache: keep each batch's linearization across products: True, False or "auto"
            (on when the estimated graph memory fits ``cache_budget_mb``). Implies "rev-rev".
        check_determinism: evaluate the first batch's gradient twice on first use and raise if
            the two differ (dropout in train mode, random augmentation, ...).
        batch_size: split a single (inputs, targets) pair into batches of this size.
        cache_budget_mb: memory allowed for kept linearizations (``cache="auto"``) and for the
            k-fold tangent activations of ``block="vmap"`` (``block="auto"``).

    The "auto" rule, in order (measured in ``docs/performance.md``):

    1. ``cache="auto"``: keep every batch's reverse-over-reverse linearization when its
       estimated memory (4 × activations + 3 × p per batch) fits ``cache_budget_mb``. A product
       is then only the tangent pass (≈ 1–2 gradients instead of ≈ 2.5–3.5). Implies rev-rev.
    2. ``hvp="auto"`` without a cache: reverse-over-reverse, unless forward-over-reverse
       times ≥ 10 % faster (it measured slower on every model tried).
    3. ``block="auto"``: a loop over the k tangents, unless ``vmap`` times ≥ 10 % faster;
       ``vmap`` is a candidate only when k copies of the activations fit ``cache_budget_mb``
       (a vmap over conv tangents measured slower than a loop on CPU; over an MLP, faster).
    4. Timings are skipped when one default call takes over a second (large models: the
       defaults stand) and remembered per (model class, shapes, batch shape, dtype, cache).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> op = HessianOperator(model, nn.functional.cross_entropy, (x, y))
        >>> op.shape
        (1, 23, 23)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Iterable | tuple[Tensor, Tensor],
        params: Sequence[str] | None = None,
        mode: str = "eval",
        *,
        hvp: str = "auto",
        block: str = "auto",
        cache: bool | str = "auto",
        check_determinism: bool = True,
        batch_size: int | None = None,
        cache_budget_mb: float = 2048.0,
    ) -> None:
        if hvp not in (*_HVP_MODES, "auto"):
            raise ValueError(f"hvp must be one of {_HVP_MODES + ('auto',)}, got {hvp!r}")
        if block not in (*_BLOCK_MODES, "auto"):
            raise ValueError(f"block must be one of {_BLOCK_MODES + ('auto',)}, got {block!r}")
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        with module_mode(model, mode):
            pass  # validates mode
        self.param_names = select_params(model, params)
        check_finite_params(model)
        twin = private_twin(model, mode)
        # with a private twin fixed in ``mode``, products need no per-call mode switching
        self.model = twin if twin is not None else functional_model(model, mode)
        self._needs_mode = twin is None
        self.loss_fn = loss_fn
        self.mode = mode
        named = dict(self.model.named_parameters())
        self._params = {n: named[n].detach().clone() for n in self.param_names}
        fixed = {n: t.detach() for n, t in named.items() if n not in self._params}
        fixed.update({n: b.detach() for n, b in self.model.named_buffers()})
        self._fixed = fixed
        ref = next(iter(self._params.values()))
        self._dtype, self._device = ref.dtype, ref.device
        self.batches: Batches = as_batches(
            data, dtype=self._dtype, device=self._device, batch_size=batch_size
        )
        self._shapes = [self._params[n].shape for n in self.param_names]
        self._numels = [int(math.prod(s)) for s in self._shapes]
        self._offsets = [0, *itertools.accumulate(self._numels)]
        self._p = sum(self._numels)
        self._hvp, self._block, self._cache_opt = hvp, block, cache
        self._cache_budget_mb = cache_budget_mb
        self._cached: list[Callable | None] | None = None
        self._check_determinism = check_determinism
        self._ready = False
        self._graph_mb: float | None = None
        self._act_per_sample: float | None = None
        self.num_matvecs = 0
        self.loss_value = self._check_losses()

    # ---- operator protocol -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self._p, self._p)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_samples(self) -> int:
        return self.batches.num_samples

    @property
    def settings(self) -> dict[str, object]:
        """The product strategy in use (after calibration): hvp, block, cache."""
        self._prepare(2)
        return {"hvp": self._hvp, "block": self._block, "cache": self._cached is not None,
                "mode": self.mode}

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape (1, p, k), (p, k) or (p,); returns the same shape."""
        squeeze = V.ndim
        if V.ndim == 1:
            V = V[None, :, None]
        elif V.ndim == 2:
            V = V[None]
        if V.ndim != 3 or V.shape[0] != 1 or V.shape[1] != self._p:
            raise ValueError(f"expected V of shape (1, {self._p}, k), got {tuple(V.shape)}")
        out = self.apply_block(V[0])[None]
        if squeeze == 1:
            return out[0, :, 0]
        if squeeze == 2:
            return out[0]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v)

    def apply_block(self, V: Tensor) -> Tensor:
        """H V for a (p, k) block: Σ_b (n_b/N) H_b V, one pass over the data."""
        if V.ndim != 2 or V.shape[0] != self._p:
            raise ValueError(f"expected a block of shape ({self._p}, k), got {tuple(V.shape)}")
        k = V.shape[1]
        self._prepare(k)
        out = self._apply_rows(self._rows(V))
        self.num_matvecs += k
        return out.T

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64) for cross-checks."""

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            one = X.ndim == 1
            Xt = torch.as_tensor(X.reshape(self._p, -1))
            Y = self.apply_block(Xt).detach().cpu().to(torch.float64).numpy()
            return Y[:, 0] if one else Y

        return LinearOperator((self._p, self._p), matvec=mm, matmat=mm, rmatvec=mm,
                              dtype=np.float64)

    # ---- vectors ---------------------------------------------------------------------------
    def unflatten(self, V: Tensor) -> dict[str, Tensor]:
        """(p, k) block → {name: (k, *shape)} tangents."""
        return self._tangents(self._rows(V))

    def _rows(self, V: Tensor) -> Tensor:
        """(p, k) → (k, p) contiguous in the operator's dtype/device (a view when k = 1)."""
        return V.to(dtype=self._dtype, device=self._device).T.contiguous()

    def _tangents(self, R: Tensor) -> dict[str, Tensor]:
        """(k, p) contiguous rows → {name: (k, *shape)} views (no copies)."""
        k, o = R.shape[0], self._offsets
        return {n: R[:, o[i]:o[i + 1]].view(k, *s)
                for i, (n, s) in enumerate(zip(self.param_names, self._shapes))}

    def _flatten_block(self, tangents: dict[str, Tensor]) -> Tensor:
        """{name: (k, *shape)} → (p, k)."""
        return self._flat_rows(tangents).T

    def _flat_rows(self, tangents: dict[str, Tensor], out: Tensor | None = None) -> Tensor:
        """{name: (k, *shape)} → (k, p), written into ``out`` when given."""
        k = tangents[self.param_names[0]].shape[0]
        return torch.cat([tangents[n].reshape(k, -1) for n in self.param_names], dim=1, out=out)

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """{name: shape} → (p,), in ``params`` order."""
        return torch.cat([tensors[n].reshape(-1) for n in self.param_names])

    def parameters_vector(self) -> Tensor:
        """θ flat, in ``params`` order."""
        return self.flatten(self._params)

    # ---- loss and gradient ---------------------------------------------------------------------
    def _mode(self):
        """Mode switching for the caller's model (only when no private twin could be made)."""
        return module_mode(self.model, self.mode) if self._needs_mode else contextlib.nullcontext()

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, (params, self._fixed), (x,))
        return self.loss_fn(out, y)

    def _batch_gradient(self, b: int) -> Tensor:
        """∇L_b flat (p,) (see :meth:`gradient_on`)."""
        return self.gradient_on(self.batches.inputs[b], self.batches.targets[b])

    def gradient_on(self, x: Tensor, y: Tensor) -> Tensor:
        """∇ loss_fn(model(x), y) flat (p,) by one plain reverse pass (no graph kept, nothing
        to differentiate twice): leaves that require grad, ``functional_call``, autograd."""
        leaves = {n: t.detach().requires_grad_(True) for n, t in self._params.items()}
        with torch.enable_grad():
            loss = self._loss(leaves, x, y)
            gs = torch.autograd.grad(loss, [leaves[n] for n in self.param_names])
        return torch.cat([t.reshape(-1) for t in gs])

    def gradient(self) -> Tensor:
        """∇L(θ) flat (p,), the size-weighted mean over batches."""
        g = None
        with self._mode():
            for b, w in enumerate(self.batches.weights):
                gb = self._batch_gradient(b)
                if g is None:
                    g = gb.mul_(w) if w != 1.0 else gb
                else:
                    g.add_(gb, alpha=w)
        return g

    def _check_losses(self) -> float:
        total = 0.0
        with torch.no_grad(), self._mode():
            for b, w in enumerate(self.batches.weights):
                val = self._loss(self._params, self.batches.inputs[b], self.batches.targets[b])
                if val.ndim != 0:
                    raise ValueError(
                        f"loss_fn must return a scalar batch mean, got shape {tuple(val.shape)}; "
                        "use reduction='mean'"
                    )
                if not torch.isfinite(val):
                    raise ValueError(
                        f"the loss is {val.item()} on batch {b} (weights are finite): check the "
                        "inputs/targets of that batch and the model's numerics"
                    )
                total += w * float(val)
        return total

    # ---- product machinery --------------------------------------------------------------------
    def _apply_rows(self, R: Tensor) -> Tensor:
        """(k, p) rows of tangents → (k, p) rows of H v: every batch, weighted, checked."""
        tangents = self._tangents(R)
        out = None
        with self._mode():
            for b, w in enumerate(self.batches.weights):
                hv = self._batch_hvp(b, tangents)
                if out is None:
                    out = hv.mul_(w) if w != 1.0 else hv
                else:
                    out.add_(hv, alpha=w)
        # one reduction: a NaN/inf entry always makes the sum non-finite (full check only then)
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise FloatingPointError(
                "a Hessian-vector product has NaN/inf entries; the loss is not twice "
                "differentiable at these weights or overflows in this dtype"
            )
        return out

    def _grad_fn(self, b: int) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        x, y = self.batches.inputs[b], self.batches.targets[b]
        return lambda p: grad(self._loss)(p, x, y)

    def _linearization(self, b: int, hvp: str) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """v ↦ H_b v for one batch, with the primal work done once for the returned closure."""
        if self._cached is not None and self._cached[b] is not None:
            return self._cached[b]
        g = self._grad_fn(b)
        if hvp == "rev-rev":
            _, vjp_fn = vjp(g, self._params)
            fn = lambda v: vjp_fn(v)[0]  # noqa: E731  (H symmetric: vᵀH = (Hv)ᵀ)
        else:
            params = self._params
            fn = lambda v: jvp(g, (params,), (v,))[1]  # noqa: E731
        if self._cached is not None:
            self._cached[b] = fn
        return fn

    def _batch_hvp(self, b: int, tangents: dict[str, Tensor], hvp: str | None = None,
                   block: str | None = None) -> Tensor:
        """H_b v for {name: (k, *shape)} tangents, as fresh (k, p) rows."""
        hvp = hvp or self._hvp
        block = block or self._block
        fn = self._linearization(b, hvp)
        names = self.param_names
        k = tangents[names[0]].shape[0]
        if k == 1:  # no vmap, no stacking: one product written straight into a row
            o = fn({n: t[0] for n, t in tangents.items()})
            return torch.cat([o[n].reshape(1, -1) for n in names], dim=1)
        if block == "vmap":  # contiguous per-parameter tangents batch faster than row views
            return self._flat_rows(vmap(fn)({n: t.contiguous() for n, t in tangents.items()}))
        out = torch.empty(k, self._p, dtype=self._dtype, device=self._device)
        for i in range(k):
            o = fn({n: t[i] for n, t in tangents.items()})
            torch.cat([o[n].reshape(-1) for n in names], out=out[i])
        return out

    def _prepare(self, k: int) -> None:
        if self._ready:
            return
        if self._check_determinism:
            self._determinism_check()
        if self._cache_opt == "auto":
            # the cached linearization is reverse-over-reverse: only when hvp allows it
            use_cache = self._hvp != "fwd-rev" and (
                self._estimated_graph_mb() <= self._cache_budget_mb
            )
        else:
            use_cache = bool(self._cache_opt)
        if use_cache and self._hvp == "fwd-rev":
            raise ValueError("cache=True keeps a reverse-over-reverse linearization; "
                             "use hvp='rev-rev' or 'auto' with it, or cache=False")
        if use_cache:
            self._hvp = "rev-rev"
            self._cached = [None] * len(self.batches)
        if self._hvp == "auto" or self._block == "auto":
            self.calibrate(max(2, min(k, 8)))
        self._ready = True

    def calibrate(self, k: int = 4, repeats: int = 5, margin: float = 0.1) -> tuple[str, str]:
        """Pick (hvp, block) for products of k tangents on the first batch.

        Rule (the "auto" settings; fixed settings are kept as given):

        - defaults: hvp "rev-rev" (forward-over-reverse measured slower on every model tried,
          and a cached linearization is reverse-over-reverse anyway), block "loop" (no k-fold
          activation memory);
        - challengers: "fwd-rev" only without a cache; "vmap" only when k copies of the
          activations (¼ of the graph estimate per copy) fit ``cache_budget_mb``;
        - a challenger that raises on its warm-up call (an operation without a ``vmap``
          rule, such as max-pooling's double backward in torch 2.13) is dropped;
        - the default and the challengers are timed in interleaved rounds (order rotated each
          round, one warm-up call each) until each has ``repeats`` timings and 0.25 s in total
          (at most 25 rounds: tiny problems get more rounds); each is judged by its fastest
          round (load from other work only slows calls down, so the minimum is the least noisy
          statistic on a shared machine) and a challenger wins only when that is at least
          ``margin`` (10 %) below the default's, so near-equal candidates do not flip the
          choice from run to run;
        - when one call of the default takes over a second (judged after the warm-up, which
          may pay one-time costs, from k × one more single-tangent product) nothing is timed:
          the default stands (a calibration would cost more products than it could save).

        The choice is remembered per (model class, parameter shapes, batch shape, dtype, cache).
        """
        key = (type(self.model).__name__, tuple(self._shapes),
               tuple(self.batches.inputs[0].shape), self._dtype, self._cached is not None)
        if key in _CALIBRATION:
            self._hvp, self._block = _CALIBRATION[key]
            return self._hvp, self._block
        hvp0 = "rev-rev" if self._hvp == "auto" else self._hvp
        block0 = "loop" if self._block == "auto" else self._block
        hvps = [hvp0] + (["fwd-rev"] if self._hvp == "auto" and self._cached is None else [])
        vmap_fits = 0.25 * k * self._estimated_graph_mb() <= self._cache_budget_mb
        blocks = [block0] + (["vmap"] if self._block == "auto" and vmap_fits else [])
        candidates = [(h, bl) for h in hvps for bl in blocks]
        gen = torch.Generator().manual_seed(0)
        V = torch.randn(self._p, k, generator=gen, dtype=torch.float64)
        tangents = self._tangents(self._rows(V))
        with self._mode():
            t0 = time.perf_counter()
            self._batch_hvp(0, tangents, hvp0, block0)  # warm-up (builds a cached linearization)
            first = time.perf_counter() - t0
            if len(candidates) > 1 and first > 1.0:
                # the first call may have paid one-time costs (the cache, lazy set-up of
                # torch.func in a fresh process): judge by one more product of a single tangent
                one = {n: t[:1] for n, t in tangents.items()}
                t0 = time.perf_counter()
                self._batch_hvp(0, one, hvp0, block0)
                first = k * (time.perf_counter() - t0)
            if len(candidates) > 1 and first <= 1.0:
                for h, bl in candidates[1:]:
                    try:
                        self._batch_hvp(0, tangents, h, bl)  # warm-up
                    except RuntimeError:
                        # e.g. torch 2.13 has no vmap rule for max-pool's double backward
                        # ("NYI: querying is_contiguous inside of vmap"): not a candidate
                        candidates.remove((h, bl))
                times: dict[tuple[str, str], list[float]] = {c: [] for c in candidates}
                for r in range(25):
                    order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
                    for h, bl in order:
                        t0 = time.perf_counter()
                        self._batch_hvp(0, tangents, h, bl)
                        times[(h, bl)].append(time.perf_counter() - t0)
                    if r + 1 >= repeats and min(sum(t) for t in times.values()) >= 0.25:
                        break
                # the fastest round: other work on the machine only ever slows a call down
                low = {c: min(t) for c, t in times.items()}
                best = min(low, key=low.get)
                if low[best] > (1.0 - margin) * low[candidates[0]]:
                    best = candidates[0]
            else:
                best = candidates[0]
        _CALIBRATION[key] = best
        self._hvp, self._block = best
        return best

    def _estimated_graph_mb(self) -> float:
        """Rough memory of all batches' kept linearizations: 4 × activations + 3 × params."""
        if self._graph_mb is not None:
            return self._graph_mb
        total = 4 * self.activations_per_sample() * self.num_samples + 3 * self._p * len(
            self.batches)
        self._graph_mb = total * self.element_size / 2**20
        return self._graph_mb

    @property
    def element_size(self) -> int:
        """Bytes per entry of the operator's dtype."""
        return torch.finfo(self._dtype).bits // 8

    def activations_per_sample(self) -> float:
        """Output entries of all leaf modules per sample, from one forward pass on batch 0."""
        if self._act_per_sample is not None:
            return self._act_per_sample
        numel = 0

        def hook(_m, _i, out):
            nonlocal numel
            if isinstance(out, Tensor):
                numel += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad(), self._mode():
                self._loss(self._params, self.batches.inputs[0], self.batches.targets[0])
        finally:
            for h in handles:
                h.remove()
        self._act_per_sample = numel / max(self.batches.sizes[0], 1)
        return self._act_per_sample

    def _determinism_check(self) -> None:
        with self._mode():
            try:
                g1 = self._batch_gradient(0)
                g2 = self._batch_gradient(0)
            except RuntimeError as err:
                raise ValueError(
                    f"the model cannot be differentiated functionally in mode={self.mode!r}: {err}"
                ) from err
        tol = 1e-10 if self._dtype == torch.float64 else 1e-5
        diff = float((g1 - g2).norm() / g1.norm().clamp_min(torch.finfo(self._dtype).tiny))
        if diff > tol:
            raise ValueError(
                f"the loss is not deterministic: two gradients on the same batch differ by "
                f"{diff:.2e} (relative). A random layer (dropout) is active in mode={self.mode!r} "
                "or the model draws random numbers; use mode='eval' or check_determinism=False"
            )
