"""``torchrun --nproc-per-node 2 -m hessrank analyze`` (issue 14): two gloo ranks on CPU, each
holding an uneven shard of every subject's data, give the one-process table (float64, value
and stderr to 1e-10); only rank 0 writes, and every rank exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hessrank.analysis.distributed import shard_bounds, shard_pair
from hessrank.analysis.plotting import load_table
from hessrank.analysis.trajectory import analyze

# subset:11x1 has 11 samples (6/5 over two ranks: uneven whatever the client sizes are)
ARGS = ["--rounds", "1,2", "--subjects", "server,clients,subset:11x1", "--quantities",
        "stable-rank,top-eig,trace", "--matvecs", "10", "--dtype", "float64", "--threads", "1",
        "--quiet"]


def test_shards_cover_every_sample_once_unevenly():
    for n, world in ((11, 2), (7, 3), (5, 5)):
        cuts = [shard_bounds(n, r, world) for r in range(world)]
        assert cuts[0][0] == 0 and cuts[-1][1] == n
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(cuts, cuts[1:]))
    x, y = torch.arange(11.0)[:, None], torch.arange(11)
    parts = [shard_pair((x, y), r, 2) for r in range(2)]
    assert [len(p[1]) for p in parts] == [5, 6]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="fewer than the 3 ranks"):
        shard_pair((x[:2], y[:2]), 0, 3)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_equal_one_process(trained_run, tmp_path):
    one = tmp_path / "one"
    analyze(trained_run, out=one, **{
        "rounds": "1,2", "subjects": "server,clients,subset:11x1",
        "quantities": "stable-rank,top-eig,trace", "matvecs": 10, "dtype": "float64",
        "threads": 1, "progress": False})
    two = tmp_path / "two"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hessrank", "analyze", str(trained_run), "--out", str(two), *ARGS],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rows selected") == 1  # rank 0 alone reports

    a, b = load_table(one), load_table(two)
    key = ["round", "subject", "quantity", "k"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 0
    assert set(b["subject"]) >= {"server", "client0", "subset11_0"}
    same = ["round", "subject", "subject_kind", "subject_size", "quantity", "k", "seed",
            "data_seed", "checkpoint", "data", "settings", "unit", "matvecs"]
    assert a[same].equals(b[same])
    for col in ("value", "stderr"):
        diff = (a[col] - b[col]).abs().max()
        assert diff <= 1e-10 * max(1.0, float(a[col].abs().max())), (col, diff)
    # the clients' products take the stacked strategy on the shards too (one all-reduce of
    # the whole stack per block product), as in one process
    assert b["route"].str.contains('"strategy": "stacked"').any()
    assert a["route"].str.contains('"strategy": "stacked"').any()


def test_workers_under_torchrun_is_refused(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun"):
        analyze(trained_run, out=tmp_path / "x", workers=2, rounds="1", progress=False)
    assert not (tmp_path / "x").exists()


def test_cuda_backend_keeps_gloo_for_the_cpu_scalars():
    """Operators all-reduce sample counts, losses and strategy decisions as CPU tensors, which
    an NCCL-only group refuses: with CUDA the group must also have gloo for CPU tensors."""
    from hessrank.analysis.distributed import backend_for

    assert backend_for("cpu") == "gloo"
    for device in ("cuda", "cuda:1"):
        parts = dict(p.split(":") for p in backend_for(device).split(","))
        assert parts == {"cpu": "gloo", "cuda": "nccl"}
