"""process_group= (issue 14): two gloo processes on CPU holding uneven shards give the
single-process operator (float64, 1e-10); an estimator run on every rank with one seed agrees."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hessrank as hr

CUT = 13  # rank 0 holds 13 samples, rank 1 the other 27


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    return model, x, y


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, x, y = _setting()
        shard = (x[:CUT], y[:CUT]) if rank == 0 else (x[CUT:], y[CUT:])
        V = torch.randn(sum(p.numel() for p in model.parameters()),
                        3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        results = {}
        for name, cls in (("hessian", hr.HessianOperator), ("ggn", hr.GGNOperator)):
            op = cls(model, nn.functional.cross_entropy, shard, batch_size=8, process_group=True)
            results[name] = op.matmat(V)
            results[name + "_top"] = torch.as_tensor(
                hr.lanczos(op, k=1, num_matvecs=20, seed=0).eigenvalues)
            results[name + "_n"] = torch.tensor(op.num_samples)
        results["loss"] = torch.tensor(op.loss_value, dtype=torch.float64)
        results["grad"] = op.gradient()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    init = f"file://{tmp_path / 'init'}"
    out = str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork: the children inherit the imported modules (spawn re-imports torch: ~10× slower)
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, join=True, start_method="fork")
    model, x, y = _setting()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, cls in (("hessian", hr.HessianOperator), ("ggn", hr.GGNOperator)):
        op = cls(model, nn.functional.cross_entropy, (x, y))
        ref = op.matmat(V)
        top = hr.lanczos(op, k=1, num_matvecs=20, seed=0).eigenvalues
        for r in ranks:
            assert int(r[name + "_n"]) == 40
            torch.testing.assert_close(r[name], ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(r[name + "_top"], torch.as_tensor(top), rtol=1e-10,
                                       atol=1e-12)
    for r in ranks:
        assert abs(float(r["loss"]) - op.loss_value) < 1e-12
        torch.testing.assert_close(r["grad"], op.gradient(), rtol=0, atol=1e-12)
