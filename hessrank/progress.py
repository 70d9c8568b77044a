"""Progress reporting that suits where the output goes: a tqdm bar on a terminal or in a
notebook, a plain line every few seconds in a log file or a pipe.

A tqdm bar written to a file is a wall of carriage returns; :func:`progress` returns tqdm only
when the stream is a terminal (or the code runs in a Jupyter kernel), and otherwise a
:class:`LineProgress` that prints ``desc: 3/22 units (14%), 41 s, ~4.5 min left, round=5``
at most every ``every`` seconds, plus a last line when it closes. Both share the part of the
tqdm interface the package uses: iteration, ``update``, ``set_postfix``, ``set_description``,
``write``, ``close`` and use as a context manager.

Example:
    >>> for x in progress(range(3), desc="demo", disable=True):
    ...     pass
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["LineProgress", "progress"]


def _in_notebook() -> bool:
    """A Jupyter kernel is running this process (tqdm.auto then draws a widget)."""
    return "ipykernel" in sys.modules


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """tqdm's interface, printed as a plain line at most every ``every`` seconds.

    Args:
        iterable: what to iterate over (optional; otherwise call :meth:`update`).
        total: number of steps (default ``len(iterable)`` when it has one).
        desc: label at the start of each line.
        unit: what a step is called (``"unit"``, ``"round"``).
        every: seconds between lines: one at the start, then at the first finished step after
            each ``every`` seconds, and a last one when the reporter closes.
        file: stream for the lines (default: ``sys.stderr`` at creation).
        disable: print nothing.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", every: float = 10.0,
                 file: IO[str] | None = None, disable: bool = False) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.file = sys.stderr if file is None else file
        self.disable = disable
        self.n = 0
        self.postfix = ""
        self.start = time.monotonic()
        self.last_print = self.start
        self.closed = False
        self._print(self.line())  # at once: the job has started and how big it is

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress made without an iterable is driven by update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return 0 if self.total is None else self.total

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        """The status line as it would be printed now."""
        elapsed = time.monotonic() - self.start
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.n}/{self.total} {self.unit}s" if self.total else f"{self.n} {self.unit}s"
        parts = [head + count]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(_duration(elapsed))
        if self.total and 0 < self.n < self.total:
            parts.append(f"~{_duration(elapsed / self.n * (self.total - self.n))} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self, text: str) -> None:
        if not self.disable:
            print(text, file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished steps; print a line if ``every`` seconds have passed."""
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= self.every:
            self.last_print = now
            self._print(self.line())

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        """Append ``key=value`` pairs to the following lines (numbers rounded as tqdm does)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, s: str) -> None:
        """Print a message line (tqdm.write's counterpart)."""
        self._print(s)

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed by :meth:`update` and :meth:`close`."""

    def close(self) -> None:
        """Print the final line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.n:
            self._print(self.line())


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
             *, unit: str = "it", disable: bool = False, every: float = 10.0,
             file: IO[str] | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress reporter over ``iterable`` (or driven by ``update``) that suits the stream.

    On a terminal, or in a Jupyter kernel, this is ``tqdm.auto.tqdm(iterable, total=total,
    desc=desc, unit=unit, disable=disable, file=file, **tqdm_kwargs)``; otherwise (a log
    file, a pipe, CI) a :class:`LineProgress` printing a plain line at most every ``every``
    seconds. tqdm is imported only when a bar is drawn.

    Args:
        iterable: what to iterate over, or ``None`` to drive it with ``update(n)``.
        total: number of steps (default ``len(iterable)`` when it has one).
        desc: label shown before the count.
        unit: what a step is called.
        disable: show nothing (the iterable is passed through).
        every: seconds between plain lines when not on a terminal.
        file: output stream (default ``sys.stderr``).
        **tqdm_kwargs: passed to tqdm only (e.g. ``leave=False``).
    Returns:
        An object with tqdm's ``__iter__``, ``update``, ``set_postfix``, ``set_description``,
        ``write`` and ``close``, usable as a context manager.
    """
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if _in_notebook() or (callable(isatty) and isatty()):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file,
                    **tqdm_kwargs)  # fmt: skip
    return LineProgress(iterable, total=total, desc=desc, unit=unit, every=every, file=stream,
                        disable=disable)  # fmt: skip
