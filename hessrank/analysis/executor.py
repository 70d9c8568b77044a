"""Running an analysis plan: one interface, three ways (docs/design.md, analysis).

An :class:`Executor` turns (run directory, settings, ``out``) into the rows of one call:

- :class:`Serial`: this process computes the plan's units (``--shard I/N``: its slice only),
  round by round, loading each checkpoint once, committing each unit to the store
  (:mod:`hessrank.analysis.store`) as it finishes;
- :class:`Torchrun`: the same on every rank of a ``torchrun`` launch, each rank on its shard
  of every subject's data with products all-reduced (:mod:`hessrank.analysis.distributed`);
  rank 0 alone reads and writes the store and decides which units to compute;
- :class:`Pool`: ``--workers N`` — N processes, worker k a :class:`Serial` on shard k/N with
  its share of the threads, all writing into the one locked store (this process is worker 1:
  its imports are paid already; a spawned worker's start-up costs seconds).

None of them changes a number: a unit's rows depend only on its key's inputs. A unit is
computed by :class:`hessrank.analysis.units.UnitRunner`.

The steps of one process (:func:`open_call`, :func:`compute`, :func:`finish`): open the
source and check everything that needs the data (parameter names, client ids, subset sizes,
the checkpoints' identities) before the first write; plan (:func:`hessrank.analysis.planner.
plan`); reuse the units the store holds, compute the others; export the table once and
record the call (versions, threads, device, routes, counts, times) in ``analysis.json``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from hessrank.allocator import describe as describe_allocator
from hessrank.allocator import inherit as inherit_allocator
from hessrank.analysis.distributed import Ranks, from_environment, launched_world
from hessrank.analysis.planner import Plan, Unit, plan, thread_key
from hessrank.analysis.progress import Progress
from hessrank.analysis.quantities import (
    table_quantities,
)
from hessrank.analysis.settings import AnalysisSettings, digest
from hessrank.analysis.sources import (
    CheckpointMismatchError,
    Source,
    data_hash,
    open_source,
    select_rounds,
)
from hessrank.analysis.store import COLUMNS, Store, check_out_dir, refuse_empty
from hessrank.analysis.subjects import (
    SubjectGroup,
    parse_subjects,
    realize,
)
from hessrank.analysis.units import UnitRunner
from hessrank.curvature.params import select_params

__all__ = ["Call", "Executor", "Outcome", "Pool", "Serial", "Torchrun", "executor_for"]

Pair = tuple[Any, Any]


class Executor(Protocol):
    """Runs one analysis call; returns the rows it selected (columns :data:`COLUMNS`, plan
    order; ``attrs``: errors, out, rank)."""

    def run(self, run_dir: str | Path, settings: AnalysisSettings, *,
            out: str | Path | None, command: Sequence[str] | None) -> pd.DataFrame: ...


def executor_for(settings: AnalysisSettings) -> Executor:
    """The executor a call's settings ask for: a pool for ``workers`` > 1, torchrun's ranks
    when launched by torchrun, else this process."""
    if settings.workers > 1 and launched_world() > 1:
        raise ValueError("--workers starts its own processes: under torchrun leave it out "
                         "(--shard is fine)")
    if settings.workers > 1:
        return Pool(settings.workers)
    if launched_world() > 1:
        return Torchrun()
    return Serial()


# ---- one process's call ---------------------------------------------------------------------
@dataclass
class Call:
    """What one process needs to compute its units (built by :func:`open_call`)."""

    settings: AnalysisSettings
    source: Source
    plan: Plan
    task: Any
    client_data: list[Pair]
    hashes: dict[str, str]
    out: Path
    store: Store | None
    index: int | None
    ranks: Ranks | None
    started: str


@dataclass
class Outcome:
    """What computing a call's units gave: the selected rows of every unit (computed or
    reused), the routes the operators reported, counts and failures."""

    frames: list[pd.DataFrame] = field(default_factory=list)
    routes: dict[str, Any] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    status: str = "interrupted"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_call(run_dir: str | Path, s: AnalysisSettings, *, out: str | Path | None,
              command: Sequence[str] | None, ranks: Ranks | None = None,
              started: str | None = None) -> Call:
    """Open the source, check what needs the data, plan, and (the writer) claim ``out``.

    Everything that can refuse the call runs before the first write."""
    started = started or _now()
    writer = ranks is None or ranks.writer
    refuse_empty(out)
    source = open_source(run_dir, s)
    if not source.rounds():
        raise ValueError(f"{run_dir} has no saved checkpoints to analyze; train with "
                         "save_every > 0 or point at the run's directory")
    chosen = select_rounds(s.rounds, source.rounds())
    specs = parse_subjects(s.subjects)
    client_data = source.client_data()
    test = source.test() if any(sp.kind == "test" for sp in specs) else None
    groups = realize(specs, client_data=client_data, test=test, seed=s.seed)
    task = source.task()
    _check_params(source, chosen, s.params)
    out = Path(out) if out is not None else Path(run_dir) / "analysis"
    hashes = _data_hashes(groups, client_data)
    fingerprint = source.fingerprint()
    checkpoints: dict[int, str | BaseException] = {}
    paths: dict[int, str] = {}
    for r in chosen:
        paths[r] = _safe_path(source, r)
        try:
            checkpoints[r] = source.checkpoint_hash(r)
        except CheckpointMismatchError:
            raise  # not this run's checkpoint: the whole call is refused
        except (OSError, ValueError, KeyError) as err:
            checkpoints[r] = err  # unreadable: this round is reported and skipped
    threads = s.threads if s.threads is not None else torch.get_num_threads()
    the_plan = plan(s, rounds=chosen, groups=groups, fingerprint=fingerprint,
                    checkpoints=checkpoints, data_hashes=hashes, paths=paths,
                    code=source.code_hash(), threads=thread_key(s, threads))
    if s.shard is not None:
        the_plan = the_plan.shard(*s.shard)
    store = index = None
    if writer:
        check_out_dir(out)  # the first write: everything above is validation
        store = Store(out, lock_timeout=s.lock_timeout)
        call = {"started": started, "finished": None, "command": list(command or sys.argv),
                "settings": s.to_json(), "environment": _environment(s, source, ranks),
                "routes": {}, "settings_hashes": the_plan.settings_hashes(),
                "units": len(the_plan.units), "computed": 0, "reused": 0, "errors": []}
        run = {"fingerprint": fingerprint, "path": str(source.path.resolve()),
               "kind": source.kind}
        index = store.open(run, call, force=s.force)
        store.claim_checkpoints({r: source.checkpoint_content(r) for r, h in checkpoints.items()
                                 if isinstance(h, str)}, paths=paths, force=s.force)
    return Call(s, source, the_plan, task, client_data, hashes, out, store, index, ranks,
                started)


def compute(call: Call) -> Outcome:
    """Reuse the units the store holds, compute the others round by round (committing each),
    prune if asked. Under torchrun rank 0 alone has the store; its choice of units to compute
    is broadcast to every rank."""
    s, store, ranks = call.settings, call.store, call.ranks
    outcome = Outcome(errors=list(call.plan.errors))
    if store is not None:
        for e in outcome.errors:
            warnings.warn(f"round {e['round']}: {e['error']}", stacklevel=2)
    wanted = table_quantities(s.quantities)
    reused: list[tuple[str, list[int]]] = []
    todo: dict[int, list[Unit]] = {}
    compute_keys = []
    for u in call.plan.units:
        rows = None if store is None else store.unit_rows(u.key)
        if rows is None:
            compute_keys.append(u.key)
            continue
        mask = rows["quantity"].isin(wanted)
        reused.append((u.key, np.flatnonzero(mask.to_numpy()).tolist()))
        outcome.frames.append(rows[mask])
    if ranks is not None:
        compute_keys = ranks.broadcast(compute_keys)
    keys = set(compute_keys)
    for u in call.plan.units:
        if u.key in keys:
            todo.setdefault(u.round, []).append(u)
    if store is not None:
        store.reuse(reused)
        if outcome.errors:
            store.write_errors(outcome.errors)
    outcome.reused = len(reused)
    progress = Progress(sum(u.products(s) for us in todo.values() for u in us),
                        enabled=s.progress and store is not None)
    runner = UnitRunner(s, call.task, call.client_data, call.hashes, ranks)
    try:
        for r in sorted(todo):
            progress.at(f"round {r}")
            try:
                model = call.source.load_model(r).to(s.device)
            except (ValueError, OSError, RuntimeError) as err:
                _fail(call, outcome, r, todo[r], err)
                progress.advance(sum(u.products(s) for u in todo[r]))
                continue
            for u in todo[r]:
                progress.at(f"round {r} {u.label} {u.family}")
                try:
                    frame, dens, route = runner.compute(u, model, progress)
                except (ValueError, FloatingPointError, RuntimeError) as err:
                    _fail(call, outcome, r, [u], err)
                    continue
                outcome.routes[f"{u.label}/{u.family}"] = json.loads(route)
                mask = frame["quantity"].isin(wanted)
                if store is not None:
                    store.commit(u.key, frame, mask.to_numpy(), dens)
                outcome.frames.append(frame[mask])
                outcome.computed += 1
        if store is not None:
            if s.prune:
                store.prune({u.key for u in call.plan.units})
            store.write_errors(outcome.errors)
    finally:
        progress.close()
    outcome.status = "complete" if not outcome.errors else "complete with errors"
    return outcome


def finish(call: Call, outcome: Outcome) -> pd.DataFrame:
    """Export the table and close the call's record (also after an interruption: then with
    status "interrupted"); returns the call's rows in plan order."""
    if call.store is not None:
        try:
            call.store.export()
        finally:
            call.store.update_call(call.index, finished=_now(), routes=outcome.routes,
                                   computed=outcome.computed, reused=outcome.reused,
                                   status=outcome.status,
                                   errors=[e["error"] for e in outcome.errors])
    frames = outcome.frames
    table = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=COLUMNS))
    order = {u.key: i for i, u in enumerate(call.plan.units)}
    table = table.assign(_o=table["unit"].map(order)).sort_values("_o", kind="stable")
    table = table.drop(columns="_o").reset_index(drop=True)
    table.attrs["errors"] = outcome.errors
    table.attrs["out"] = str(call.out)
    table.attrs["rank"] = 0 if call.ranks is None else call.ranks.rank
    return table


