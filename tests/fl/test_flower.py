"""The Flower engine: the same client procedures as Flower ClientApps, the same run directory.

One Flower simulation (Ray backend, one CPU) runs every algorithm and also resumes runs that
the built-in engine started: its checkpoints must equal the built-in engine's, tensor for
tensor, client states included.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from hessrank.fl import RunDir, train
from hessrank.fl.presets import PRESETS
from hessrank.fl.rundir import read_checkpoint
from hessrank.fl.runner import train_many

pytest.importorskip("flwr", reason="the flwr[simulation] extra is not installed")

from hessrank.fl.flower import tensors_from_record, tensors_to_record  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes seconds (make check skips them)

ALGOS = {  # name -> config changes: every registered algorithm, both mFedLoRU schemes
    "fedavg": {}, "fedprox": {"prox_mu": 0.1}, "fedlora": {}, "fedloru": {},
    "pfedloru": {}, "mfedloru": {}, "mfedloru_width": {"mfedloru_scheme": "width"},
    "fedlrt": {}, "scaffold": {},
    "fedloru_preset": {  # the authors' settings (issue 23) on the MLP: dropout masks travel too
        **{k: v for k, v in PRESETS["fedloru-official"].items() if k != "factorize_rule"}},
}  # fmt: skip
RESUMED = ("pfedloru", "mfedloru", "fedlrt", "scaffold")  # client state or several phases
if importlib.util.find_spec("peft") and importlib.util.find_spec("transformers"):
    # FedLoRU on PEFT adapters of a frozen tiny GPT-2, Shakespeare roles as clients; resumed
    # too: after a merge the clients' W0 travels as held state
    ALGOS["fedloru_peft"] = {
        "adapters": "peft", "dataset": "shakespeare", "partition": "natural",
        "dataset_kwargs": {"roles": 3, "seq_len": 16, "stride": 64}, "model": "hf-gpt2",
        "model_kwargs": {"layers": 1, "width": 16, "heads": 2}, "rank": 2,
    }  # fmt: skip
    RESUMED += ("fedloru_peft",)


def _cfg(name: str, rounds: int = 2) -> dict:
    return {
        "algo": name.split("_")[0], "dataset": "digits", "model": "mlp",
        "model_kwargs": {"hidden": [16, 16]}, "clients": 3, "client_fraction": 0.67,
        "partition": "dirichlet", "dirichlet_alpha": 0.5, "rounds": rounds, "local_steps": 3,
        "batch_size": 32, "lr": 0.1, "rank": 4, "lora_alpha": 4.0, "merge_every": 1,
        "dtype": "float64", "save_every": 1, "record_updates": True, **ALGOS.get(name, {}),
    }  # fmt: skip


def _max_diff(a: RunDir, b: RunDir) -> float:
    """Largest |difference| over every tensor of every checkpoint (model, server state,
    client states, RNG) and every recorded update; the key sets must be equal."""
    assert a.rounds() == b.rounds() == [0, 1, 2]
    assert a.update_rounds() == b.update_rounds() == [1, 2]
    worst = 0.0
    pairs = [(read_checkpoint(a.checkpoint_path(r))[0], read_checkpoint(b.checkpoint_path(r))[0])
             for r in a.rounds()]  # fmt: skip
    pairs += [({f"{c}/{k}": v for c, d in a.client_updates(r).items() for k, v in d.items()},
               {f"{c}/{k}": v for c, d in b.client_updates(r).items() for k, v in d.items()})
              for r in (1, 2)]  # fmt: skip
    for ta, tb in pairs:
        assert set(ta) == set(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
            if ta[k].numel():
                worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()))
    return worst


@pytest.mark.timeout(900)
def test_every_algorithm_under_flower_equals_builtin(tmp_path):
    """Every algorithm trained by both engines, and runs the built-in engine stopped after
    round 1 resumed by Flower: equal checkpoints (the largest difference is printed; it is 0
    here, the test allows 1e-12)."""
    built = train_many([(_cfg(a), tmp_path / f"{a}_b") for a in ALGOS], progress=False)
    for a in RESUMED:  # round 1 by the built-in engine, round 2 by Flower below
        train(_cfg(a, rounds=1), tmp_path / f"{a}_r", progress=False)
    jobs = [(_cfg(a), tmp_path / f"{a}_f") for a in ALGOS]
    jobs += [(_cfg(a), tmp_path / f"{a}_r") for a in RESUMED]
    flower = train_many(jobs, progress=False, engine="flower")
    pairs = list(zip(ALGOS, built, flower))
    pairs += [(f"{a} resumed", built[list(ALGOS).index(a)], flower[len(ALGOS) + i])
              for i, a in enumerate(RESUMED)]  # fmt: skip
    for name, a, b in pairs:
        diff = _max_diff(a, b)
        print(f"{name}: max |checkpoint difference| = {diff:.3g}")
        assert diff <= 1e-12, name
        ma, mb = a.metrics(), b.metrics()
        for col in ("test_loss", "train_loss", "local_loss", "cum_floats"):
            np.testing.assert_allclose(
                ma[col].astype(float), mb[col].astype(float), rtol=0, atol=1e-12, err_msg=col
            )
        assert a.config.to_dict() == b.config.to_dict()
        assert (b.path / "partition.json").read_text() == (a.path / "partition.json").read_text()
    assert built[list(ALGOS).index("fedlrt")].metrics()["ranks"].iloc[-1]
    personal = built[list(ALGOS).index("pfedloru")].metrics()["personal_test_accuracy"]
    assert personal.notna().all()


def test_records_round_trip_exactly():
    tensors = {
        "w": torch.randn(3, 4, dtype=torch.float64), "s": torch.tensor(0.1, dtype=torch.float64),
        "n": torch.tensor(7), "g": torch.Generator().manual_seed(3).get_state(),
        "t": torch.randn(4, 3).T,  # non-contiguous
    }  # fmt: skip
    back = tensors_from_record(tensors_to_record(tensors))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_a_ray_start_timeout_starts_the_engine_once_more(monkeypatch):
    """Ray's own start-up timeout before any client replied: a second start (the runs resume
    from round 0); a second timeout is one line."""
    from hessrank.fl import flower

    calls: list = []

    def fails_once(num_nodes, server_loop):
        calls.append(num_nodes)
        if len(calls) == 1:
            raise flower.EngineStartError("Flower's simulation engine failed (... timed out during "
                                     "startup ...); rerun, or use --engine builtin")
        return "done"

    monkeypatch.setattr(flower, "run_engine_once", fails_once)
    assert flower.run_flower(3, lambda for_config: None) == "done" and calls == [3, 3]

    def always_fails(num_nodes, server_loop):
        raise flower.EngineStartError("Flower's engine failed (timed out during startup)")

    monkeypatch.setattr(flower, "run_engine_once", always_fails)
    match = "timed out during startup.*3 attempt"
    with pytest.raises(flower.FlowerEngineError, match=match) as err:
        flower.run_flower(3, lambda for_config: None)
    assert type(err.value) is flower.FlowerEngineError and "\n" not in str(err.value)


def test_unknown_engine_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown engine 'grpc'"):
        train(_cfg("fedavg"), tmp_path / "run", engine="grpc", progress=False)
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
