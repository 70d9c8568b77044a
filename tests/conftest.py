"""Shared fixtures. Tests run under pytest-xdist with two workers: one torch thread each.

Session guard: every process a test left running (a Ray daemon, a worker pool, a subprocess
that outlived its test) is terminated when the session ends, in each xdist worker and in the
controller, and named in a warning line; an orphan must never keep the suite (and CI) from
exiting. A hung test itself is ended by pytest-timeout (``timeout`` in pyproject.toml).
"""

from __future__ import annotations

import os
import warnings

import psutil
import torch

torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001 (pytest's hook)
    """Terminate (then kill) the processes this session's tests left behind (in an xdist
    worker, or in a session without xdist; the xdist controller's children are its workers)."""
    if session.config.pluginmanager.has_plugin("dsession"):
        return
    left = psutil.Process(os.getpid()).children(recursive=True)
    if not left:
        return
    names = ", ".join(sorted({p.name() for p in left if p.is_running()}))
    warnings.warn(f"tests left {len(left)} process(es) running ({names}); terminated", stacklevel=1)
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
