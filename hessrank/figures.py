"""``hessrank figures``: a thin wrapper that runs the paper-figure pipeline of a source checkout.

The pipeline (experiment configs, orchestration, figure statistics and plots) is an experiment,
not library code: it lives in ``experiments/figures/make_figures.py`` and runs as
``python experiments/figures/make_figures.py`` (``make figures``). This module only finds that
script next to the package (``<checkout>/experiments/figures``) and hands it the options; an
installed package without the checkout says where to get it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["pipeline_root", "register"]


def pipeline_root() -> Path:
    """The source checkout holding ``experiments/figures`` (the parent of the package)."""
    return Path(__file__).resolve().parents[1]


def _load_pipeline():
    root = pipeline_root()
    if not (root / "experiments" / "figures" / "make_figures.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("experiments.figures.make_figures")


def _missing(args: argparse.Namespace) -> int:
    raise FileNotFoundError(
        f"the figure pipeline lives in experiments/figures/ of a hessrank source checkout, "
        f"not found under {pipeline_root()}; clone the repository and run "
        f"`python experiments/figures/make_figures.py`")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``figures`` subcommand with the pipeline's own options."""
    help_text = "regenerate the paper figures from scratch"
    description = ("Train, analyze and plot every paper figure (runs "
                   "experiments/figures/make_figures.py of this source checkout).")
    pipeline = _load_pipeline()
    if pipeline is None:  # take any arguments (no option prefix), then say what is missing
        p = subparsers.add_parser("figures", help=help_text, description=description,
                                  prefix_chars="+", add_help=False)
        p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(func=_missing)
        return
    p = subparsers.add_parser("figures", allow_abbrev=False, help=help_text,
                              description=description)
    pipeline.add_arguments(p)
    p.set_defaults(func=pipeline.run)
