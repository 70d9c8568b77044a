"""What produced the numbers is in the keys, and what is not the run's is refused (issue 19,
items 1–3): an edited model factory is recomputed; a checkpoint overwritten with finite
garbage, or copied in from another run, is refused; two analyses of runs with the same config
but different checkpoints do not merge; a 4-round cosine run is not analyzed into a 2-round
run's --out; the unit keys hold the thread count where the numbers depend on it."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import hessrank.fl as fl
from hessrank.analysis.store import RunMismatchError, merge_dirs
from hessrank.analysis.trajectory import analyze
from hessrank.cli import main
from hessrank.io import read_tensors, write_tensors
from tests.analysis.conftest import RUN_CONFIG

FAST = {"matvecs": 10, "progress": False}


def _server(table, round: int) -> float:
    t = table[(table["quantity"] == "stable-rank") & (table["subject"] == "server")
              & (table["round"] == round)]
    assert len(t) == 1
    return float(t["value"].iloc[0])


def _overwrite_with_garbage(path, seed: int = 0) -> None:
    """Finite random tensors of the same names, shapes and dtypes, with the file's metadata;
    re-signed (its content hash recomputed) when the trainer's checkpoints carry one, as a
    checkpoint of another run with the same config would be."""
    import hessrank.io as hio

    tensors, meta = read_tensors(path)
    g = torch.Generator().manual_seed(seed)
    new = {k: (torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v)
           for k, v in tensors.items()}
    digest = getattr(hio, "tensor_digest", None)
    if "content_sha256" in meta and digest is not None:
        meta = {**meta, "content_sha256": digest(new)}
    write_tensors(path, new, meta)


def test_checkpoint_overwritten_with_garbage_is_refused(run_copy, tmp_path, capsys):
    """Before: analyzed as genuine (3.08 reported instead of 84.08), exit 0."""
    from hessrank.analysis.sources import CheckpointMismatchError

    out = tmp_path / "an"
    before = analyze(run_copy, rounds="1", subjects="server", out=out, **FAST)
    path = run_copy / "checkpoints" / "round_00001.safetensors"
    _overwrite_with_garbage(path)
    argv = ["analyze", str(run_copy), "--rounds", "1", "--subjects", "server", "--matvecs",
            "10", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    try:  # into a fresh --out: refused where the trainer's checkpoints carry their identity
        fresh = analyze(run_copy, rounds="1", subjects="server", out=tmp_path / "fresh",
                        **FAST)
    except CheckpointMismatchError:
        return  # (and then --force cannot make it this run's either)
    assert _server(fresh, 1) != _server(before, 1)  # the store remembered the old content
    forced = analyze(run_copy, rounds="1", subjects="server", out=out, force=True, **FAST)
    assert _server(forced, 1) == _server(fresh, 1)  # --force: the new file, recomputed


def test_merge_refuses_runs_with_one_config_and_different_checkpoints(trained_run, tmp_path,
                                                                      capsys):
    """Before: merged, so round 1 mixed a server from one checkpoint with clients from the
    other, exit 0."""
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    _overwrite_with_garbage(other / "checkpoints" / "round_00001.safetensors", seed=3)
    a, b = tmp_path / "a", tmp_path / "b"
    analyze(trained_run, rounds="1", subjects="server", out=a, **FAST)
    analyze(trained_run, rounds="1", subjects="clients", out=b, **FAST)
    try:
        analyze(other, rounds="1", subjects="clients", out=b, force=True, **FAST)
    except ValueError as err:  # the trainer's content hash refused the garbage: done
        assert "round_00001" in str(err)
        return
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(a) in err and str(b) in err, err
    assert "round 1" in err
    with pytest.raises(RunMismatchError, match="different checkpoints at round 1"):
        merge_dirs([a, b], tmp_path / "m2")
    assert not (tmp_path / "m" / "results.parquet").exists()


def test_cosine_run_of_4_rounds_is_not_analyzed_into_a_2_round_runs_out(tmp_path, capsys):
    """Before: the 4-round run's rows replaced the 2-round run's, exit 0 (the number of rounds
    was left out of the run identity, though a cosine schedule depends on it)."""
    cfg = {**RUN_CONFIG, "lr_schedule": "cosine", "lr": 0.5}
    two, four = tmp_path / "two", tmp_path / "four"
    fl.train({**cfg, "rounds": 2}, two, progress=False)
    fl.train({**cfg, "rounds": 4}, four, progress=False)
    out = tmp_path / "an"
    analyze(two, rounds="1", subjects="server", out=out, **FAST)
    argv = ["analyze", str(four), "--rounds", "1", "--subjects", "server", "--matvecs", "10",
            "--quiet", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another run" in err and str(four) in err, err
    # a constant schedule does not depend on the number of rounds: a run continued to more
    # rounds (here: retrained with more, the same checkpoints up to round 2) keeps its
    # analysis directory, and its analyzed units are reused
    const = {**RUN_CONFIG, "rounds": 2}
    c2, c4 = tmp_path / "c2", tmp_path / "c4"
    fl.train(const, c2, progress=False)
    fl.train({**const, "rounds": 4}, c4, progress=False)
    out2 = tmp_path / "an2"
    first = analyze(c2, rounds="1", subjects="server", out=out2, threads=1, **FAST)
    again = analyze(c4, rounds="1", subjects="server", out=out2, threads=1, **FAST)
    assert _server(first, 1) == _server(again, 1)


def test_unit_keys_hold_the_thread_count(trained_run, tmp_path):
    """Analysis bits depend on the thread count (experiments/benchmarks/results/threads.md),
    so a unit computed at 1 thread is not reused at 2: before, the key ignored it."""
    import json

    out = tmp_path / "an"
    one = analyze(trained_run, rounds="1", subjects="server", out=out, threads=1, **FAST)
    two = analyze(trained_run, rounds="1", subjects="server", out=out, threads=2, **FAST)
    calls = json.loads((out / "analysis.json").read_text())["calls"]
    assert [c["computed"] for c in calls] == [1, 1] and calls[1]["reused"] == 0
    assert set(one["unit"]).isdisjoint(two["unit"])
    again = analyze(trained_run, rounds="1", subjects="server", out=out, threads=1, **FAST)
    assert json.loads((out / "analysis.json").read_text())["calls"][-1]["reused"] == 1
    assert again["unit"].equals(one["unit"])


def test_edited_model_factory_is_recomputed(tmp_path, monkeypatch):
    """Before: a factory module's forward edited from tanh to relu, rerun into the same --out,
    reused the cached unit (11.195 reported, true 10.452), exit 0."""
    from hessrank.models import build_model

    monkeypatch.chdir(tmp_path)
    source = ("import torch\n"
              "class Net(torch.nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.fc1 = torch.nn.Linear(64, 6)\n"
              "        self.out = torch.nn.Linear(6, 10)\n"
              "    def forward(self, x):\n"
              "        return self.out(torch.ACT(self.fc1(x.flatten(1))))\n"
              "def make():\n"
              "    return Net()\n")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    mlp = build_model("mlp", (1, 8, 8), 10, hidden=(6,))
    torch.save(mlp.state_dict(), ckpts / "round_1.pt")
    values = {}
    for act in ("tanh", "relu"):
        (tmp_path / "edited_net.py").write_text(source.replace("ACT", act))
        shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)  # same size, same second
        sys.modules.pop("edited_net", None)
        t = analyze(ckpts, model_factory="edited_net:make", dataset="digits", clients=2,
                    subjects="server", out=tmp_path / "an", **FAST)
        fresh = analyze(ckpts, model_factory="edited_net:make", dataset="digits", clients=2,
                        subjects="server", out=tmp_path / f"fresh_{act}", **FAST)
        assert _server(t, 1) == _server(fresh, 1)
        values[act] = _server(t, 1)
    assert values["tanh"] != values["relu"]
