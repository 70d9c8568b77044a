"""Batch spectral analysis of a training trajectory, resumable and traceable (docs/design.md,
analysis).

For each saved round and each *group* of subjects (:mod:`hessrank.analysis.subjects`) one
stacked operator is built — server and clients together as one federated operator, the D draws
of a subset size as a stack — and each estimator family of the requested quantities
(:mod:`hessrank.analysis.quantities`) runs once on it. A *unit* is one (round, group, family);
its key hashes what was analyzed (run fingerprint, checkpoint bytes, the subjects' data, user
code) and the settings (:mod:`hessrank.analysis.planner`), and its rows are committed to the
store (:mod:`hessrank.analysis.store`) in one transaction and upserted into one table that
only grows. Killing the analysis at any moment and rerunning completes the table with no
duplicate and no lost row; a changed run, checkpoint or model factory is recomputed, never
reused; a checkpoint that is not the run's is refused. A checkpoint that cannot be loaded, or
a unit whose estimate fails, is warned about, listed in ``out/errors.csv`` and skipped.

Same command, same bits: on one machine, with the same thread count and device, rerunning a
command gives a bit-identical table (``seconds`` aside). Every random draw is seeded by
``seed``, and the product route is what the operator's deterministic rule chose (no timing;
reported in the ``route`` column). Versions, revision, threads, device, dtype, routes, the
command and the start/end times of every call are in ``out/analysis.json``.

How the units run is the executor's business (:mod:`hessrank.analysis.executor`): in this
process (``--shard I/N``: a slice), in a local pool (``--workers N``), or on every rank of a
``torchrun`` launch with each subject's data sharded and products all-reduced; only rank 0
writes. None of them changes a number.

Example:
    >>> table = analyze("runs/x", rounds="0:50:10", subjects="server,clients")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hessrank.analysis.executor import executor_for
from hessrank.analysis.quantities import QUANTITIES, parse_quantities
from hessrank.analysis.settings import AnalysisSettings
from hessrank.analysis.sources import StateDictDir, load_factory, select_rounds
from hessrank.analysis.store import COLUMNS

__all__ = [
    "COLUMNS",
    "QUANTITIES",
    "AnalysisSettings",
    "StateDictDir",
    "analyze",
    "load_factory",
    "parse_quantities",
    "run_analysis",
    "select_rounds",
]


def analyze(run_dir: str | Path, *, out: str | Path | None = None,
            command: Sequence[str] | None = None, **settings: Any) -> pd.DataFrame:
    """Estimate curvature quantities of every subject at every selected round (module doc).

    Args:
        run_dir: a hessrank run directory, or (with ``model_factory``) a folder of checkpoints
            of another trainer (:class:`hessrank.analysis.sources.CheckpointDir`).
        out: the analysis directory (default ``run_dir/analysis``; ``""`` is refused).
        command: the command line to record (default ``sys.argv``).
        **settings: the fields of :class:`~hessrank.analysis.settings.AnalysisSettings`
            (rounds, subjects, quantities, matvecs, seed, curvature, rtol, params, batch_size,
            dtype, device, mode, density_probes, density_steps, alignment_ranks,
            model_factory, data, loss, dataset, clients, data_root, threads, progress, force,
            prune, shard, workers).
    Returns:
        The rows this call selected (its rounds, subjects and quantities), columns
        :data:`~hessrank.analysis.store.COLUMNS`; the directory's table
        (``out/results.parquet``) is the union of every call's. ``table.attrs["errors"]``
        lists failed units (also in ``out/errors.csv``), ``table.attrs["out"]`` the directory.
    """
    return run_analysis(run_dir, AnalysisSettings.build(**settings), out=out, command=command)


def run_analysis(run_dir: str | Path, settings: AnalysisSettings, *,
                 out: str | Path | None = None,
                 command: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`analyze` with typed settings."""
    s = settings.validate()
    return executor_for(s).run(run_dir, s, out=out, command=command)
