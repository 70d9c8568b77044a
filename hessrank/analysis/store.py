"""The analysis directory: resumable units, one merged table, densities, provenance, a lock.

Layout of ``OUT`` (docs/design.md §6)::

    OUT/analysis.json         the run this directory belongs to (fingerprint) and one record
                              per call: settings, command, versions, threads, device, routes,
                              start/end times, units computed/reused, errors
    OUT/results.parquet/.csv  the table: the union of every unit ever computed here
    OUT/units/<key>.parquet   one unit's rows (the resume cache; written atomically)
    OUT/units/<key>.npz       that unit's SLQ tridiagonals, one array pair per subject
    OUT/errors.csv            the failures of the latest call
    OUT/.lock                 held while a writer changes any of the above

A unit's key hashes what was analyzed (run fingerprint, checkpoint bytes, the subjects' data)
and the settings that produced it, so a changed run or checkpoint is recomputed. Rows are
upserted into the table by :data:`ROW_KEY`: a recomputed unit replaces its own earlier rows,
other settings add rows beside them, nothing is removed except by ``prune``. Every change to
the table is a read–modify–write under the lock, so concurrent writers lose no row.
"""

from __future__ import annotations

import errno
import io
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from hessrank.io import atomic_write_bytes
from hessrank.linalg import DensityResult

__all__ = [
    "COLUMNS", "FORMAT", "ROW_KEY", "RunMismatchError", "Store", "check_out_dir", "merge_dirs",
]

FORMAT = 2
"""Version of the analysis-directory format (1: one table per call, densities by round)."""

COLUMNS = [
    "round", "subject", "subject_kind", "subject_size", "quantity", "k", "layer", "value",
    "stderr", "matvecs", "seconds", "seed", "data_seed", "curvature", "rtol", "checkpoint",
    "data", "settings", "unit", "route",
]
"""Columns of the table.

round, subject ("server", "client3", "subset50_2", "test", "clients" for alignment),
subject_kind, subject_size (samples); quantity, k (eigenvalue index for top-eig, truncation rank
for alignment with 0 = full gradient, else 0), layer (alignment: weight name, else "");
value, stderr (NaN where none), matvecs (products spent per operator), seconds (wall time of the
estimator call that produced the row, shared by a unit's subjects); seed, data_seed (the seed of
a subset's draw, -1 otherwise), curvature, rtol (NaN: fixed budget); checkpoint (hash of the
checkpoint file), data (hash of the subject's data), settings (hash of the estimator settings:
:meth:`~hessrank.analysis.settings.AnalysisSettings.family_settings`), unit (the unit key; its
densities are ``units/<unit>.npz``), route (JSON: the product route the operator reported)."""

ROW_KEY = ["round", "subject", "quantity", "k", "layer", "settings"]
"""What a row means; a newer row with the same key replaces the older one."""


class RunMismatchError(ValueError):
    """The analysis directory belongs to another run."""


def _io_error(err: OSError, what: str) -> OSError:
    """A one-line OSError naming what could not be written."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space or choose another --out)"
    elif err.errno == errno.EFBIG:
        reason += " (a file size limit, ulimit -f, stopped the write)"
    out = OSError(err.errno, f"cannot write {what}: {reason}")
    return out


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """ValueError unless ``out`` is (or can be made) a writable directory; creates it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is not a directory (it is a file); choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hessrank-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {flag} {out}: {err.strerror or err}; choose a "
                         "writable folder") from None


