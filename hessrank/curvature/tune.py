"""hr.tune: time an operator's product routes on its own data, return the fastest settings.

The library never times anything on its own (same inputs, same bits); this explicit call
does, and its result is meant to be passed back in: ``HessianOperator(..., **hr.tune(op))``.

Example:
    >>> best = tune(op, k=1)                                    # doctest: +SKIP
    >>> op = HessianOperator(model, loss_fn, data, **best)      # doctest: +SKIP
"""

from __future__ import annotations

import time

import torch

from hessrank.curvature.base import CurvatureOperator


def candidates(op: CurvatureOperator, k: int) -> list[dict]:
    """Route settings worth timing for ``op`` on blocks of k tangents."""
    blocks = ["loop", "vmap"] if k > 1 else ["loop"]
    out = [{"cache": True, "block": b} for b in blocks]
    if "hvp" in op.route:
        out = [{**c, "hvp": "rev-rev"} for c in out] + [
            {"cache": True, "block": "loop", "hvp": "graph"},
            {"cache": False, "block": "loop", "hvp": "fwd-rev"}]
    return out


def tune(op: CurvatureOperator, k: int = 1, repeats: int = 5, seed: int = 0) -> dict:
    """The fastest route settings for products of k tangents with ``op``.

    Every candidate (:func:`candidates`) is built on the same data (shared parameter space),
    warmed up once (a candidate that raises is dropped), then timed in ``repeats`` interleaved
    rounds; each is judged by its fastest round (other work only slows calls down).
    Returns the keyword arguments of the winner (e.g. {"cache": True, "block": "loop",
    "hvp": "graph"}).
    """
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(op.shape[1], k, generator=gen, dtype=torch.float64)
    ops = []
    for c in candidates(op, k):
        try:
            o = op.rerouted(**c)
            o.apply_block(V)
        except (RuntimeError, ValueError):
            continue
        ops.append((c, o))
    best: dict[int, float] = {}
    for r in range(repeats):
        for i in (range(len(ops)) if r % 2 == 0 else reversed(range(len(ops)))):
            t0 = time.perf_counter()
            ops[i][1].apply_block(V)
            dt = time.perf_counter() - t0
            best[i] = min(best.get(i, dt), dt)
    return dict(ops[min(best, key=best.get)][0])
