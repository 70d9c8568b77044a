"""The analysis directory: units and the table in one SQLite file, exports, provenance, a lock.

Layout of ``OUT`` (docs/design.md, analysis)::

    OUT/analysis.json         the run this directory belongs to (fingerprint) and one record
                              per call: settings, command, versions, threads, device, routes,
                              start/end times, units computed/reused, errors
    OUT/store.sqlite          the units (each unit's rows and SLQ tridiagonals), the table (which
                              unit row holds each table row) and the checkpoint hashes seen
    OUT/results.parquet/.csv  the table, exported from store.sqlite at the end of every call
                              (also an interrupted one); after a kill -9 the next call exports
    OUT/errors.csv            the failures of the latest call
    OUT/.lock                 held while a writer changes any of the above

A unit's key hashes what was analyzed and the settings that produced it
(:mod:`hessrank.analysis.planner`). Committing a unit is one SQLite transaction: its rows
(Parquet bytes, so every value and dtype comes back exactly), its densities, and the upsert of
its selected rows into the table by :data:`ROW_KEY` — a recomputed unit replaces its own
earlier rows, other settings add rows beside them, nothing is removed except by ``prune``.
A kill at any moment leaves either the whole unit or none of it; nothing rewrites the whole
table per unit (the export runs once per call). Concurrent writers serialize on the lock.

Format 2 directories (``units/<key>.parquet`` files and ``results.parquet``, hessrank before
the store moved into SQLite) are imported on first use: the unit files, and the table's rows
(all unit rows when the table is missing or unreadable).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from hessrank.io import atomic_write_bytes
from hessrank.linalg import DensityResult

__all__ = [
    "COLUMNS", "FORMAT", "ROW_KEY", "RunMismatchError", "Store", "check_out_dir",
    "merge_dirs", "refuse_empty",
]

FORMAT = 3
"""Version of the analysis-directory format (1: one table per call, densities by round;
2: unit files and a table rewritten per unit; 3: store.sqlite)."""

DB_FILE = "store.sqlite"

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
:attr:`hessrank.analysis.quantities.Family.settings`), unit (the unit key; its densities are
stored with it), route (JSON: the product route the operator reported)."""

ROW_KEY = ["round", "subject", "quantity", "k", "layer", "settings"]
"""What a row means; a newer row with the same key replaces the older one."""

_SORT = ["round", "settings", "unit", "subject", "quantity", "k", "layer"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    key TEXT PRIMARY KEY, frame INTEGER NOT NULL REFERENCES frames(id), densities BLOB);
CREATE TABLE IF NOT EXISTS rows (
    round INTEGER NOT NULL, subject TEXT NOT NULL, quantity TEXT NOT NULL, k INTEGER NOT NULL,
    layer TEXT NOT NULL, settings TEXT NOT NULL, unit TEXT NOT NULL,
    frame INTEGER NOT NULL REFERENCES frames(id), pos INTEGER NOT NULL,
    PRIMARY KEY (round, subject, quantity, k, layer, settings));
