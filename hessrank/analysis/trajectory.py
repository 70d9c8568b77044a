"""Batch spectral analysis of a training trajectory, resumable and traceable (docs/design.md §6).

For each saved round and each *group* of subjects (:mod:`hessrank.analysis.subjects`) one
stacked operator is built — server and clients together as one federated operator, the D draws
of a subset size as a stack — and each estimator family of the requested quantities
(:mod:`hessrank.analysis.quantities`) runs once on it. A *unit* is one (round, group, family);
its key hashes what was analyzed (run fingerprint, checkpoint bytes, the subjects' data) and
the settings, and its rows are committed atomically to the store
(:mod:`hessrank.analysis.store`) and upserted into one table that only grows. Killing the
analysis at any moment and rerunning completes the table with no duplicate and no lost row; a
changed run or checkpoint is recomputed, never reused. A checkpoint that cannot be loaded, or
a unit whose estimate fails, is warned about, listed in ``out/errors.csv`` and skipped.

Same command, same bits: on one machine, with the same thread count and device, rerunning a
command gives a bit-identical table (``seconds`` aside). Every random draw is seeded by
``seed``, and the product route is what the operator's deterministic rule chose (no timing;
reported in the ``route`` column). Versions, revision, threads, device, dtype, routes, the
command and the start/end times of every call are in ``out/analysis.json``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same units on its shard of each
subject's data and the products are all-reduced (:mod:`~hessrank.analysis.distributed`); only
rank 0 writes. ``--shard I/N`` and ``--workers N`` split the units instead.

Modules: :mod:`~hessrank.analysis.settings` (what to compute, validated in one place),
:mod:`~hessrank.analysis.sources` (what is analyzed), :mod:`~hessrank.analysis.quantities`
(quantity → estimator → rows), :mod:`~hessrank.analysis.store` (units, table, provenance).

Example:
    >>> table = analyze("runs/x", rounds="0:50:10", subjects="server,clients")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hessrank.analysis.alignment import gradient_alignment
from hessrank.analysis.distributed import Ranks, from_environment, launched_world
from hessrank.analysis.progress import CountingOperator, Progress
from hessrank.analysis.quantities import (
    QUANTITIES,
    estimate,
    parse_quantities,
    quantity_rows,
)
from hessrank.analysis.settings import AnalysisSettings, digest, probe_seed
from hessrank.analysis.sources import (
    StateDictDir,
    data_hash,
    load_factory,
    open_source,
    select_rounds,
)
from hessrank.analysis.store import COLUMNS, Store, check_out_dir
from hessrank.analysis.subjects import (
    Subject,
    SubjectGroup,
    build_operator,
    parse_subjects,
    realize,
)

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


@dataclass(frozen=True)
class _Unit:
    round: int
    label: str  # group label, or "alignment"
    family: str  # "lanczos", "density" or "alignment"
    group: SubjectGroup | None
    key: str
    settings: str  # hash of the family's settings (the ``settings`` column)
    checkpoint: str


# ---- public entry points ----------------------------------------------------------------------
def analyze(run_dir: str | Path, *, out: str | Path | None = None,
            command: Sequence[str] | None = None, **settings: Any) -> pd.DataFrame:
    """Estimate curvature quantities of every subject at every selected round (module doc).

    Args:
        run_dir: a hessrank run directory, or (with ``model_factory``) a directory of
            ``state_dict`` files.
        out: the analysis directory (default ``run_dir/analysis``).
        command: the command line to record (default ``sys.argv``).
        **settings: the fields of :class:`~hessrank.analysis.settings.AnalysisSettings`
            (rounds, subjects, quantities, matvecs, seed, curvature, rtol, params, batch_size,
            dtype, device, mode, density_probes, density_steps, alignment_ranks,
            model_factory, dataset, clients, data_root, threads, progress, force, prune).
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
    started = _now()
    s = settings.validate()
    if s.workers > 1 and launched_world() > 1:
        raise ValueError("--workers starts its own processes: under torchrun leave it out "
                         "(--shard is fine)")
    if s.workers > 1:
        return _run_pool(run_dir, s, out=out, command=command)
    ranks = from_environment(s.device)
    try:
        return _run(run_dir, s, ranks, out=out, command=command, started=started)
    finally:
        if ranks is not None:
            ranks.close()