class Store:
    """The analysis directory ``out`` (module docstring). Call :meth:`open` before writing."""

    def __init__(self, out: str | Path, *, lock_timeout: float = -1.0) -> None:
        self.out = Path(out)
        self.units = self.out / "units"
        self.lock_timeout = lock_timeout
        self._lock = FileLock(str(self.out / ".lock"))

    # ---- the lock ---------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock; a second writer waits (saying so once) or, after
        ``lock_timeout`` seconds (≥ 0), fails with a one-line message."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            print(f"hessrank: waiting for another process writing {self.out} "
                  f"(lock {self.out / '.lock'})", file=sys.stderr, flush=True)
            try:
                self._lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                raise ValueError(f"{self.out} is locked by another process (lock file "
                                 f"{self.out / '.lock'}); wait for it or choose another "
                                 "--out") from None
        try:
            yield
        finally:
            self._lock.release()

    # ---- analysis.json --------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.out / "analysis.json"

    def meta(self) -> dict[str, Any]:
        """analysis.json ({} when absent)."""
        if not self.meta_path.is_file():
            return {}
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.meta_path} is not valid JSON ({err}); move it away or "
                             "pass --force") from None

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            raise _io_error(err, str(path)) from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``analysis.json`` atomically (the caller holds the lock)."""
        self._write(self.meta_path, json.dumps(meta, indent=2, default=str).encode())

    def open(self, run: dict[str, Any], call: dict[str, Any], *, force: bool) -> int:
        """Claim the directory for ``run`` (``{"fingerprint", "path", "kind"}``) and record
        ``call``; returns the call's index. RunMismatchError if another run's analysis is here
        (unless ``force``, which drops that analysis)."""
        with self.locked():
            meta = self.meta()
            old = meta.get("run", {}).get("fingerprint") if meta else None
            foreign = bool(meta) and (meta.get("format") != FORMAT or old != run["fingerprint"])
            if foreign and not force and meta.get("format") != FORMAT:
                raise RunMismatchError(
                    f"{self.out} holds an analysis in an older format (format "
                    f"{meta.get('format', 1)}), without run identity: pass --force to replace "
                    "it, or choose another --out")
            if foreign and not force:
                where = meta.get("run", {}).get("path", "?")
                raise RunMismatchError(
                    f"{self.out} holds the analysis of another run ({where}, fingerprint "
                    f"{old}); this run's fingerprint is {run['fingerprint']}: choose another "
                    "--out, or pass --force to replace that analysis")
            if foreign or not meta:
                if foreign:
                    self._drop_all()
                meta = {"format": FORMAT, "run": run, "calls": []}
            meta["run"] = {**meta["run"], "path": run["path"]}
            meta["calls"].append(call)
            self.write_meta(meta)
            return len(meta["calls"]) - 1

    def update_call(self, index: int, **fields: Any) -> None:
        """Update the record of call ``index`` in analysis.json."""
        with self.locked():
            meta = self.meta()
            meta["calls"][index].update(fields)
            self.write_meta(meta)

    def _drop_all(self) -> None:
        for name in ("results.parquet", "results.csv", "errors.csv"):
            (self.out / name).unlink(missing_ok=True)
        if self.units.is_dir():
            for p in self.units.iterdir():
                p.unlink()
        legacy = self.out / "densities"
        if legacy.is_dir():
            for p in legacy.iterdir():
                p.unlink()
            legacy.rmdir()

    # ---- units ------------------------------------------------------------------------------
    def unit_rows(self, key: str) -> pd.DataFrame | None:
        """The committed rows of unit ``key``, or None (absent or unreadable: recompute)."""
        path = self.units / f"{key}.parquet"
        if not path.is_file():
            return None
        try:
            return pd.read_parquet(path)
        except Exception:  # a unit damaged on disk is recomputed
            return None

    def commit(self, key: str, rows: pd.DataFrame, selected: pd.DataFrame,
               densities: dict[str, tuple[np.ndarray, np.ndarray, int, int, int]] | None = None
               ) -> None:
        """Write unit ``key`` (all its ``rows``; densities first, the parquet file is the commit
        point) and upsert its ``selected`` rows into the table, under the lock."""
        with self.locked():
            if densities:
                buf = io.BytesIO()
                arrays: dict[str, Any] = {}
                for name, (alpha, beta, dim, matvecs, seed) in densities.items():
                    arrays[f"{name}.alpha"], arrays[f"{name}.beta"] = alpha, beta
                    arrays[f"{name}.meta"] = np.array([dim, matvecs, seed], dtype=np.int64)
                np.savez(buf, **arrays)
                self._write(self.units / f"{key}.npz", buf.getvalue())
            buf = io.BytesIO()
            rows.to_parquet(buf, index=False)
            self._write(self.units / f"{key}.parquet", buf.getvalue())
            self.upsert(selected)

    def merge(self, frames: Iterable[pd.DataFrame]) -> None:
        """Upsert already committed rows (units reused by this call) into the table."""
        frames = [f for f in frames if len(f)]
        if frames:
            with self.locked():
                self.upsert(pd.concat(frames, ignore_index=True))

    def upsert(self, rows: pd.DataFrame) -> None:
        """Insert ``rows`` into the merged table, replacing rows with the same key (the caller
        holds the lock)."""
        table = self.table()
        merged = pd.concat([table, rows[COLUMNS]], ignore_index=True) if len(table) else \
            rows[COLUMNS].reset_index(drop=True)
        merged = merged.drop_duplicates(ROW_KEY, keep="last")
        self._write_table(merged)

    def _write_table(self, table: pd.DataFrame) -> None:
        table = table.sort_values(["round", "settings", "unit", "subject", "quantity", "k",
                                   "layer"], kind="stable").reset_index(drop=True)
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        self._write(self.out / "results.parquet", buf.getvalue())
        self._write(self.out / "results.csv", table.to_csv(index=False).encode())

    def table(self) -> pd.DataFrame:
        """The merged table (empty with :data:`COLUMNS` when none yet)."""
        path = self.out / "results.parquet"
        if not path.is_file():
            return pd.DataFrame(columns=COLUMNS)
        return pd.read_parquet(path)

    def prune(self, keep_units: set[str]) -> int:
        """Drop table rows and unit files of units not in ``keep_units``; rows dropped."""
        with self.locked():
            table = self.table()
            kept = table[table["unit"].isin(keep_units)]
            self._write_table(kept)
            if self.units.is_dir():
                for p in self.units.iterdir():
                    if p.suffix in (".parquet", ".npz") and p.stem not in keep_units:
                        p.unlink()
            return len(table) - len(kept)

    def write_errors(self, errors: list[dict[str, Any]]) -> None:
        cols = ["round", "unit", "path", "error"]
        self._write(self.out / "errors.csv",
                    pd.DataFrame(errors, columns=cols).to_csv(index=False).encode())

    # ---- densities --------------------------------------------------------------------------
    def density(self, unit: str, subject: str) -> DensityResult:
        """The SLQ density of ``subject`` stored with unit ``unit`` (a table row's keys)."""
        path = self.units / f"{unit}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rerun the analysis to recompute the "
                                    "densities")
        with np.load(path) as z:
            if f"{subject}.alpha" not in z:
                raise KeyError(f"unit {unit} has no density of {subject!r}")
            dim, matvecs, seed = (int(v) for v in z[f"{subject}.meta"])
            return DensityResult.from_tridiagonals(z[f"{subject}.alpha"][None],
                                                   z[f"{subject}.beta"][None], dim, matvecs,
                                                   seed)