def _run_call(run_dir, s: AnalysisSettings, out, command, ranks: Ranks | None) -> pd.DataFrame:
    started = _now()
    call = open_call(run_dir, s, out=out, command=command, ranks=ranks, started=started)
    old_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    outcome = Outcome(errors=list(call.plan.errors))
    try:
        outcome = compute(call)
    finally:
        torch.set_num_threads(old_threads)
        table = finish(call, outcome)
    return table


# ---- the executors --------------------------------------------------------------------------
class Serial:
    """This process computes the plan (its ``--shard`` slice)."""

    def run(self, run_dir: str | Path, settings: AnalysisSettings, *,
            out: str | Path | None, command: Sequence[str] | None) -> pd.DataFrame:
        return _run_call(run_dir, settings, out, command, None)


class Torchrun:
    """Every rank of a ``torchrun`` launch runs the same units on its shard of the data."""

    def run(self, run_dir: str | Path, settings: AnalysisSettings, *,
            out: str | Path | None, command: Sequence[str] | None) -> pd.DataFrame:
        ranks = from_environment(settings.device)
        try:
            return _run_call(run_dir, settings, out, command, ranks)
        finally:
            if ranks is not None:
                ranks.close()


def _worker(run_dir, settings: AnalysisSettings, out, command) -> pd.DataFrame:
    """One pool worker (a spawned process): its shard, serially."""
    inherit_allocator()
    return Serial().run(run_dir, settings, out=out, command=command)


