"""Route planning: how a curvature operator computes its products, decided from shapes and
budgets alone.

The operators execute a route; they never choose one. :func:`plan_route` is a pure function of
a :class:`Workload` (what one forward pass on the first batch tells about the model and the
data: parameter count, activation entries per sample, batch sizes, conv layers, BatchNorm in
train mode, scaled-dot-product attention) and a :class:`RouteRequest` (the user's settings and
memory budget), so a test can call it on made-up shapes without building a model, and the same
shapes always give the same route: no timing, no machine load (``docs/design.md``).

The rule (measured per cell in ``experiments/benchmarks/results/routes.md``):

- **cache** the per-batch linearizations when they fit ``cache_budget_mb`` (estimated as
  4 × activations + 3 × p entries per batch);
- **block** of k tangents by ``vmap`` when 8 copies of a batch's activations fit the budget
  and either the curvature is a GGN or Fisher (:data:`OUTPUT_SPACE`) or the batch is
  conv-free with at most :data:`VMAP_MAX_ENTRIES` activation entries; else a loop;
- **hvp** (Hessian): the kept double-backward graph when cached, the ``vjp`` closure
  ("rev-rev") when nothing is kept; "fwd-rev" only on request;
- **micro-batches** for uncached products only when the linearizations exceed the budget:
  half the largest batch, halved until one micro-batch's linearization fits (never when a
  forward pass couples samples: BatchNorm in train mode);
- **attention** (recorded only for models that call ``F.scaled_dot_product_attention``):
  "math", torch's reference kernel, the one with second derivatives in torch 2.13.

Example:
    >>> w = Workload(curvature="hessian", dim=10_000, element_size=4, batch_sizes=(256,),
    ...              activations_per_sample=600.0, has_conv=False, couples_samples=False,
    ...              mode="eval")
    >>> plan_route(w, RouteRequest(hvp="auto"))["hvp"]
    'graph'
"""

from __future__ import annotations

from dataclasses import dataclass

VMAP_MAX_ENTRIES = 2**17
"""A Hessian's block of tangents goes through ``vmap`` only when one batch's activations have at
most this many entries (small, overhead-bound products) and the model has no conv."""

OUTPUT_SPACE = ("ggn", "fisher")
"""Curvatures whose product is Jᵀ M J v (a ``jvp`` and a ``vjp`` of the outputs): their blocks
go through ``vmap`` whenever 8 copies of a batch's activations fit the budget, conv and large
batches included (``experiments/benchmarks/results/routes.md``: per vector, the cached loop
took 0.99-1.52x the cached ``vmap`` block in the 12 GGN/Fisher cells of the MLP, the CNN and
the tiny transformer, float32 and float64)."""

HVP_ROUTES = ("rev-rev", "fwd-rev", "graph")
BLOCKS = ("loop", "vmap")
ATTENTION_KERNELS = ("math", "flash", "efficient", "cudnn")
"""``sdpa=`` values: torch's scaled-dot-product attention backends (``SDPBackend`` members in
lower case without the ``_attention`` suffix). Only "math" has second derivatives on the CPU
in torch 2.13."""


@dataclass(frozen=True)
class Workload:
    """What the rule reads about a model and its data (no timings).

    Attributes:
        curvature: "hessian", "ggn", "fisher", ...
        dim: p, the number of selected parameters.
        element_size: bytes per entry of the parameters' dtype.
        batch_sizes: samples per batch.
        activations_per_sample: output entries of all leaf modules per sample.
        has_conv: the model has a convolution.
        couples_samples: a forward pass mixes a batch's samples (BatchNorm in train mode).
        mode: "eval" or "train".
        attention: the forward pass calls ``F.scaled_dot_product_attention``.
    """

    curvature: str
    dim: int
    element_size: int
    batch_sizes: tuple[int, ...]
    activations_per_sample: float
    has_conv: bool
    couples_samples: bool
    mode: str
    attention: bool = False

    def cache_mb(self, samples: int | None = None, batches: int | None = None) -> float:
        """Rough memory of kept linearizations, 4 × activations + 3 × p per batch: of all
        batches by default, or of ``batches`` batches holding ``samples`` samples."""
        n = sum(self.batch_sizes) if samples is None else samples
        nb = len(self.batch_sizes) if batches is None else batches
        total = 4 * self.activations_per_sample * n + 3 * self.dim * nb
        return total * self.element_size / 2**20