CREATE TABLE IF NOT EXISTS checkpoints (round INTEGER PRIMARY KEY, hash TEXT NOT NULL);
"""
"""frames: Parquet bytes of row sets (a unit's rows, or rows merged in); units: the resume
cache; rows: the table, each row a position in a frame; checkpoints: the hash of each round's
checkpoint when it was first analyzed here."""


class RunMismatchError(ValueError):
    """The analysis directory belongs to another run, or holds another checkpoint."""


def _io_error(err: OSError, what: str) -> OSError:
    """A one-line OSError naming what could not be written."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space or choose another --out)"
    elif err.errno == errno.EFBIG:
        reason += " (a file size limit, ulimit -f, stopped the write)"
    return OSError(err.errno, f"cannot write {what}: {reason}")


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


def _sqlite_error(err: sqlite3.Error, path: Path) -> Exception:
    """The one-line error for what SQLite reported: a store that is not one (ValueError, the
    way out is --force) or a write that failed (OSError, as for every other file)."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in str(err):
        return ValueError(f"{path} is not a readable analysis store ({err}); pass --force to "
                          "start this analysis directory over")
    if name.startswith("SQLITE_FULL"):
        return _io_error(OSError(errno.ENOSPC, "No space left on device"), str(path))
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return OSError(errno.EIO, f"cannot write {path}: {err} (the disk is full, read-only, "
                                  "or a file size limit, ulimit -f, stopped the write)")
    return err


def refuse_empty(out: str | Path | None, flag: str = "--out") -> None:
    """ValueError for an empty ``--out`` (``--out ""``), which would write into the current
    directory."""
    if out is not None and str(out).strip() == "":
        raise ValueError(f'{flag} "" is empty (it would write into the current directory); '
                         f"give a folder, e.g. {flag} analysis_out")


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _frame(blob: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(blob))


def _npz(densities: dict[str, tuple[np.ndarray, np.ndarray, int, int, int]]) -> bytes:
    arrays: dict[str, Any] = {}
    for name, (alpha, beta, dim, matvecs, seed) in densities.items():
        arrays[f"{name}.alpha"], arrays[f"{name}.beta"] = alpha, beta
        arrays[f"{name}.meta"] = np.array([dim, matvecs, seed], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Store:
    """The analysis directory ``out`` (module docstring). Call :meth:`open` before writing
    with :meth:`commit`; reading (:meth:`table`, :meth:`unit_rows`, :meth:`density`) needs
    no call record."""

    def __init__(self, out: str | Path, *, lock_timeout: float = -1.0) -> None:
        self.out = Path(out)
        self.db_path = self.out / DB_FILE
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

    # ---- the database -----------------------------------------------------------------------
    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection; with ``write`` one transaction, committed on leaving (rolled back on
        an error). A store that cannot be read is a one-line ValueError, a write the disk or
        a file size limit refused a one-line OSError (:func:`_sqlite_error`)."""
        if not write and not self.db_path.is_file():
            con = sqlite3.connect(":memory:")
        else:
            try:
                con = sqlite3.connect(self.db_path, timeout=60.0)
            except sqlite3.Error as err:
                raise _sqlite_error(err, self.db_path) from None
        try:
            con.executescript(_SCHEMA)
            if write:
                with con:
                    yield con
            else:
                yield con
        except sqlite3.DatabaseError as err:
            raise _sqlite_error(err, self.db_path) from None
        finally:
            con.close()

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
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
        (unless ``force``, which drops that analysis; ``force`` also starts over from an
        unreadable analysis.json or store)."""
        with self.locked():
            try:
                meta = self.meta()
                if meta.get("format") == 2:
                    self.import_format2()
                    meta["format"] = FORMAT
                elif meta and meta.get("format") == FORMAT:
                    self._check_db()
            except ValueError:
                if not force:
                    raise
                meta = {"format": None, "run": {"fingerprint": None}}
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
                    f"{old}); this run ({run['path']}) has fingerprint {run['fingerprint']}: "
                    "choose another --out, or pass --force to replace that analysis")
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

    def _check_db(self) -> None:
        if self.db_path.is_file():
            with self._db() as con:
                try:
                    con.execute("PRAGMA quick_check").fetchall()
                except sqlite3.DatabaseError as err:
                    raise ValueError(f"{self.db_path} is corrupt ({err}); pass --force to "
                                     "start this analysis directory over") from None

    def _drop_all(self) -> None:
        for name in ("results.parquet", "results.csv", "errors.csv", DB_FILE,
                     DB_FILE + "-journal"):
            (self.out / name).unlink(missing_ok=True)
        for legacy in (self.out / "units", self.out / "densities"):
            if legacy.is_dir():
                shutil.rmtree(legacy)

    def import_format2(self) -> None:
        """Move a format-2 directory's unit files and table into the store (module doc)."""
        units = self.out / "units"
        frames = []
        with self._db(write=True) as con:
            if units.is_dir():
                for p in sorted(units.glob("*.parquet")):
                    if p.name.startswith("."):
                        continue
                    try:
                        rows = pd.read_parquet(p)
                    except Exception:  # a damaged unit file is recomputed, as before
                        continue
                    dens = p.with_suffix(".npz")
                    self._put_unit(con, p.stem, rows,
                                   dens.read_bytes() if dens.is_file() else None)
                    frames.append(rows)
            table = None
            path = self.out / "results.parquet"
            if path.is_file():
                with contextlib.suppress(Exception):  # unreadable: rebuilt from the units
                    table = pd.read_parquet(path)
            if table is None and frames:
                table = pd.concat(frames, ignore_index=True)
            if table is not None and len(table):
                self._upsert_frame(con, table[COLUMNS])
        if units.is_dir():
            shutil.rmtree(units)

    # ---- units ------------------------------------------------------------------------------
    @staticmethod
    def _put_frame(con: sqlite3.Connection, frame: pd.DataFrame) -> int:
        return int(con.execute("INSERT INTO frames (data) VALUES (?)",
                               (_parquet(frame),)).lastrowid)

    def _put_unit(self, con: sqlite3.Connection, key: str, rows: pd.DataFrame,
                  densities: bytes | None) -> int:
        old = con.execute("SELECT frame FROM units WHERE key = ?", (key,)).fetchone()
        fid = self._put_frame(con, rows.reset_index(drop=True))
        con.execute("INSERT OR REPLACE INTO units (key, frame, densities) VALUES (?, ?, ?)",
                    (key, fid, densities))
        if old is not None:
            self._drop_unreferenced(con, [old[0]])
        return fid

    @staticmethod
    def _drop_unreferenced(con: sqlite3.Connection, frames: Iterable[int]) -> None:
        for fid in set(frames):
            used = con.execute("SELECT 1 FROM units WHERE frame = ? UNION ALL SELECT 1 FROM "
                               "rows WHERE frame = ? LIMIT 1", (fid, fid)).fetchone()
            if used is None:
                con.execute("DELETE FROM frames WHERE id = ?", (fid,))

    @staticmethod
    def _upsert_positions(con: sqlite3.Connection, frame: pd.DataFrame, fid: int,
                          positions: Iterable[int]) -> None:
        """Point the table rows of ``frame``'s rows at ``positions`` to (fid, position)."""
        replaced = []
        cols = [frame[c].tolist() for c in ("round", "subject", "quantity", "k", "layer",
                                             "settings", "unit")]
        for i in positions:
            key = tuple(c[i] for c in cols[:6])
            old = con.execute("SELECT frame FROM rows WHERE round = ? AND subject = ? AND "
                              "quantity = ? AND k = ? AND layer = ? AND settings = ?",
                              key).fetchone()
            if old is not None and old[0] != fid:
                replaced.append(old[0])
            con.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (int(key[0]), str(key[1]), str(key[2]), int(key[3]), str(key[4]),
                         str(key[5]), str(cols[6][i]), fid, int(i)))
        Store._drop_unreferenced(con, replaced)

    def _upsert_frame(self, con: sqlite3.Connection, rows: pd.DataFrame) -> None:
        rows = rows[COLUMNS].reset_index(drop=True)
        fid = self._put_frame(con, rows)
        self._upsert_positions(con, rows, fid, range(len(rows)))

    def unit_rows(self, key: str) -> pd.DataFrame | None:
        """The committed rows of unit ``key``, or None (not computed here)."""
        with self._db() as con:
            got = con.execute("SELECT f.data FROM units u JOIN frames f ON u.frame = f.id "
                              "WHERE u.key = ?", (key,)).fetchone()
        return None if got is None else _frame(got[0])

    def commit(self, key: str, rows: pd.DataFrame, selected: pd.DataFrame | np.ndarray,
               densities: dict[str, tuple[np.ndarray, np.ndarray, int, int, int]] | None = None
               ) -> None:
        """Commit unit ``key`` in one transaction: all its ``rows``, its densities, and the
        upsert of its ``selected`` rows (a subset of ``rows`` with their index, or a boolean
        mask over them) into the table."""
        if isinstance(selected, pd.DataFrame):
            mask = rows.index.isin(selected.index)
        else:
            mask = np.asarray(selected, dtype=bool)
        rows = rows.reset_index(drop=True)
        with self.locked(), self._db(write=True) as con:
            fid = self._put_unit(con, key, rows, _npz(densities) if densities else None)
            self._upsert_positions(con, rows, fid, np.flatnonzero(mask).tolist())

    def reuse(self, units: Iterable[tuple[str, Iterable[int]]]) -> None:
        """Upsert rows of units already committed (reused by this call): per unit key the
        positions of its selected rows, so they become the table's latest rows."""
        units = [(k, list(p)) for k, p in units]
        if not units:
            return
        with self.locked(), self._db(write=True) as con:
            for key, positions in units:
                got = con.execute("SELECT f.id, f.data FROM units u JOIN frames f ON "
                                  "u.frame = f.id WHERE u.key = ?", (key,)).fetchone()
                if got is not None:
                    self._upsert_positions(con, _frame(got[1]), got[0], positions)

    def merge(self, frames: Iterable[pd.DataFrame]) -> None:
        """Upsert rows (of any origin: merged analyses, tests) into the table."""
        frames = [f for f in frames if len(f)]
        if frames:
            with self.locked(), self._db(write=True) as con:
                self._upsert_frame(con, pd.concat(frames, ignore_index=True))

    def table(self) -> pd.DataFrame:
        """The table (empty with :data:`COLUMNS` when none yet), in the export's order."""
        with self._db() as con:
            refs = con.execute("SELECT frame, pos FROM rows").fetchall()
            by_frame: dict[int, list[int]] = {}
            for fid, pos in refs:
                by_frame.setdefault(fid, []).append(pos)
            parts = []
            for fid in sorted(by_frame):
                (blob,) = con.execute("SELECT data FROM frames WHERE id = ?", (fid,)).fetchone()
                parts.append(_frame(blob).iloc[sorted(by_frame[fid])])
        if not parts:
            return pd.DataFrame(columns=COLUMNS)
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return table[COLUMNS].sort_values(_SORT, kind="stable").reset_index(drop=True)

    def export(self) -> pd.DataFrame:
        """Write ``results.parquet`` and ``results.csv`` from the store; returns the table."""
        with self.locked():
            table = self.table()
            self._write(self.out / "results.parquet", _parquet(table))
            self._write(self.out / "results.csv", table.to_csv(index=False).encode())
        return table

    def checkpoints(self) -> dict[int, str]:
        """Round → hash of the checkpoint first analyzed here at that round."""
        with self._db() as con:
            return {int(r): h for r, h in con.execute("SELECT round, hash FROM checkpoints")}

    def claim_checkpoints(self, hashes: dict[int, str], *, paths: dict[int, str],
                          force: bool) -> None:
        """Record the checkpoint hash of each round; RunMismatchError naming both when a
        round was analyzed here with another checkpoint (unless ``force``: then the new one
        is recorded, and its units, keyed by the new hash, are computed)."""
        with self.locked(), self._db(write=True) as con:
            known = {int(r): h for r, h in con.execute("SELECT round, hash FROM checkpoints")}
            changed = {r: (known[r], h) for r, h in hashes.items() if r in known and
                       known[r] != h}
            if changed and not force:
                r, (old, new) = next(iter(sorted(changed.items())))
                raise RunMismatchError(
                    f"checkpoint {paths.get(r, f'of round {r}')} (hash {new}) is not the round "
                    f"{r} checkpoint analyzed into {self.out} (hash {old}): it was overwritten "
                    "or copied in from another run; restore it, choose another --out, or pass "
                    "--force to analyze the new file there")
            con.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                            [(int(r), str(h)) for r, h in hashes.items()])

    def prune(self, keep_units: set[str]) -> int:
        """Drop table rows and units not in ``keep_units``; returns the table rows dropped."""
        with self.locked(), self._db(write=True) as con:
            before = con.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
            keep = list(keep_units)
            con.execute("CREATE TEMP TABLE keep (key TEXT PRIMARY KEY)")
            con.executemany("INSERT OR IGNORE INTO keep VALUES (?)", [(k,) for k in keep])
            con.execute("DELETE FROM rows WHERE unit NOT IN (SELECT key FROM keep)")
            con.execute("DELETE FROM units WHERE key NOT IN (SELECT key FROM keep)")
            con.execute("DELETE FROM frames WHERE id NOT IN (SELECT frame FROM units) AND id "
                        "NOT IN (SELECT frame FROM rows)")
            after = con.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        return int(before - after)

    def write_errors(self, errors: list[dict[str, Any]]) -> None:
        cols = ["round", "unit", "path", "error"]
        self._write(self.out / "errors.csv",
                    pd.DataFrame(errors, columns=cols).to_csv(index=False).encode())

    # ---- densities --------------------------------------------------------------------------
    def density(self, unit: str, subject: str) -> DensityResult:
        """The SLQ density of ``subject`` stored with unit ``unit`` (a table row's keys)."""
        with self._db() as con:
            got = con.execute("SELECT densities FROM units WHERE key = ?", (unit,)).fetchone()
        legacy = self.out / "units" / f"{unit}.npz"  # a format-2 directory not yet imported
        if (got is None or got[0] is None) and legacy.is_file():
            got = (legacy.read_bytes(),)
        if got is None or got[0] is None:
            raise FileNotFoundError(f"{self.out} holds no densities of unit {unit}: rerun the "
                                    "analysis to recompute them")
        with np.load(io.BytesIO(got[0])) as z:
            if f"{subject}.alpha" not in z:
                raise KeyError(f"unit {unit} has no density of {subject!r}")
            dim, matvecs, seed = (int(v) for v in z[f"{subject}.meta"])
            return DensityResult.from_tridiagonals(z[f"{subject}.alpha"][None],
                                                   z[f"{subject}.beta"][None], dim, matvecs,
                                                   seed)

    # ---- merging ------------------------------------------------------------------------------
    def stored_units(self) -> Iterator[tuple[str, bytes, bytes | None]]:
        """Every stored unit as (key, its rows' frame, its densities or None)."""
        with self._db() as con:
            yield from con.execute("SELECT u.key, f.data, u.densities FROM units u "
                                   "JOIN frames f ON u.frame = f.id")

    def _copy_units_from(self, con: sqlite3.Connection, src: Store) -> None:
        for key, blob, dens in src.stored_units():
            if con.execute("SELECT 1 FROM units WHERE key = ?", (key,)).fetchone() is None:
                fid = int(con.execute("INSERT INTO frames (data) VALUES (?)",
                                      (blob,)).lastrowid)
                con.execute("INSERT INTO units VALUES (?, ?, ?)", (key, fid, dens))
        for r, h in src.checkpoints().items():
            con.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?)", (r, h))

    def merge_from(self, sources: Sequence[tuple[Path, dict[str, Any], Store]],
                   meta: dict[str, Any]) -> None:
        """Under the lock: copy the units and upsert the rows of every (path, its
        analysis.json, a readable store of it) that is not this directory, in order (later
        rows win), add their calls to ``meta`` and write it (a format-2 ``meta`` is this
        directory's own, imported first)."""
        with self.locked():
            if meta.get("format") == 2:
                self.import_format2()
                meta["format"] = FORMAT
            with self._db(write=True) as con:
                for p, m, src in sources:
                    if p.resolve() == self.out.resolve():
                        continue
                    self._copy_units_from(con, src)
                    table = src.table()
                    if len(table):
                        self._upsert_frame(con, table)
                    meta["calls"].extend({**c, "merged_from": str(p)}
                                         for c in m.get("calls", []))
            self.write_meta(meta)

    def readable(self) -> Store:
        """This store if it is in the current format, else a temporary store imported from
        this format-2 directory (which is never modified); the caller removes a temporary
        one (its ``out`` differs from this one's)."""
        if self.meta().get("format") != 2:
            return self
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="hessrank-merge-"))
        for name in ("units", "results.parquet"):
            src = self.out / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copyfile(src, tmp / name)
        store = Store(tmp)
        store.import_format2()
        return store