def _run(run_dir, s: AnalysisSettings, ranks: Ranks | None, *, out, command,
         started: str) -> pd.DataFrame:
    """One process's analysis (one rank's, under torchrun: only rank 0 writes)."""
    writer = ranks is None or ranks.writer
    run_dir = Path(run_dir)
    qs = parse_quantities(s.quantities)
    specs = parse_subjects(s.subjects)
    source = open_source(run_dir, s)
    if not source.rounds():
        raise ValueError(f"{run_dir} has no saved checkpoints to analyze; train with "
                         "save_every > 0 or point at the run's directory")
    chosen = select_rounds(s.rounds, source.rounds())
    client_data = source.client_data()
    test = source.test() if any(sp.kind == "test" for sp in specs) else None
    groups = realize(specs, client_data=client_data, test=test, seed=s.seed)
    loss_fn = source.task()
    _check_params(source, chosen, s.params)
    out = Path(out) if out is not None else run_dir / "analysis"
    if writer:
        check_out_dir(out)  # the first write: everything above is validation

    store = Store(out, lock_timeout=s.lock_timeout) if writer else None
    hashes = _data_hashes(groups, client_data)
    fingerprint = source.fingerprint()
    errors: list[dict[str, Any]] = []
    units = _plan(source, chosen, groups, qs, s, fingerprint, hashes, errors)
    if s.shard is not None:
        units = _shard(units, *s.shard)
    call = {"started": started, "finished": None, "command": list(command or sys.argv),
            "settings": s.to_json(), "environment": _environment(s, source, ranks),
            "routes": {},
            "settings_hashes": {u.family: u.settings for u in units},
            "units": len(units), "computed": 0, "reused": 0, "errors": []}
    index = None if store is None else store.open(
        {"fingerprint": fingerprint, "path": str(source.path.resolve()), "kind": source.kind},
        call, force=s.force)

    old_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    done = {"routes": {}, "computed": 0, "reused": 0, "status": "interrupted"}
    try:
        frames = _execute(store, source, units, qs, s, client_data, loss_fn, hashes, errors,
                          done, ranks)
        done["status"] = "complete" if not errors else "complete with errors"
    finally:
        torch.set_num_threads(old_threads)
        if store is not None:
            store.update_call(index, finished=_now(), **done,
                              errors=[e["error"] for e in errors])
    table = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=COLUMNS))
    order = {u.key: i for i, u in enumerate(units)}
    table = table.assign(_o=table["unit"].map(order)).sort_values("_o", kind="stable")
    table = table.drop(columns="_o").reset_index(drop=True)
    table.attrs["errors"] = errors
    table.attrs["out"] = str(out)
    table.attrs["rank"] = 0 if ranks is None else ranks.rank
    return table


