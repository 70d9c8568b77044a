"""Progress of an analysis, counted in curvature-matrix products (moves within seconds).

A :func:`hessrank.progress.progress` reporter over the products: a tqdm bar on a terminal,
plain lines ``analyze: 120/400 products (30%), 25 s, ~1 min left, round 5 server+clients``
elsewhere. :class:`CountingOperator` wraps an operator so that every ``matmat`` advances it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hessrank.progress import progress

__all__ = ["CountingOperator", "Progress"]


class Progress:
    """Products done out of an estimated total (the total grows if an estimator spends more,
    as with ``rtol``)."""

    def __init__(self, total: int, *, enabled: bool = True, desc: str = "analyze") -> None:
        self.total, self.done = max(int(total), 0), 0
        self._bar = progress(total=self.total, desc=desc, unit="product", disable=not enabled)

    def at(self, where: str) -> None:
        """Say what is being computed (round, group)."""
        self._bar.set_postfix_str(where, refresh=False)

    def advance(self, n: int) -> None:
        self.done += int(n)
        if self.done > self.total:
            self.total = self._bar.total = self.done
        self._bar.update(int(n))

    def close(self) -> None:
        self._bar.close()


class CountingOperator:
    """An operator that reports each ``matmat`` of V (J, p, k) as J·k products."""

    def __init__(self, op: Any, progress: Progress) -> None:
        self.op, self.progress = op, progress

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.op.shape

    @property
    def dtype(self):
        return self.op.dtype

    @property
    def device(self):
        return self.op.device

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def matmat(self, V: Tensor) -> Tensor:
        out = self.op.matmat(V)
        self.progress.advance(V.shape[0] * V.shape[-1])
        return out
