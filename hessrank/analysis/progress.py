"""Progress of an analysis, counted in Hessian-vector products (moves within seconds).

On a terminal: a tqdm bar over the products. Otherwise (a log file, a pipe, a job array):
plain lines ``analyze: 120/400 products (30%), round 5 server+clients, 25 s`` at the start,
every ``interval`` seconds, and a last ``analyze: done, ...`` line — no carriage returns.
:class:`CountingOperator` wraps an operator so that every ``matmat`` advances the count.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from torch import Tensor

__all__ = ["CountingOperator", "Progress"]


class Progress:
    """Products done out of an estimated total (the total grows if an estimator spends more,
    as with ``rtol``)."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None,
                 interval: float = 10.0, desc: str = "analyze") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.interval = enabled, interval
        self.total, self.done = max(int(total), 0), 0
        self.desc, self.where = desc, ""
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="product", file=self.stream,
                             dynamic_ncols=True)
        elif enabled:
            self._line()

    def at(self, where: str) -> None:
        """Say what is being computed (round, group)."""
        self.where = where
        if self._bar is not None:
            self._bar.set_postfix_str(where, refresh=False)

    def advance(self, n: int) -> None:
        self.done += int(n)
        if self.done > self.total:
            self.total = self.done
            if self._bar is not None:
                self._bar.total = self.total
        if self._bar is not None:
            self._bar.update(int(n))
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._line()

    def _line(self, final: bool = False) -> None:
        self._last = time.monotonic()
        dt = self._last - self.t0
        if final:
            text = f"{self.desc}: done, {self.done} products in {dt:.0f} s"
        else:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            where = f", {self.where}" if self.where else ""
            text = (f"{self.desc}: {self.done}/{self.total} products ({pct:.0f}%){where}, "
                    f"{dt:.0f} s")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._line(final=True)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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
