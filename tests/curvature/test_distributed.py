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


def _launch(worker, tmp_path, world: int = 2) -> list[dict]:
    """Run ``worker(rank, world, init, out)`` on ``world`` gloo ranks; each rank's results."""
    init, out = f"file://{tmp_path / 'init'}", str(tmp_path / "res")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork: the children inherit the imported modules (spawn re-imports torch: ~10× slower)
    mp.start_processes(worker, args=(world, init, out), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    ranks = _launch(_worker, tmp_path)
    model, x, y = _setting()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3,
                    generator=torch.Generator().manual_seed(2), dtype=torch.float64)
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


# ---- the federated stack: one all-reduce of (J, p, k) per block product -------------------------
SIZES = (11, 17, 12)  # three clients; rank 0 holds the first 4 samples of each, rank 1 the rest


def _clients():
    model, x, y = _setting()
    out, a = [], 0
    for n in SIZES:
        out.append((x[a:a + n], y[a:a + n]))
        a += n
    return model, out


def _stack_probes(model, k=2):
    p = sum(q.numel() for q in model.parameters())
    gen = torch.Generator().manual_seed(5)
    return torch.randn(len(SIZES) + 1, p, k, generator=gen, dtype=torch.float64)


def _federated_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, clients = _clients()
        shards = [(x[:4], y[:4]) if rank == 0 else (x[4:], y[4:]) for x, y in clients]
        V = _stack_probes(model)
        results, calls = {}, []
        real = dist.all_reduce

        def counting(t, *args, **kwargs):
            calls.append(t.numel())
            return real(t, *args, **kwargs)

        for strategy in ("stacked", "per-client"):
            for curvature in ("hessian", "ggn"):
                op = hr.FederatedOperator(model, nn.functional.cross_entropy, shards, curvature,
                                          strategy=strategy, process_group=True)
                dist.all_reduce = counting
                try:
                    calls.clear()
                    results[f"{strategy}/{curvature}"] = op.matmat(V)
                    results[f"{strategy}/{curvature}/calls"] = torch.tensor(calls)
                finally:
                    dist.all_reduce = real
                results[f"{strategy}/{curvature}/route"] = op.strategy
        # a budget that rank 0's shards fit and rank 1's do not: both ranks go per-client
        fits = hr.HessianOperator(model, nn.functional.cross_entropy, shards[0] if rank == 0
                                  else (clients[0][0][:4], clients[0][1][:4]))
        op = hr.FederatedOperator(model, nn.functional.cross_entropy, shards,
                                  process_group=True,
                                  cache_budget_mb=1.01 * fits.estimated_cache_mb())
        results["mixed"] = op.matmat(V)
        results["mixed/route"] = op.strategy
        results["mixed/cache"] = op.clients[1].route["cache"]
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_federated_stack_sharded_over_two_ranks_is_one_all_reduce(tmp_path):
    """Both strategies under process_group= give the single-process stack (1e-10, float64,
    uneven shards) with exactly one all-reduce of J·p·k floats per block product."""
    ranks = _launch(_federated_worker, tmp_path)
    model, clients = _clients()
    V = _stack_probes(model)
    for curvature in ("hessian", "ggn"):
        ref = hr.FederatedOperator(model, nn.functional.cross_entropy, clients,
                                   curvature).matmat(V)
        for strategy in ("stacked", "per-client"):
            key = f"{strategy}/{curvature}"
            for r in ranks:
                assert r[key + "/route"] == strategy
                torch.testing.assert_close(r[key], ref, rtol=0, atol=1e-10)
                assert r[key + "/calls"].tolist() == [V.numel()]
    hessian = hr.FederatedOperator(model, nn.functional.cross_entropy, clients).matmat(V)
    assert [r["mixed/cache"] for r in ranks] == [True, False]
    for r in ranks:
        assert r["mixed/route"] == "per-client"
        torch.testing.assert_close(r["mixed"], hessian, rtol=0, atol=1e-10)
