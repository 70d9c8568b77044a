"""The Flower engine: the same client code as a Flower ClientApp, the same run directory.

The equivalence test starts one Flower simulation (Ray backend, one CPU) for three runs.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hessrank.fl import RunDir, train
from hessrank.fl.rundir import read_checkpoint
from hessrank.fl.runner import train_many

pytest.importorskip("flwr", reason="the flwr[simulation] extra is not installed")

from hessrank.fl.flower import tensors_from_record, tensors_to_record  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes seconds (make check skips them)


def _cfg(algo: str) -> dict:
    return {
        "algo": algo, "dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [16, 16]},
        "clients": 3, "partition": "dirichlet", "dirichlet_alpha": 0.5, "rounds": 2,
        "local_steps": 3, "batch_size": 32, "lr": 0.1, "rank": 4, "lora_alpha": 4.0,
        "merge_every": 1, "dtype": "float64", "save_every": 1,
    }  # fmt: skip


def _max_diff(a: RunDir, b: RunDir) -> float:
    """Largest |difference| over every tensor of every checkpoint (state, model, RNG)."""
    assert a.rounds() == b.rounds() == [0, 1, 2]
    worst = 0.0
    for r in a.rounds():
        ta, _ = read_checkpoint(a.checkpoint_path(r))
        tb, _ = read_checkpoint(b.checkpoint_path(r))
        assert set(ta) == set(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
            if ta[k].numel():
                worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()))
    return worst


def test_flower_runs_equal_builtin_runs(tmp_path):
    algos = ["fedavg", "fedloru", "fedlrt"]
    built = train_many([(_cfg(a), tmp_path / f"{a}_b") for a in algos], progress=False)
    flower = train_many(
        [(_cfg(a), tmp_path / f"{a}_f") for a in algos], progress=False, engine="flower"
    )
    for algo, a, b in zip(algos, built, flower):
        diff = _max_diff(a, b)
        print(f"{algo}: max |checkpoint difference| = {diff:.3g}")
        assert diff <= 1e-12, algo
        ma, mb = a.metrics(), b.metrics()
        for col in ("test_loss", "train_loss", "local_loss", "cum_floats"):
            np.testing.assert_allclose(
                ma[col].astype(float), mb[col].astype(float), rtol=0, atol=1e-12, err_msg=col
            )
        assert a.config.to_dict() == b.config.to_dict()
        assert (b.path / "partition.json").read_text() == (a.path / "partition.json").read_text()
    assert built[2].metrics()["ranks"].iloc[-1]  # FeDLRT logged its ranks through Flower


def test_records_round_trip_exactly():
    tensors = {
        "w": torch.randn(3, 4, dtype=torch.float64), "s": torch.tensor(0.1, dtype=torch.float64),
        "n": torch.tensor(7), "g": torch.Generator().manual_seed(3).get_state(),
        "t": torch.randn(4, 3).T,  # non-contiguous
    }  # fmt: skip
    back = tensors_from_record(tensors_to_record(tensors))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize(
    "algo, engine, message",
    [("pfedloru", "flower", "keep state"), ("fedavg", "grpc", "unknown engine")],
)
def test_unsupported_engine_is_one_line(tmp_path, algo, engine, message):
    with pytest.raises(ValueError, match=message):
        train(_cfg(algo), tmp_path / "run", engine=engine, progress=False)
    assert not (tmp_path / "run").exists()


def test_deployed_serverapp_names_missing_run_config():
    from flwr.app import Context, RecordDict

    from hessrank.fl.flower_app import serverapp

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"out": "x"})
    with pytest.raises(ValueError, match=r"\['config'\]"):
        serverapp(grid=None, context=ctx)


def test_engine_that_fails_to_start_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ray's start timing out (forced here after its processes are up, the worst case) is
    tried again, then ends the run with one line, and no thread or process of the engine
    survives the call."""
    import threading

    import psutil
    import ray

    from hessrank.fl import flower
    from hessrank.fl.flower import FlowerEngineError

    real_init = ray.init

    def init_then_time_out(*args, **kwargs):
        real_init(*args, **kwargs)
        raise TimeoutError("forced: Ray's start timed out")

    monkeypatch.setattr(ray, "init", init_then_time_out)
    monkeypatch.setattr(flower, "START_ATTEMPTS", 2)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    threads = set(threading.enumerate())
    with pytest.raises(FlowerEngineError, match=r"failed to start \(.*\), 2 attempt") as err:
        train(_cfg("fedavg"), tmp_path / "run", progress=False, engine="flower")
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert [p for p in me.children(recursive=True) if p.pid not in before] == []
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:
        time.sleep(0.1)  # the ServerApp thread sees the stop within one pull interval
    assert not [t for t in set(threading.enumerate()) - threads if not t.daemon]