@dataclass(frozen=True)
class Pool:
    """``workers`` processes, worker k running shard k/workers with its share of the threads,
    all writing into the one locked store; the rows of every shard, in round order."""

    workers: int

    def run(self, run_dir: str | Path, settings: AnalysisSettings, *,
            out: str | Path | None, command: Sequence[str] | None) -> pd.DataFrame:
        n = self.workers
        threads = max(1, (settings.threads or torch.get_num_threads()) // n)
        jobs = [dataclasses.replace(settings, workers=1, shard=(k, n), threads=threads,
                                    progress=False) for k in range(1, n + 1)]
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(n - 1, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, run_dir, job, out, command) for job in jobs[1:]]
            tables = [Serial().run(run_dir, jobs[0], out=out, command=command)]
            tables += [f.result() for f in futures]
        errors = [e for t in tables for e in t.attrs.get("errors", [])]
        table = pd.concat(tables, ignore_index=True)
        table = table.sort_values(["round"], kind="stable").reset_index(drop=True)
        table.attrs["errors"] = errors
        table.attrs["out"] = tables[0].attrs["out"]
        return table


# ---- checks and bookkeeping -------------------------------------------------------------------
def _check_params(source: Source, rounds: list[int], params: Sequence[str] | None) -> None:
    """Unknown parameter names, groups matching nothing (``adapters`` of a model without
    adapters) and patterns matching nothing are an error before any work (checked on the
    first round whose model loads; a round that does not load is reported when it is
    analyzed)."""
    if not params:
        return
    for r in rounds:
        try:
            model = source.load_model(r)
        except (ValueError, OSError, RuntimeError):
            continue
        try:
            select_params(model, params)
        except ValueError as err:
            raise ValueError(f"--params: {err}") from None
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


def _fail(call: Call, outcome: Outcome, r: int, units: list[Unit], err: Exception) -> None:
    path = _safe_path(call.source, r)
    warnings.warn(f"round {r}, {', '.join(sorted({u.label for u in units}))}: {err}",
                  stacklevel=3)
    outcome.errors.extend({"round": r, "unit": u.label, "path": path, "error": str(err)}
                          for u in units)
    if call.store is not None:
        call.store.write_errors(outcome.errors)


def _safe_path(source: Source, r: int) -> str:
    try:
        return str(source.checkpoint_path(r))
    except (ValueError, KeyError):
        return ""


def _version() -> str | None:
    """The installed hessrank's version (from its metadata: a leaf module does not import the
    package root)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hessrank")
    except PackageNotFoundError:
        return None


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


def _environment(s: AnalysisSettings, source: Source, ranks: Ranks | None = None
                 ) -> dict[str, Any]:
    return {"hessrank": _version(), "git_revision": _git_revision(),
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": s.threads if s.threads is not None else torch.get_num_threads(),
            "device": s.device, "dtype": (s.dtype or source.native_dtype).replace("torch.", ""),
            "world_size": 1 if ranks is None else ranks.world, "allocator": describe_allocator()}
