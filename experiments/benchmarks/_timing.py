"""Timing helpers shared by the benchmarks: interleaved repeats, medians, ratios, machine line.

Contenders are timed in rounds: every round runs each contender once, in an order rotated from
round to round, so slow drifts of the machine (thermal state, other tenants) hit all of them
alike. With a ``unit`` (e.g. one gradient), the unit is timed right before every contender and
each ratio is formed from that adjacent pair; the reported figure is the median over rounds of
the paired ratios. A timing is the mean of ``inner`` back-to-back calls, with ``inner`` fixed
once so that a timing lasts at least ``min_time`` seconds.

    >>> t = interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(3000))},
    ...                 unit="a", repeats=5, min_time=0.001)
    >>> 1.0 < t.ratio("b") < 10.0
    True
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def time_calls(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def calls_for(fn: Callable[[], object], min_time: float, max_inner: int = 10_000) -> int:
    """How many back-to-back calls make one timing last at least ``min_time`` seconds."""
    one = min(time_calls(fn, 1) for _ in range(3))
    return max(1, min(max_inner, int(min_time / max(one, 1e-9)) + 1))


def median(xs) -> float:
    return float(statistics.median(xs))


@dataclass(frozen=True)
class Timings:
    """Per-round seconds per call; ``unit_before[name]`` is the unit timed just before ``name``."""

    times: dict[str, list[float]]
    unit: str | None
    unit_before: dict[str, list[float]]

    def seconds(self, name: str) -> float:
        """Median seconds per call over rounds."""
        return median(self.times[name])

    def ratios(self, name: str) -> list[float]:
        """Per-round ratios time[name] / adjacent unit time."""
        if self.unit is None:
            raise ValueError("these timings have no unit; pass unit=... to interleaved()")
        if name == self.unit:
            return [1.0] * len(self.times[name])
        return [t / u for t, u in zip(self.times[name], self.unit_before[name])]

    def ratio(self, name: str) -> float:
        """Median over rounds of the paired ratio to the unit."""
        return median(self.ratios(name))

    def spread(self, name: str) -> tuple[float, float]:
        """(first, third) quartile of the per-round ratios: how stable the ratio was."""
        r = sorted(self.ratios(name))
        q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
        return q[0], q[2]


def interleaved(
    contenders: Mapping[str, Callable[[], object]],
    *,
    unit: str | None = None,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
) -> Timings:
    """Time every contender ``repeats`` times in rotated interleaved rounds (see module doc).

    Each contender is first called ``warmup`` times (caches, lazy setup, allocator).
    """
    names = list(contenders)
    if unit is not None and unit not in contenders:
        raise ValueError(f"unit {unit!r} is not a contender; contenders: {', '.join(names)}")
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    inner = {name: calls_for(contenders[name], min_time) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    unit_before: dict[str, list[float]] = {name: [] for name in names if name != unit}
    others = [n for n in names if n != unit]
    for r in range(repeats):
        k = r % len(others) if others else 0
        for name in others[k:] + others[:k]:
            if unit is not None:
                t_unit = time_calls(contenders[unit], inner[unit])
                times[unit].append(t_unit)
                unit_before[name].append(t_unit)
            times[name].append(time_calls(contenders[name], inner[name]))
    return Timings(times, unit, unit_before)


def machine_line(threads: int) -> str:
    """One line naming the machine and the torch build, for the top of a results file."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__}; "
        f"torch threads {threads}; python {platform.python_version()}"
    )


def busy_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by *other* work while this process sleeps (from /proc/stat; Linux)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals[:8]), idle

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return float("nan")
    total = t1 - t0
    return (os.cpu_count() or 1) * (total - (i1 - i0)) / max(total, 1)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "3.1 / 2.8 / 2.5" ("?" where unknown)."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table from a header and rows (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