def _execute(store: Store | None, source, units: list[_Unit], qs: list[str],
             s: AnalysisSettings, client_data, loss_fn, hashes: dict[str, str],
             errors: list[dict[str, Any]], done: dict[str, Any],
             ranks: Ranks | None = None) -> list[pd.DataFrame]:
    """Reuse the units already in the store, compute the others round by round (committing
    each), prune if asked; returns the selected rows of every unit. ``done`` collects the
    routes and counts for analysis.json. Under torchrun (``ranks``) rank 0 alone has the
    store (the others: None) and its choice of units to compute is broadcast to all ranks."""
    wanted = _table_quantities(qs)
    frames: list[pd.DataFrame] = []
    reused: list[pd.DataFrame] = []
    todo: dict[int, list[_Unit]] = {}
    compute = []
    for u in units:
        rows = None if store is None else store.unit_rows(u.key)
        if rows is None:
            compute.append(u.key)
        else:
            reused.append(rows[rows["quantity"].isin(wanted)])
    if ranks is not None:
        compute = ranks.broadcast(compute)
    keys = set(compute)
    for u in units:
        if u.key in keys:
            todo.setdefault(u.round, []).append(u)
    if store is not None:
        store.merge(reused)
    frames.extend(reused)
    done["reused"] = len(reused)
    progress = Progress(sum(_products(u, s) for us in todo.values() for u in us),
                        enabled=s.progress and store is not None)
    try:
        for r in sorted(todo):
            progress.at(f"round {r}")
            try:
                model = source.load_model(r).to(s.device)
            except (ValueError, OSError, RuntimeError) as err:
                _fail(store, errors, r, todo[r], source, err)
                progress.advance(sum(_products(u, s) for u in todo[r]))
                continue
            for u in todo[r]:
                progress.at(f"round {r} {u.label} {u.family}")
                try:
                    rows, dens, route = _compute(u, model, loss_fn, client_data, s, hashes,
                                                 progress, ranks)
                except (ValueError, FloatingPointError, RuntimeError) as err:
                    _fail(store, errors, r, [u], source, err)
                    continue
                done["routes"][f"{u.label}/{u.family}"] = json.loads(route)
                frame = pd.DataFrame(rows, columns=COLUMNS)
                selected = frame[frame["quantity"].isin(wanted)]
                if store is not None:
                    store.commit(u.key, frame, selected, dens)
                frames.append(selected)
                done["computed"] += 1
        if store is not None:
            if s.prune:
                store.prune({u.key for u in units})
            store.write_errors(errors)
    finally:
        progress.close()
    return frames


# ---- planning ---------------------------------------------------------------------------------
def _check_params(source, rounds: list[int], params: Sequence[str] | None) -> None:
    """Unknown parameter names are an error before any work (checked on the first round whose
    model loads; a round that does not load is reported when it is analyzed)."""
    if not params:
        return
    for r in rounds:
        try:
            model = source.load_model(r)
        except (ValueError, OSError, RuntimeError):
            continue
        named = [n for n, p in model.named_parameters() if p.requires_grad]
        bad = [p for p in params if p not in named]
        if bad:
            raise ValueError(f"unknown parameter {bad[0]!r} in --params; valid names: "
                             f"{', '.join(named)}")
        return


def _data_hashes(groups: list[SubjectGroup], client_data) -> dict[str, str]:
    """Per subject name, the hash of its data (the server's: of every client's, in order)."""
    clients = [data_hash(x, y) for x, y in client_data]
    out = {"server": digest(clients), "clients": digest(clients)}
    out.update({f"client{c}": h for c, h in enumerate(clients)})
    for g in groups:
        for subj in g.subjects:
            if subj.name not in out and subj.data is not None:
                out[subj.name] = data_hash(*subj.data)
    return out


def _table_quantities(qs: list[str]) -> set[str]:
    return {name for q in qs for name in QUANTITIES[q].produces}


def _plan(source, rounds, groups, qs, s: AnalysisSettings, fingerprint, hashes,
          errors) -> list[_Unit]:
    families = [f for f in ("lanczos", "density") if any(QUANTITIES[q].family == f for q in qs)]
    fam_hash = {f: digest(s.family_settings(f)) for f in (*families, "alignment")}
    units: list[_Unit] = []
    for r in rounds:
        try:
            ckpt = source.checkpoint_hash(r)
        except (OSError, ValueError, KeyError) as err:
            errors.append({"round": r, "unit": "*", "path": "", "error": str(err)})
            continue
        for g in groups:
            names = [subj.name for subj in g.subjects]
            for f in families:
                key = digest({"run": fingerprint, "checkpoint": ckpt, "round": r,
                              "group": g.label, "subjects": names,
                              "data": [hashes[n] for n in names], "settings": fam_hash[f]})
                units.append(_Unit(r, g.label, f, g, key, fam_hash[f], ckpt))
        if "alignment" in qs:
            key = digest({"run": fingerprint, "checkpoint": ckpt, "round": r,
                          "group": "alignment", "data": hashes["clients"],
                          "settings": fam_hash["alignment"]})
            units.append(_Unit(r, "alignment", "alignment", None, key, fam_hash["alignment"],
                               ckpt))
    return units