def merge_dirs(sources: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Merge analysis directories of one run into ``out`` (which may be one of them or hold
    that run's analysis already): units copied, rows upserted by :data:`ROW_KEY` in the order
    given (later wins), the calls of all kept in analysis.json. RunMismatchError if they
    belong to different runs. Returns the merged table."""
    import shutil

    target = Store(out)
    paths = [Path(p) for p in sources]
    metas = []
    for p in paths:
        meta = Store(p).meta()
        if not meta:
            raise FileNotFoundError(f"{p} has no analysis.json: not an analysis directory")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{p} was written by an older hessrank (format "
                             f"{meta.get('format', 1)}); re-analyze it first")
        metas.append(meta)
    fingerprints = {m["run"]["fingerprint"] for m in metas}
    existing = target.meta() if target.meta_path.is_file() else {}
    if existing:
        fingerprints.add(existing.get("run", {}).get("fingerprint"))
    if len(fingerprints) > 1:
        names = ", ".join(f"{p} ({m['run']['fingerprint']})" for p, m in zip(paths, metas))
        raise RunMismatchError(f"these analyses belong to different runs: {names}"
                               + (f", {target.out} ({existing['run']['fingerprint']})"
                                  if existing else "") + "; merge only one run's analyses")
    check_out_dir(target.out)
    with target.locked():
        target.units.mkdir(parents=True, exist_ok=True)
        meta = existing or {"format": FORMAT, "run": metas[0]["run"], "calls": []}
        frames = []
        for p, m in zip(paths, metas):
            if p.resolve() == target.out.resolve():
                continue
            src = Store(p)
            if src.units.is_dir():
                for f in sorted(src.units.iterdir()):
                    if f.suffix in (".parquet", ".npz") and not (target.units / f.name).exists():
                        try:
                            shutil.copyfile(f, target.units / f.name)
                        except OSError as err:
                            raise _io_error(err, str(target.units / f.name)) from None
            frames.append(src.table())
            meta["calls"].extend({**c, "merged_from": str(p)} for c in m.get("calls", []))
        if frames:
            target.upsert(pd.concat(frames, ignore_index=True))
        target.write_meta(meta)
        return target.table()
