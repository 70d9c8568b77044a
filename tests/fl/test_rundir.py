"""Run-directory format: atomic writes, checkpoint round trip, and readable errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save as st_save

from hessrank.fl import TrainConfig, train
from hessrank.fl.rundir import RunDir, checkpoint_path, read_checkpoint
from hessrank.io import atomic_write_text


def _tiny(**kw) -> dict:
    base = {"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [16, 16]},
            "clients": 3, "partition": "iid", "rounds": 2, "local_steps": 2, "save_every": 1,
            "algo": "fedloru", "rank": 4, "merge_every": 1}  # fmt: skip
    return {**base, **kw}


@pytest.fixture(scope="module")
def run_and_outputs(tmp_path_factory):
    """A 2-round run plus the global model's outputs on a fixed batch after each round."""
    out = tmp_path_factory.mktemp("run") / "r"
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = {}

    def capture(t, algo):
        with torch.no_grad():
            outputs[t] = algo.effective_model().eval()(x)

    run = train(_tiny(), out, progress=False, callback=capture)
    return run, x, outputs


def test_checkpoint_loads_into_an_identical_model(run_and_outputs):
    run, x, outputs = run_and_outputs
    assert run.rounds() == [0, 1, 2]
    for t in (1, 2):
        model = run.load_model(t)
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model(x), outputs[t])
    assert run.load_model(2, dtype=torch.float64).fc1.weight.dtype == torch.float64


def test_reader_gives_data_partition_metrics(run_and_outputs):
    run, _, _ = run_and_outputs
    data = run.client_data()
    assert [len(y) for _, y in data] == run.partition().sizes()
    assert sum(len(y) for _, y in data) == len(run.dataset().train_y)
    loss = run.task()(torch.zeros(2, 10), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    df = run.metrics()
    assert df["round"].tolist() == [0, 1, 2]


def test_missing_round_lists_saved_rounds(run_and_outputs):
    run, _, _ = run_and_outputs
    with pytest.raises(ValueError, match=r"no checkpoint for round 7; saved rounds: \[0, 1, 2\]"):
        run.load_model(7)


def test_corrupt_checkpoint_names_the_file(run_and_outputs, tmp_path):
    run, _, _ = run_and_outputs
    bad = RunDir(run.path)
    path = checkpoint_path(bad.path, 1)
    original = path.read_bytes()
    try:
        path.write_bytes(original[:50])
        with pytest.raises(ValueError, match="round_00001.safetensors is corrupt"):
            bad.load_model(1)
    finally:
        path.write_bytes(original)


def test_checkpoint_of_another_config_names_the_file(run_and_outputs, tmp_path):
    run, _, _ = run_and_outputs
    copy_dir = tmp_path / "copy"
    shutil.copytree(run.path, copy_dir)
    cfg = TrainConfig.load(copy_dir / "config.json")
    cfg.model, cfg.model_kwargs = "linear", {}
    cfg.save(copy_dir / "config.json")
    with pytest.raises(ValueError, match="round_00001.safetensors belongs to another run"):
        RunDir(copy_dir).load_model(1)
    path = checkpoint_path(copy_dir, 1)  # written before fingerprints: the keys do not match
    tensors, meta = read_checkpoint(path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "fingerprint")}
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="round_00001.safetensors does not match model 'linear'"):
        RunDir(copy_dir).load_model(1)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory"):
        RunDir(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        RunDir(tmp_path)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]
