"""glibc's allocator set for autograd's large short-lived buffers (the ``hessrank`` command).

On Linux with glibc, every allocation above the mmap threshold (at most 32 MiB) is a fresh
``mmap``: the kernel zeroes each of its pages on first touch and ``munmap`` hands them back at
free. A Hessian-vector product through a kept graph allocates and frees buffers of the same
sizes at every product (a language model's logits over a client's sequences are tens of MiB),
so the process pays a page fault per 4 KiB per product. Measured on a Shakespeare FedLoRU
checkpoint (20 clients + server, adapters Hessian, 10 products, one thread): 115 s wall, of
which 57 s in the kernel, with glibc's defaults; 57 s wall, 5 s in the kernel, with
:func:`tune_for_autograd`. The allocator never touches arithmetic: the tables are
bit-identical.

:func:`tune_for_autograd` calls ``mallopt`` so that large blocks come from the heap and are
reused (``M_MMAP_MAX`` = 0), freed memory stays with the process (``M_TRIM_THRESHOLD`` =
2 GiB) and the heap grows in steps of ``M_TOP_PAD`` = 256 MiB. The price: the resident memory
of the process stays near its peak until it exits, which is why the ``hessrank`` command
(:func:`hessrank.cli.run`) does this and importing the library does not.

It leaves glibc alone where the user chose: any ``MALLOC_*`` tunable or an ``LD_PRELOAD``ed
allocator in the environment, or ``HESSRANK_ALLOCATOR=system``. The choice travels in
``HESSRANK_ALLOCATOR`` (set to ``tuned`` once applied, so child processes such as
``torchrun`` workers apply it too) and is recorded with every analysis (:func:`describe`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ENV", "SETTINGS", "describe", "inherit", "tune_for_autograd"]

ENV = "HESSRANK_ALLOCATOR"
"""Environment variable: ``system`` keeps glibc's defaults; ``tuned`` once applied."""

SETTINGS = {"M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 2**31 - 1),
            "M_TOP_PAD": (-2, 256 * 2**20)}
"""mallopt parameter name → (glibc's parameter number, value)."""


def _user_choice() -> str | None:
    """Why the allocator is left alone, or None."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return f"{ENV}=system"
    tunables = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if tunables:
        return f"the environment sets {', '.join(tunables)}"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "LD_PRELOAD replaces the allocator"
    return None


def tune_for_autograd() -> str:
    """Apply :data:`SETTINGS` through glibc's ``mallopt`` (module doc) unless the user chose
    otherwise or the C library is not glibc; returns what :func:`describe` will record."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return describe()
    if _user_choice() is not None:
        return describe()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(number, value) == 1 for number, value in SETTINGS.values())
    except (OSError, AttributeError):
        ok = False
    if ok:
        os.environ[ENV] = "tuned"
    return describe()


def inherit() -> None:
    """In a spawned child process: apply the parent's choice (``HESSRANK_ALLOCATOR=tuned``),
    leave glibc's defaults otherwise."""
    if os.environ.get(ENV) == "tuned":
        tune_for_autograd()


def describe() -> str:
    """The allocator this process runs with, for the environment record of results."""
    if os.environ.get(ENV) == "tuned":
        return "glibc, " + ", ".join(f"{k}={v}" for k, (_, v) in SETTINGS.items())
    why = _user_choice()
    return f"system ({why})" if why else "system defaults"
