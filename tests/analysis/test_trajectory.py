"""analyze(): the tidy table, resumability after a kill, failures reported and skipped, and
plain state_dict directories."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import hessrank.analysis.units as units
from hessrank.analysis.store import Store
from hessrank.analysis.trajectory import (
    COLUMNS,
    analyze,
    load_factory,
    parse_quantities,
    select_rounds,
)
from hessrank.models import build_model

KEY = ["round", "subject", "quantity", "k", "layer"]
FAST = {"matvecs": 10, "progress": False}


def _sorted(t: pd.DataFrame) -> pd.DataFrame:
    return t.sort_values(KEY).reset_index(drop=True).drop(columns="seconds")


def test_select_rounds():
    saved = [0, 5, 10, 15, 20]
    assert select_rounds(None, saved) == saved
    assert select_rounds("0:20:10", saved) == [0, 10, 20]  # stop is inclusive
    assert select_rounds("5::10", saved) == [5, 15]
    assert select_rounds(":10", saved) == [0, 5, 10]
    assert select_rounds("10,5", saved) == [5, 10]
    assert select_rounds([20], saved) == [20]
    with pytest.raises(ValueError, match="saved rounds"):
        select_rounds([3], saved)
    with pytest.raises(ValueError, match="start:stop:step"):
        select_rounds("a:b", saved)
    with pytest.raises(ValueError, match="selects none"):
        select_rounds("21:30", saved)


def test_parse_quantities_and_factory():
    assert parse_quantities("top-eig,stable-rank,top-eig") == ["top-eig", "stable-rank"]
    with pytest.raises(ValueError, match="valid quantities: stable-rank"):
        parse_quantities("stable_rank")
    assert load_factory(_small_mlp) is _small_mlp
    with pytest.raises(ValueError, match="takes arguments"):
        load_factory("hessrank.models:build_model")
    with pytest.raises(ValueError, match="module:function"):
        load_factory("hessrank.models")
    with pytest.raises(ValueError, match="no callable"):
        load_factory("hessrank.models:nope")


@pytest.mark.slow
def test_table_of_every_quantity_and_subject(trained_run, tmp_path):
    out = tmp_path / "an"
    t = analyze(trained_run, rounds="0:2:2", subjects="server,clients,subset:20x2,test",
                quantities="stable-rank,top-eig,trace,frobenius,density,alignment",
                density_probes=2, alignment_ranks=(1, None), out=out, **FAST)
    assert list(t.columns) == COLUMNS
    assert not t.duplicated(KEY).any()
    assert sorted(t["round"].unique()) == [0, 2]
    sr = t[t["quantity"] == "stable-rank"]
    assert len(sr) == 2 * 7  # 3 clients + server + 2 subset draws + test, two rounds
    assert dict(sr.groupby("subject_kind").size()) == {"client": 6, "server": 2, "subset": 4,
                                                       "test": 2}
    assert (sr["value"] >= 1 - 1e-6).all() and np.isfinite(sr["stderr"]).all()
    server = sr[sr["subject_kind"] == "server"]
    assert (server["subject_size"] == 1437).all()  # digits training set: union of the clients
    assert set(sr.loc[sr["subject_kind"] == "subset", "data_seed"]) != {-1}
    eig = t[(t["quantity"] == "top-eig") & (t["subject"] == "server") & (t["round"] == 0)]
    assert eig["k"].tolist() == list(range(1, len(eig) + 1))
    assert np.all(np.diff(np.abs(eig["value"])) <= 1e-12)  # ordered by magnitude
    # ‖H‖₂ ≤ ‖H‖_F: the top eigenvalue against the Frobenius estimate of the same run
    fro = t[(t["quantity"] == "frobenius") & (t["subject"] == "server") & (t["round"] == 0)]
    assert abs(eig["value"].iloc[0]) ** 2 <= fro["value"].iloc[0] * (1 + 1e-6)
    er = t[t["quantity"] == "effective-rank"]
    assert len(er) == 14 and (er["value"] > 1).all()
    store = Store(out)
    dens = {(r.round, r.subject): store.density(r.unit, r.subject) for r in er.itertuples()}
    assert len(dens) == 14 and (2, "subset20_1") in dens
    assert dens[(0, "server")].alpha.shape == (1, 2, 10)  # 2 probes of 10 steps
    al = t[t["quantity"] == "alignment"]
    assert set(al["layer"]) == {"fc1.weight", "out.weight"} and set(al["k"]) == {0, 1}
    assert (al["subject"] == "clients").all()
    csv = pd.read_csv(out / "results.csv").fillna({"layer": ""})
    pq = pd.read_parquet(out / "results.parquet")
    assert len(csv) == len(pq) == len(t)
    assert t.attrs["errors"] == []


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory):
    """An uninterrupted run to compare resumed runs against."""
    out = tmp_path_factory.mktemp("reference")
    return analyze(trained_run, subjects="server,clients,subset:10x2",
                   quantities="stable-rank,alignment", alignment_ranks=(1, None), out=out,
                   threads=1, **FAST)


def _units(out) -> int:
    import sqlite3

    con = sqlite3.connect(out / "store.sqlite")
    try:
        return con.execute("SELECT COUNT(*) FROM units").fetchone()[0]
    finally:
        con.close()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 5])
def test_killed_run_resumes_to_the_same_table(trained_run, tmp_path, monkeypatch, reference,
                                              kill_after):
    out = tmp_path / "an"
    real_commit = Store.commit
    calls = []

    def dying_commit(self, key, rows, selected, *a, **k):
        calls.append(int(np.asarray(selected).sum()))  # the rows that go into the table
        if len(calls) > kill_after:  # killed while committing unit kill_after + 1
            raise KeyboardInterrupt
        real_commit(self, key, rows, selected, *a, **k)

    monkeypatch.setattr(Store, "commit", dying_commit)
    kwargs = dict(subjects="server,clients,subset:10x2", quantities="stable-rank,alignment",
                  alignment_ranks=(1, None), out=out, threads=1, **FAST)
    with pytest.raises(KeyboardInterrupt):
        analyze(trained_run, **kwargs)
    assert _units(out) == kill_after
    # the interrupted call still exported what it had committed
    assert len(pd.read_parquet(out / "results.parquet")) == sum(calls[:kill_after])
    monkeypatch.setattr(Store, "commit", real_commit)

    recomputed = []
    orig_compute = units.UnitRunner.compute
    monkeypatch.setattr(units.UnitRunner, "compute", lambda self, u, *a, **k:
                        recomputed.append(u) or orig_compute(self, u, *a, **k))
    t = analyze(trained_run, **kwargs)
    assert _units(out) == 9  # 3 rounds x 3 units
    assert len(recomputed) == 9 - kill_after
    assert not t.duplicated(KEY).any()
    pd.testing.assert_frame_equal(_sorted(t), _sorted(reference), check_exact=True)
    again = analyze(trained_run, **kwargs)  # a completed analysis is only re-read
    pd.testing.assert_frame_equal(again, t)
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "results.parquet")),
                                  _sorted(t), check_dtype=False)


def test_corrupt_checkpoint_is_reported_and_skipped(run_copy, tmp_path):
    bad = run_copy / "checkpoints" / "round_00001.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "an"
    with pytest.warns(UserWarning, match="round_00001.safetensors"):
        t = analyze(run_copy, subjects="server", out=out, **FAST)
    assert sorted(t["round"].unique()) == [0, 2]
    (err,) = t.attrs["errors"]
    assert err["round"] == 1 and "round_00001.safetensors" in err["error"]
    errors = pd.read_csv(out / "errors.csv")
    assert errors["round"].tolist() == [1] and errors["path"].str.endswith(bad.name).all()


def _small_mlp():
    return build_model("mlp", (1, 8, 8), 10, hidden=(6,))


def test_state_dict_directory_with_factory(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for r in (0, 3):
        torch.manual_seed(r)
        torch.save(_small_mlp().state_dict(), ckpts / f"epoch_{r}.pt")
    torch.manual_seed(5)
    save_file(_small_mlp().state_dict(), str(ckpts / "round_5.safetensors"))
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=(7,)).state_dict(), ckpts / "ckpt_9.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = analyze(ckpts, model_factory=_small_mlp, dataset="digits", clients=2,
                    subjects="server,clients", out=tmp_path / "an", **FAST)
    assert sorted(t["round"].unique()) == [0, 3, 5]
    sr = t[(t["round"] == 0) & (t["quantity"] == "stable-rank")]
    assert sorted(sr["subject"]) == ["client0", "client1", "server"]
    (err,) = t.attrs["errors"]
    assert err["round"] == 9 and "ckpt_9.pt" in err["error"] and "does not match" in err["error"]
    assert any("ckpt_9.pt" in str(w.message) for w in caught)


def test_missing_config_explains_the_factory_route(tmp_path):
    with pytest.raises(ValueError, match="--model module:function"):
        analyze(tmp_path, progress=False)
    with pytest.raises(ValueError, match="--dataset"):
        analyze(tmp_path, model_factory=_small_mlp, progress=False)


def test_run_without_checkpoints_is_an_error(run_copy):
    for p in (run_copy / "checkpoints").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="no saved checkpoints"):
        analyze(run_copy, progress=False)


def test_row_route_is_its_own_operators(trained_run, tmp_path):
    """A stack of subset operators: each row carries its own operator's route and the stack
    size (not every operator's route of the stack, which grew with the number of draws)."""
    import json

    table = analyze(trained_run, out=tmp_path / "a", rounds="1", subjects="subset:11x3",
                    quantities="stable-rank", matvecs=10, threads=1, progress=False)
    routes = [json.loads(r) for r in table["route"]]
    assert all(r["stack"] == 3 and r["curvature"] == "hessian" and "cache" in r
               for r in routes)
    meta = json.loads((tmp_path / "a" / "analysis.json").read_text())
    (unit_route,) = meta["calls"][-1]["routes"].values()
    assert unit_route["stack"] == 3  # the three operators share one route


@pytest.mark.slow
def test_kill_9_mid_analysis_resumes_to_the_same_table(trained_run, tmp_path, reference):
    """SIGKILL once the first unit is in the store (no export, no finally): the rerun
    computes only the missing units and the table equals an uninterrupted one."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "an"
    argv = [sys.executable, "-m", "hessrank", "analyze", str(trained_run), "--subjects",
            "server,clients,subset:10x2", "--quantities", "stable-rank,alignment",
            "--alignment-ranks", "1,full", "--matvecs", "10", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db, units, deadline = out / "store.sqlite", 0, time.monotonic() + 240
    while units < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if db.is_file():
            try:
                con = sqlite3.connect(db, timeout=0.1)
                units = con.execute("SELECT COUNT(*) FROM units").fetchone()[0]
                con.close()
            except sqlite3.Error:
                pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= units < 9, units
    kw = dict(subjects="server,clients,subset:10x2", quantities="stable-rank,alignment",
              alignment_ranks=(1, None), out=out, threads=1, **FAST)
    t = analyze(trained_run, **kw)
    import json

    last = json.loads((out / "analysis.json").read_text())["calls"][-1]
    assert last["reused"] >= units and last["computed"] == 9 - last["reused"]
    pd.testing.assert_frame_equal(_sorted(t), _sorted(reference), check_exact=True)
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "results.parquet")),
                                  _sorted(t), check_dtype=False, check_exact=True)
