"""The analysis store: units keyed by what was analyzed, a table that only grows, one run per
directory, a lock for concurrent writers, densities keyed like the rows (issue 9, items 1, 2,
5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hessrank.fl as fl
from hessrank.analysis.plotting import load_table
from hessrank.analysis.trajectory import analyze
from tests.analysis.conftest import RUN_CONFIG

FAST = {"matvecs": 10, "progress": False}
ROOT = Path(__file__).resolve().parents[2]


def _server_srank(table: pd.DataFrame, round: int) -> float:
    t = table[(table["quantity"] == "stable-rank") & (table["subject"] == "server")
              & (table["round"] == round)]
    assert len(t) == 1
    return float(t["value"].iloc[0])


def test_retrained_run_is_refused_then_recomputed_with_force(tmp_path):
    """Defect 1: train rr, analyze, delete rr, train another lr into rr, analyze into the same
    --out. Before: the old run's stable ranks came back with exit 0."""
    rr, out = tmp_path / "rr", tmp_path / "an"
    fl.train({**RUN_CONFIG, "rounds": 1}, rr, progress=False)
    first = analyze(rr, rounds="1", subjects="server", out=out, **FAST)
    shutil.rmtree(rr)
    fl.train({**RUN_CONFIG, "rounds": 1, "lr": 0.5}, rr, progress=False)
    with pytest.raises(ValueError, match="another run.*--force"):
        analyze(rr, rounds="1", subjects="server", out=out, **FAST)
    assert _server_srank(load_table(out), 1) == _server_srank(first, 1)  # untouched
    fresh = analyze(rr, rounds="1", subjects="server", out=tmp_path / "fresh", **FAST)
    forced = analyze(rr, rounds="1", subjects="server", out=out, force=True, **FAST)
    assert _server_srank(forced, 1) == _server_srank(fresh, 1)
    assert _server_srank(forced, 1) != _server_srank(first, 1)
    table = load_table(out)
    assert _server_srank(table, 1) == _server_srank(fresh, 1)  # no row of the old run left
    assert json.loads((out / "analysis.json").read_text())["run"]["fingerprint"] == \
        json.loads((tmp_path / "fresh" / "analysis.json").read_text())["run"]["fingerprint"]


