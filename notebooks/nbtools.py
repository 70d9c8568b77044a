"""What the five notebooks share: sizes, the federation they train when given no run, phases.

A notebook takes two papermill parameters, ``RUN_DIR`` (a run directory written by
``hessrank train``, or None) and ``SIZE`` ("full" or "smoke"). With ``RUN_DIR = None`` it trains
the FedLoRU digits federation of the paper figures (``experiments/figures/common.py``) at that
size — into ``runs/figures/<scale>/seed<SEED>/`` of the checkout, so a run made by
``make figures`` is reused — or under ``$HESSRANK_WORK`` when that is set (tests).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the figure pipeline's configs live in experiments/figures
    sys.path.insert(0, str(ROOT))

SIZES = ("smoke", "full")

ANALYSIS = {
    "smoke": {"matvecs": 12, "subset_sizes": (50, 200), "draws": 3, "alignment_ranks": (1, 2)},
    "full": {"matvecs": 40, "subset_sizes": (25, 50, 100, 200, 400, 800), "draws": 5,
             "alignment_ranks": (1, 2, 4, 8, 16)},
}
"""Analysis settings per size (estimator budget, subset sizes and draws, truncation ranks)."""


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"SIZE must be one of {SIZES}, got {size!r}")
    return size


def banner(size: str, run_dir) -> None:
    """Say what this execution is; a smoke run says its numbers are not to be read."""
    check_size(size)
    if size == "smoke":
        print("SMOKE RUN (SIZE='smoke'): tiny settings to check that the notebook runs; the "
              "numbers and verdicts below are NOT results.")
    else:
        print("Full run (SIZE='full').")
    print("run directory:", run_dir if run_dir is not None else "(trained by this notebook)")


def federation_config(algo: str, size: str, seed: int = 0) -> dict:
    """The digits federation of the paper figures (full) or its smoke version."""
    from experiments.figures.common import Scale, digits_config

    scale = Scale.full() if check_size(size) == "full" else Scale.fast()
    return digits_config(algo, scale, seed)


def work_dir(size: str, seed: int) -> Path:
    scale = "full" if size == "full" else "fast"
    base = os.environ.get("HESSRANK_WORK")
    root = Path(base) if base else ROOT / "runs" / "figures"
    return root / scale / f"seed{seed}"


def open_run(run_dir, size: str, seed: int = 0, algo: str = "fedloru"):
    """The run to study: ``run_dir`` when given, else the figures' federation trained (or
    resumed, or reused when finished) at ``size``."""
    from hessrank.fl.rundir import RunDir
    from hessrank.fl import train

    if run_dir is not None:
        return RunDir(run_dir)
    return train(federation_config(algo, size, seed), work_dir(size, seed) / f"digits_{algo}",
                 progress=False)


def sibling_run(base, algo: str, size: str, seed: int = 0):
    """The same federation as run ``base`` trained with another algorithm (reused when there):
    next to ``base`` as ``<base>_<algo>`` for a user's run, or the figures' run for ``algo``."""
    from hessrank.fl import train

    if base.config.algo == algo:
        return base
    cfg = base.config.to_dict()
    cfg["algo"] = algo
    return train(cfg, base.path.parent / f"{base.path.name}_{algo}", progress=False)


def phase(rounds) -> dict[int, str]:
    """Training phase of each saved round: early / middle / late by fraction of training
    (``hessrank.analysis.inference.default_phases``, the phases the verdicts use)."""
    from hessrank.analysis.inference import assign_phases, default_phases

    by_phase = assign_phases(rounds, default_phases())
    return {r: name for name, rs in by_phase.items() for r in rs}
