"""Splitting an analysis (issue 14): shards and workers give the serial table bit for bit;
``hessrank merge`` unions analysis directories of one run and refuses others."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import hessrank.fl as fl
from hessrank.analysis.plotting import load_table
from hessrank.analysis.store import RunMismatchError, merge_dirs
from hessrank.analysis.trajectory import analyze
from hessrank.cli import main

from .conftest import RUN_CONFIG

KW = dict(rounds="1,2", subjects="server,clients,subset:10x2",
          quantities="stable-rank,density", density_probes=2, matvecs=10, progress=False,
          threads=1)


def _bits(out) -> pd.DataFrame:
    return load_table(out).drop(columns="seconds")


@pytest.fixture(scope="module")
def serial(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    analyze(trained_run, out=out, **KW)
    return out


@pytest.mark.slow
def test_shards_into_one_directory_equal_the_serial_table(trained_run, tmp_path, serial):
    out = tmp_path / "an"
    parts = [analyze(trained_run, out=out, shard=(i, 3), **KW) for i in (1, 2, 3)]
    assert all(len(p) for p in parts)
    assert sum(map(len, parts)) == len(load_table(out))
    pd.testing.assert_frame_equal(_bits(out), _bits(serial), check_exact=True)


@pytest.mark.slow
def test_workers_equal_the_serial_table(trained_run, tmp_path, serial):
    out = tmp_path / "an"
    analyze(trained_run, out=out, workers=2, **KW)
    pd.testing.assert_frame_equal(_bits(out), _bits(serial), check_exact=True)


def test_merge_of_shards_and_refusal_of_other_runs(trained_run, tmp_path, serial, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    analyze(trained_run, out=a, shard=(1, 2), **KW)
    analyze(trained_run, out=b, shard=(2, 2), **KW)
    assert main(["merge", str(a), str(b), str(a), "--out", str(tmp_path / "c")]) == 0
    pd.testing.assert_frame_equal(_bits(tmp_path / "c"), _bits(serial), check_exact=True)
    # another run (its checkpoints carry its own fingerprint, so an edited config.json of a
    # copy would be refused before any merge: a second, genuinely different run is trained)
    other_run, other = tmp_path / "other_run", tmp_path / "other"
    fl.train({**RUN_CONFIG, "lr": 0.07}, other_run, progress=False)
    analyze(other_run, out=other, **{**KW, "rounds": "0"})
    with pytest.raises(RunMismatchError, match="different runs"):
        merge_dirs([a, other], tmp_path / "d")
    assert main(["merge", str(a), str(other), "--out", str(tmp_path / "d")]) == 2
    assert "different runs" in capsys.readouterr().err


def test_bad_shard_flags(trained_run, tmp_path, capsys):
    for flags, needle in ((["--shard", "3/2"], "1 <= I <= N"), (["--shard", "x"], "I/N"),
                          (["--shard", "1/2", "--prune"], "other shards"),
                          (["--workers", "0"], "--workers")):
        assert main(["analyze", str(trained_run), "--quiet", "--out", str(tmp_path / "x"),
                     *flags]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_memory_limit_streams_products_and_keeps_the_numbers(trained_run, tmp_path):
    """--memory-mb below the linearizations' size: products are not kept and stream over
    micro-batches (the route says so); the values agree with the default route to 1e-9
    (float64); the unit keys are equal (the budget is not a key: rows of one are reused by
    the other)."""
    kw = {"rounds": "1", "subjects": "server", "quantities": "stable-rank,top-eig",
          "matvecs": 10, "dtype": "float64", "threads": 1, "progress": False}
    a = analyze(trained_run, out=tmp_path / "a", **kw)
    b = analyze(trained_run, out=tmp_path / "b", memory_mb=0.05, **kw)
    assert '"micro_batch": null' in a["route"].iloc[0]
    route = json.loads(b["route"].iloc[0])
    assert route["cache"] is False and route["micro_batch"] >= 1
    key = ["round", "subject", "quantity", "k"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a["unit"].equals(b["unit"])
    assert ((a["value"] - b["value"]).abs() <= 1e-9 * a["value"].abs()).all()