@dataclass(frozen=True)
class RouteRequest:
    """The user's route settings (checked here, at operator construction).

    Attributes:
        cache: True, False or "auto".
        block: "loop", "vmap" or "auto".
        hvp: "rev-rev", "fwd-rev", "graph" or "auto" for the Hessian; None for curvatures
            without a Hessian-vector product.
        micro_batch_size: None, "auto" or a positive int.
        cache_budget_mb: memory for kept linearizations and vmap activations.
        sdpa: the attention kernel for models that call ``F.scaled_dot_product_attention``
            (:data:`ATTENTION_KERNELS`; "math" by default).
    """

    cache: bool | str = "auto"
    block: str = "auto"
    hvp: str | None = None
    micro_batch_size: int | str | None = "auto"
    cache_budget_mb: float = 2048.0
    sdpa: str = "math"

    def __post_init__(self) -> None:
        if self.cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {self.cache!r}")
        if self.block not in (*BLOCKS, "auto"):
            raise ValueError(f"block must be one of ('loop', 'vmap', 'auto'), got {self.block!r}")
        if self.hvp is not None and self.hvp not in (*HVP_ROUTES, "auto"):
            raise ValueError(f"hvp must be one of {HVP_ROUTES + ('auto',)}, got {self.hvp!r}")
        m = self.micro_batch_size
        if not (m in (None, "auto") or (isinstance(m, int) and not isinstance(m, bool)
                                        and m >= 1)):
            raise ValueError(f"micro_batch_size must be None, 'auto' or a positive int, got {m!r}")
        if isinstance(m, int) and self.cache is True:
            raise ValueError("micro_batch_size streams uncached products; with cache=True use "
                             "batch_size to keep smaller batches")
        if self.hvp == "fwd-rev" and self.cache is True:
            raise ValueError("cache=True keeps a reverse-over-reverse linearization; "
                             "use hvp='rev-rev', 'graph' or 'auto' with it, or cache=False")
        if self.sdpa not in ATTENTION_KERNELS:
            raise ValueError(f"sdpa must be one of {ATTENTION_KERNELS}, got {self.sdpa!r}")


def plan_route(w: Workload, r: RouteRequest) -> dict:
    """The route for workload ``w`` under request ``r`` (module docstring), as the dict the
    operator records in ``op.route``: curvature, cache, block, mode, micro_batch, then hvp
    (Hessian) and attention (models with scaled-dot-product attention)."""
    over_budget = w.cache_mb() > r.cache_budget_mb
    cache = False if r.hvp == "fwd-rev" else r.cache
    use_cache = (not over_budget) if cache == "auto" else bool(cache)
    if isinstance(r.micro_batch_size, int):  # asking for micro-batches asks for streaming
        use_cache = False
    block = r.block
    if block == "auto":
        batch_act = w.activations_per_sample * max(w.batch_sizes)
        fits = 8 * batch_act * w.element_size / 2**20 <= r.cache_budget_mb
        small = batch_act <= VMAP_MAX_ENTRIES and not w.has_conv
        block = "vmap" if fits and (small or w.curvature in OUTPUT_SPACE) else "loop"
    route = {"curvature": w.curvature, "cache": use_cache, "block": block, "mode": w.mode,
             "micro_batch": micro_batch(w, r, use_cache, over_budget)}
    if r.hvp is not None:
        hvp = r.hvp
        if hvp == "auto":
            hvp = "graph" if use_cache else "rev-rev"
        route["hvp"] = hvp
    if w.attention:
        route["attention"] = r.sdpa
    return route


def micro_batch(w: Workload, r: RouteRequest, cached: bool, over_budget: bool) -> int | None:
    """The micro-batch size of uncached products (None: whole batches)."""
    request, largest = r.micro_batch_size, max(w.batch_sizes)
    if w.couples_samples and isinstance(request, int):
        raise ValueError("micro_batch_size would change the operator: BatchNorm in train "
                         "mode normalizes with the statistics of the whole batch")
    if cached or request is None or w.couples_samples:
        return None
    if request != "auto":
        return request if request < largest else None
    if not over_budget or largest < 2:
        return None
    m = -(-largest // 2)
    while m > 1 and w.cache_mb(m, batches=1) > r.cache_budget_mb:
        m = -(-m // 2)
    return m
