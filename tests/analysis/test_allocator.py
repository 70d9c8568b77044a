"""The ``hessrank`` command's allocator setting (hessrank.allocator): applied by the command,
not by importing the library; left alone where the user chose; large buffers come from the
heap; results bit-identical; recorded with the analysis."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's")

# after tune_for_autograd, a 64 MiB buffer is heap memory (no mmap'd block), and freeing it
# keeps it with the process; glibc's defaults mmap it
PROBE = """
import ctypes, sys, torch
from hessrank import allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tune":
    print(allocator.tune_for_autograd())
x = torch.ones(16 * 2**20)  # 64 MiB
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(during.hblkhd >= 2**26, after.fordblks >= 2**26)
"""


def _python(code: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "HESSRANK_ALLOCATOR"}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120, check=True)
    return p.stdout.strip().splitlines()


@glibc
def test_the_tuned_allocator_serves_large_buffers_from_the_heap():
    described, effect = _python(PROBE, "tune")
    assert described.startswith("glibc, M_MMAP_MAX=0")
    assert effect == "False True"  # no mmap'd block while alive, the heap keeps it after
    (default,) = _python(PROBE, "import-only")
    assert default.startswith("True")  # glibc's defaults: a fresh mmap (page faults) each time


@glibc
@pytest.mark.parametrize("env, reason", [
    ({"HESSRANK_ALLOCATOR": "system"}, "system (HESSRANK_ALLOCATOR=system)"),
    ({"MALLOC_ARENA_MAX": "2"}, "system (the environment sets MALLOC_ARENA_MAX)"),
    ({"LD_PRELOAD": "libjemalloc-not-there-malloc.so"}, "LD_PRELOAD replaces the allocator"),
])
def test_a_users_choice_is_left_alone(env, reason):
    code = ("from hessrank import allocator; print(allocator.tune_for_autograd()); "
            "import os; print(os.environ.get('HESSRANK_ALLOCATOR'))")
    described, marker = _python(code, **env)
    assert reason in described
    assert marker == env.get("HESSRANK_ALLOCATOR", "None")


def test_importing_the_library_changes_nothing():
    code = "import hessrank, hessrank.analysis, hessrank.cli, os; " \
           "print(os.environ.get('HESSRANK_ALLOCATOR'))"
    assert _python(code) == ["None"]


@glibc
@pytest.mark.slow
def test_the_command_tunes_and_the_table_keeps_its_bits(trained_run, tmp_path):
    tables = {}
    for mode in ("tuned", "system"):
        out = tmp_path / mode
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith("MALLOC_") and k != "HESSRANK_ALLOCATOR"},
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if mode == "system":
            env["HESSRANK_ALLOCATOR"] = "system"
        subprocess.run([sys.executable, "-m", "hessrank", "analyze", str(trained_run),
                        "--subjects", "server,clients,subset:10x2", "--quantities",
                        "stable-rank", "--matvecs", "10", "--threads", "1", "--out", str(out),
                        "--quiet"], env=env, check=True, capture_output=True, timeout=240)
        call = json.loads((out / "analysis.json").read_text())["calls"][-1]
        recorded = call["environment"]["allocator"]
        assert recorded.startswith("glibc, M_MMAP_MAX=0" if mode == "tuned" else "system (")
        tables[mode] = pd.read_parquet(out / "results.parquet").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(tables["tuned"], tables["system"])