def _shard(units: list[_Unit], i: int, n: int) -> list[_Unit]:
    """The i-th (1-based) of n slices: (round, group) pairs in plan order, round-robin."""
    pairs = list(dict.fromkeys((u.round, u.label) for u in units))
    mine = {pair for k, pair in enumerate(pairs) if k % n == i - 1}
    return [u for u in units if (u.round, u.label) in mine]


def _run_pool(run_dir, s: AnalysisSettings, *, out, command) -> pd.DataFrame:
    """``workers`` processes, worker k running shard k/workers with its share of threads,
    all writing into the one locked store; the rows of every shard, in plan order. This
    process is worker 1 (its imports are paid already: a spawned worker's start-up costs
    seconds), the others are spawned."""
    import concurrent.futures
    import dataclasses
    import multiprocessing

    n = s.workers
    threads = max(1, (s.threads or torch.get_num_threads()) // n)
    jobs = [dataclasses.replace(s, workers=1, shard=(k, n), threads=threads, progress=False)
            for k in range(1, n + 1)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n - 1, mp_context=ctx) as pool:
        futures = [pool.submit(run_analysis, run_dir, job, out=out, command=command)
                   for job in jobs[1:]]
        tables = [run_analysis(run_dir, jobs[0], out=out, command=command)]
        tables += [f.result() for f in futures]
    errors = [e for t in tables for e in t.attrs.get("errors", [])]
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(["round"], kind="stable").reset_index(drop=True)
    table.attrs["errors"] = errors
    table.attrs["out"] = tables[0].attrs["out"]
    return table


def _products(u: _Unit, s: AnalysisSettings) -> int:
    """Estimated products of a unit (for the progress total)."""
    J = 1 if u.group is None else max(u.group.index) + 1
    if u.family == "lanczos":
        return J * s.matvecs
    if u.family == "density":
        return J * s.density_probes * (s.density_steps or s.matvecs)
    return 1


# ---- computing one unit -------------------------------------------------------------------------
def _operator_kwargs(s: AnalysisSettings) -> dict[str, Any]:
    return {"params": list(s.params) if s.params else None, "mode": s.mode,
            "batch_size": s.batch_size, "cache_budget_mb": float(s.memory_mb)}


def _build(u: _Unit, model: nn.Module, loss_fn, s: AnalysisSettings, ranks: Ranks | None):
    """The unit's operator; under torchrun on this rank's shard, all-reduced over the ranks."""
    kw = _operator_kwargs(s)
    if ranks is not None:
        kw.update(shard=(ranks.rank, ranks.world), process_group=True)
    return build_operator(u.group, model, loss_fn, curvature=s.curvature, **kw)


def route_of(op: Any, j: int | None = None) -> dict[str, Any]:
    """The product route an operator reports (``route``, else ``settings``). A stack of
    operators: operator ``j``'s route with ``"stack": J``; without ``j`` the shared route with
    ``"stack": J`` when all J agree, else ``{"stack": [each route]}``."""
    route = getattr(op, "route", None)
    if route is None and hasattr(op, "operators"):
        ops = op.operators
        if j is not None:
            return {**route_of(ops[j]), "stack": len(ops)}
        routes = [route_of(o) for o in ops]
        if all(r == routes[0] for r in routes):
            return {**routes[0], "stack": len(ops)}
        return {"stack": routes}
    if route is None:
        route = getattr(op, "settings", None)
    return dict(route) if isinstance(route, dict) else {}


def _compute(u: _Unit, model, loss_fn, client_data, s: AnalysisSettings, hashes,
             progress: Progress, ranks: Ranks | None = None):
    """Rows (all quantities of the family), densities and the route of one unit."""
    rtol = float("nan") if s.rtol is None else float(s.rtol)
    if u.family == "alignment":
        t0 = time.perf_counter()
        layers = None
        if s.params:
            named = dict(model.named_parameters())
            layers = [n for n in s.params if named[n].ndim >= 2]
        table = gradient_alignment(model, loss_fn, client_data, ranks=list(s.alignment_ranks),
                                   layers=layers, mode=s.mode, batch_size=s.batch_size)
        dt = time.perf_counter() - t0
        progress.advance(1)
        subj = Subject("clients", "client", sum(int(y.shape[0]) for _, y in client_data))
        base = _base(u, subj, hashes["clients"], s, rtol, "{}")
        rows = [{**base, "quantity": "alignment", "k": int(t.rank), "layer": str(t.layer),
                 "value": float(t.value), "stderr": float(t.stderr), "matvecs": 0,
                 "seconds": dt} for t in table.itertuples()]
        return rows, None, "{}"
    op = _build(u, model, loss_fn, s, ranks)
    seed = probe_seed(s.seed, u.round, f"{u.family}:{u.label}")
    t0 = time.perf_counter()
    res = estimate(u.family, CountingOperator(op, progress), matvecs=s.matvecs, seed=seed,
                   rtol=s.rtol, max_matvecs=s.max_matvecs, density_probes=s.density_probes,
                   density_steps=s.density_steps)
    dt = time.perf_counter() - t0
    route = json.dumps(route_of(op), sort_keys=True, default=str)
    names = [q for q in QUANTITIES if QUANTITIES[q].family == u.family]
    per_op = quantity_rows(names, res)
    rows, dens = [], None
    for subj, j in zip(u.group.subjects, u.group.index):
        own = json.dumps(route_of(op, j), sort_keys=True, default=str)  # this subject's
        base = {**_base(u, subj, hashes[subj.name], s, rtol, own), "seed": seed}
        rows.extend({**base, **r, "layer": "", "seconds": dt} for r in per_op[j])
    if u.family == "density":
        d = res.density
        dens = {subj.name: (np.asarray(d.alpha[j]), np.asarray(d.beta[j]), d.dim,
                            d.num_matvecs, d.seed)
                for subj, j in zip(u.group.subjects, u.group.index)}
    return rows, dens, route


def _base(u: _Unit, subj: Subject, data: str, s: AnalysisSettings, rtol: float,
          route: str) -> dict[str, Any]:
    return {"round": int(u.round), "subject": subj.name, "subject_kind": subj.kind,
            "subject_size": int(subj.size), "seed": int(s.seed),
            "data_seed": int(subj.data_seed), "curvature": s.curvature, "rtol": rtol,
            "checkpoint": u.checkpoint, "data": data, "settings": u.settings, "unit": u.key,
            "route": route}


def _fail(store: Store | None, errors, r: int, units: list[_Unit], source,
          err: Exception) -> None:
    path = _safe_path(source, r)
    warnings.warn(f"round {r}, {', '.join(sorted({u.label for u in units}))}: {err}",
                  stacklevel=3)
    errors.extend({"round": r, "unit": u.label, "path": path, "error": str(err)} for u in units)
    if store is not None:
        store.write_errors(errors)


def _safe_path(source, r: int) -> str:
    try:
        return str(source.checkpoint_path(r))
    except (ValueError, KeyError):
        return ""


# ---- provenance -------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        p = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def _environment(s: AnalysisSettings, source, ranks: Ranks | None = None) -> dict[str, Any]:
    import hessrank

    return {"hessrank": hessrank.__version__, "git_revision": _git_revision(),
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": s.threads if s.threads is not None else torch.get_num_threads(),
            "device": s.device, "dtype": (s.dtype or source.native_dtype).replace("torch.", ""),
            "world_size": 1 if ranks is None else ranks.world}