def _checkpoint_conflict(paths: list[Path], stores: list[Store]) -> str | None:
    """A line naming two analyses that hold different checkpoints at the same round: by the
    content hashes their stores recorded, else (directories of format 2) by the table's
    checkpoint file hashes."""
    seen: dict[tuple[str, int], tuple[str, Path]] = {}
    for p, s in zip(paths, stores):
        table = s.table()
        ids = {("content", r): h for r, h in s.checkpoints().items()}
        for r, h in zip(table["round"], table["checkpoint"]):
            if ("content", int(r)) not in ids:  # file bytes of equal content may differ
                ids.setdefault(("file", int(r)), str(h))
        for (kind, r), h in sorted(ids.items()):
            other = seen.get((kind, r))
            if other is not None and other[0] != h:
                return (f"{other[1]} and {p} analyzed different checkpoints at round {r} "
                        f"({other[0]} vs {h}): they belong to different runs with the same "
                        "config; merge only one run's analyses")
            seen.setdefault((kind, r), (h, p))
    return None


def merge_dirs(sources: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Merge analysis directories of one run into ``out`` (which may be one of them or hold
    that run's analysis already): units copied, rows upserted by :data:`ROW_KEY` in the order
    given (later wins), the calls of all kept in analysis.json. RunMismatchError (naming both)
    if they belong to different runs — another fingerprint, or another checkpoint at the same
    round. Returns the merged table."""
    refuse_empty(out)
    target = Store(out)
    check_out_dir(target.out)
    paths = [Path(p) for p in sources]
    metas = []
    for p in paths:
        meta = Store(p).meta()
        if not meta:
            raise FileNotFoundError(f"{p} has no analysis.json: not an analysis directory")
        if meta.get("format") not in (2, FORMAT):
            raise ValueError(f"{p} was written by an older hessrank (format "
                             f"{meta.get('format', 1)}); re-analyze it first")
        metas.append(meta)
    existing = target.meta() if target.meta_path.is_file() else {}
    named = list(zip(paths, metas))
    if existing and all(p.resolve() != target.out.resolve() for p in paths):
        named.append((target.out, existing))
    first = named[0]
    for p, m in named[1:]:
        if m["run"]["fingerprint"] != first[1]["run"]["fingerprint"]:
            raise RunMismatchError(
                f"these analyses belong to different runs: {first[0]} (fingerprint "
                f"{first[1]['run']['fingerprint']}, run {first[1]['run'].get('path', '?')}) "
                f"and {p} (fingerprint {m['run']['fingerprint']}, run "
                f"{m['run'].get('path', '?')}); merge only one run's analyses")
    readers = [Store(p).readable() for p, _ in named]
    conflict = _checkpoint_conflict([p for p, _ in named], readers)
    if conflict:
        raise RunMismatchError(conflict)
    meta = existing or {"format": FORMAT, "run": metas[0]["run"], "calls": []}
    target.merge_from(list(zip(paths, metas, readers)), meta)
    for src, (p, _) in zip(readers, named):
        if src.out != p:  # a temporary import of a format-2 directory
            shutil.rmtree(src.out, ignore_errors=True)
    return target.export()