def test_checkpoint_of_another_round_is_refused(run_copy, tmp_path):
    """Round 1's file copied over round 2's is refused with one line naming the checkpoint
    (its metadata names its round), into the old --out and into a fresh one."""
    out = tmp_path / "an"
    before = analyze(run_copy, rounds="1,2", subjects="server", out=out, **FAST)
    ckpts = run_copy / "checkpoints"
    blob = (ckpts / "round_00001.safetensors").read_bytes()
    (ckpts / "round_00002.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match="round_00002.safetensors"):
        analyze(run_copy, rounds="1,2", subjects="server", out=out, **FAST)
    with pytest.raises(ValueError, match="round_00002.safetensors"):  # a fresh --out too:
        analyze(run_copy, rounds="2", subjects="server", out=tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()  # round 1's file says so in its metadata
    table = load_table(out)
    assert _server_srank(table, 2) == _server_srank(before, 2)  # untouched


def test_table_grows_and_failed_calls_change_nothing(trained_run, tmp_path):
    """Defect 2: a narrower --rounds or a --params typo replaced the table and analysis.json."""
    out = tmp_path / "an"
    full = analyze(trained_run, subjects="server,clients", out=out, **FAST)
    assert sorted(full["round"].unique()) == [0, 1, 2]
    narrow = analyze(trained_run, rounds="2", subjects="server,clients", out=out, **FAST)
    assert sorted(narrow["round"].unique()) == [2]  # the call returns its own selection
    table = load_table(out)
    assert len(table) == len(full)
    meta = (out / "analysis.json").read_bytes()
    csv = (out / "results.csv").read_bytes()
    with pytest.raises(ValueError, match="fc1.weigth"):
        analyze(trained_run, subjects="server", params=["fc1.weigth"], out=out, **FAST)
    assert (out / "analysis.json").read_bytes() == meta
    assert (out / "results.csv").read_bytes() == csv
    # other settings add rows next to the old ones, with their settings in columns
    analyze(trained_run, rounds="2", subjects="server", out=out, seed=1, **FAST)
    table = load_table(out)
    assert len(table) == len(full) + 3  # stable rank, top-k stable rank, intrinsic dimension
    assert not table.duplicated(["round", "subject", "quantity", "k", "layer",
                                 "settings"]).any()
    pruned = analyze(trained_run, rounds="2", subjects="server", out=out, prune=True, **FAST)
    table = load_table(out)
    assert len(table) == len(pruned) == 3 and set(table["round"]) == {2}


@pytest.mark.slow
def test_concurrent_analyses_keep_every_row(trained_run, tmp_path):
    out = tmp_path / "an"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "hessrank.cli", "analyze", str(trained_run), "--subjects",
            "server", "--matvecs", "10", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen([*base, "--rounds", r], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ("0", "1,2")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    table = load_table(out)
    assert sorted(table["round"].unique()) == [0, 1, 2]
    assert len(table) == 9 and not table.duplicated(["round", "subject", "quantity"]).any()
    calls = json.loads((out / "analysis.json").read_text())["calls"]
    assert len(calls) == 2 and all(c["finished"] for c in calls)


def test_densities_are_keyed_like_the_rows(trained_run, tmp_path):
    """Defect 7a: a rerun with other settings overwrote the densities the table referred to."""
    from hessrank.analysis.store import Store

    out = tmp_path / "an"
    kw = dict(rounds="2", subjects="server", quantities="density", out=out, **FAST)
    analyze(trained_run, density_probes=2, **kw)
    analyze(trained_run, density_probes=3, **kw)
    table = load_table(out)
    er = table[table["quantity"] == "effective-rank"]
    assert len(er) == 2
    store = Store(out)
    probes = sorted(store.density(row.unit, row.subject).alpha.shape[1]
                    for row in er.itertuples())
    assert probes == [2, 3]


def test_provenance_is_recorded(trained_run, tmp_path):
    out = tmp_path / "an"
    t = analyze(trained_run, rounds="0", subjects="server,clients", out=out, **FAST)
    meta = json.loads((out / "analysis.json").read_text())
    (call,) = meta["calls"]
    env = call["environment"]
    for key in ("hessrank", "torch", "numpy", "python", "threads", "git_revision"):
        assert key in env
    for key in ("started", "finished", "command", "settings", "routes"):
        assert call[key] is not None
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    assert call["routes"]  # what the operators reported
    for col in ("checkpoint", "data", "unit", "settings", "curvature", "route"):
        assert col in t.columns
    assert (t["curvature"] == "hessian").all()
    assert t["route"].map(lambda s: isinstance(json.loads(s), dict)).all()
    clients = t[t["subject_kind"] == "client"]
    assert clients["data"].nunique() == 3 and t["checkpoint"].nunique() == 1
    assert np.isfinite(t["value"]).all()


def test_old_format_directory_is_refused_unless_forced(trained_run, tmp_path):
    out = tmp_path / "an"
    (out / "densities").mkdir(parents=True)
    (out / "analysis.json").write_text(json.dumps({"run_dir": "elsewhere", "matvecs": 40}))
    (out / "results.csv").write_text("round,subject\n0,server\n")
    with pytest.raises(ValueError, match="older format.*--force"):
        analyze(trained_run, rounds="0", subjects="server", out=out, **FAST)
    t = analyze(trained_run, rounds="0", subjects="server", out=out, force=True, **FAST)
    assert len(load_table(out)) == len(t) == 3 and not (out / "densities").exists()


def test_empty_out_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    """Issue 19.6: --out "" wrote the analysis into the current directory."""
    from hessrank.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["analyze", str(trained_run), "--rounds", "0", "--subjects", "server", "--matvecs",
            "10", "--quiet", "--out", ""]
    assert main(argv) == 2
    assert '--out "" is empty' in capsys.readouterr().err
    analyze(trained_run, rounds="0", subjects="server", out=tmp_path / "a", **FAST)
    assert main(["merge", str(tmp_path / "a"), "--out", ""]) == 2
    assert '--out "" is empty' in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "a"), "--out", ""]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing landed in the cwd


@pytest.mark.parametrize("damaged", ["results.parquet", "analysis.json", "store.sqlite"])
def test_force_recovers_from_a_damaged_analysis_directory(trained_run, tmp_path, damaged):
    """Issue 19.6: --force did not recover from a corrupt results.parquet or analysis.json."""
    out = tmp_path / "an"
    first = analyze(trained_run, rounds="0,1", subjects="server", out=out, **FAST)
    path = out / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3] + b"\x00garbage")
    if damaged == "results.parquet":  # only an export: the next call rewrites it
        again = analyze(trained_run, rounds="0,1", subjects="server", out=out, **FAST)
    else:
        with pytest.raises(ValueError, match="--force"):
            analyze(trained_run, rounds="0,1", subjects="server", out=out, **FAST)
        again = analyze(trained_run, rounds="0,1", subjects="server", out=out, force=True,
                        **FAST)
    pd.testing.assert_frame_equal(again.drop(columns="seconds"),
                                  first.drop(columns="seconds"))
    assert len(load_table(out)) == len(first)
    pd.read_parquet(out / "results.parquet")  # readable again


def test_merge_keeps_rows_of_a_source_without_a_table(trained_run, tmp_path):
    """Issue 19.6: merge dropped the rows of a source with unit files but no table. In the
    store the rows live in store.sqlite (results.parquet is an export); a directory of the
    earlier format (unit files, table missing) contributes every unit's rows."""
    from hessrank.analysis.store import merge_dirs

    a, b = tmp_path / "a", tmp_path / "b"
    ta = analyze(trained_run, rounds="0", subjects="server", out=a, **FAST)
    tb = analyze(trained_run, rounds="1", subjects="server", out=b, **FAST)
    (b / "results.parquet").unlink()
    (b / "results.csv").unlink()
    merged = merge_dirs([a, b], tmp_path / "m")
    assert len(merged) == len(ta) + len(tb)
    # a format-2 directory: units/<key>.parquet and analysis.json, its table lost
    old = tmp_path / "old"
    (old / "units").mkdir(parents=True)
    tc = analyze(trained_run, rounds="2", subjects="server", out=tmp_path / "c", **FAST)
    for key, rows in tc.groupby("unit"):
        rows.to_parquet(old / "units" / f"{key}.parquet", index=False)
    meta = json.loads((tmp_path / "c" / "analysis.json").read_text())
    (old / "analysis.json").write_text(json.dumps({**meta, "format": 2}))
    merged = merge_dirs([a, b, old], tmp_path / "m2")
    assert sorted(merged["round"].unique()) == [0, 1, 2]
    assert len(merged) == len(ta) + len(tb) + len(tc)
    assert (old / "units").is_dir()  # a source is read, never changed


def test_an_earlier_format_directory_is_read_and_imported(trained_run, tmp_path):
    """A format-2 directory (units/<key>.parquet + .npz, results.parquet): its densities
    read as they are, and the next analysis imports it (no recomputation, rows kept)."""
    import sqlite3

    from hessrank.analysis.store import Store

    new = tmp_path / "new"
    t = analyze(trained_run, rounds="1", subjects="server", quantities="stable-rank,density",
                density_probes=2, out=new, **FAST)
    old = tmp_path / "old"
    (old / "units").mkdir(parents=True)
    con = sqlite3.connect(new / "store.sqlite")
    for key, frame, dens in con.execute("SELECT u.key, f.data, u.densities FROM units u JOIN "
                                        "frames f ON u.frame = f.id"):
        (old / "units" / f"{key}.parquet").write_bytes(frame)
        if dens is not None:
            (old / "units" / f"{key}.npz").write_bytes(dens)
    con.close()
    shutil.copyfile(new / "results.parquet", old / "results.parquet")
    meta = json.loads((new / "analysis.json").read_text())
    (old / "analysis.json").write_text(json.dumps({**meta, "format": 2}))
    row = t[t["quantity"] == "effective-rank"].iloc[0]
    a = Store(new).density(row["unit"], row["subject"])
    b = Store(old).density(row["unit"], row["subject"])
    assert np.array_equal(a.alpha, b.alpha) and np.array_equal(a.beta, b.beta)
    again = analyze(trained_run, rounds="1", subjects="server",
                    quantities="stable-rank,density", density_probes=2, out=old, **FAST)
    calls = json.loads((old / "analysis.json").read_text())["calls"]
    assert calls[-1]["reused"] == 2 and calls[-1]["computed"] == 0
    assert not (old / "units").exists() and len(load_table(old)) == len(again) == len(t)
