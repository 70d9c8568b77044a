"""The training loop: reproducibility, resume after a kill, sampling, schedules, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from hessrank.fl import RunDir, TrainConfig, train
from hessrank.fl.loop import learning_rate, sample_clients
from hessrank.fl.rundir import read_checkpoint


def tiny(**kw) -> dict:
    """A run of about a tenth of a second per round on the digits data."""
    base = {
        "dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [16, 16]},
        "clients": 4, "partition": "iid", "rounds": 4, "local_steps": 3, "batch_size": 32,
        "lr": 0.1, "rank": 4, "lora_alpha": 4.0, "merge_every": 2, "save_every": 2,
    }  # fmt: skip
    return {**base, **kw}


def _final_tensors(run: RunDir) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run.checkpoint_path(run.rounds()[-1]))
    return tensors


class Kill(RuntimeError):
    pass


def _kill_at(round_idx: int):
    def callback(t, algo):
        if t == round_idx:
            raise Kill(f"killed after round {t}")

    return callback


@pytest.mark.parametrize(
    "algo", ["fedavg", "fedloru", "pfedloru", "mfedloru", "fedlrt", "scaffold"]
)
def test_killed_run_resumes_to_identical_weights(tmp_path, algo):
    cfg = tiny(algo=algo, client_fraction=0.5, rounds=5)
    whole = train(cfg, tmp_path / "whole", progress=False)
    with pytest.raises(Kill):  # dies after round 3; the last checkpoint is round 2
        train(cfg, tmp_path / "cut", progress=False, callback=_kill_at(3))
    assert RunDir(tmp_path / "cut").rounds() == [0, 2]
    resumed = train(cfg, tmp_path / "cut", progress=False)
    a, b = _final_tensors(whole), _final_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = resumed.metrics()
    assert rows["round"].tolist() == [0, 1, 2, 3, 4, 5]  # round 3 logged once, not twice
    assert rows["cum_floats"].tolist() == whole.metrics()["cum_floats"].tolist()


def test_extending_a_run_matches_a_longer_run(tmp_path):
    long = train(tiny(algo="fedloru", rounds=4), tmp_path / "long", progress=False)
    train(tiny(algo="fedloru", rounds=2), tmp_path / "ext", progress=False)
    ext = train(tiny(algo="fedloru", rounds=4), tmp_path / "ext", progress=False)
    assert json.loads((tmp_path / "ext" / "config.json").read_text())["rounds"] == 4
    a, b = _final_tensors(long), _final_tensors(ext)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_bits_other_seed_other_weights(tmp_path):
    runs = [train(tiny(algo="fedlora", seed=s), tmp_path / f"r{i}", progress=False)
            for i, s in enumerate((3, 3, 4))]  # fmt: skip
    t = [_final_tensors(r) for r in runs]
    assert all(torch.equal(t[0][k], t[1][k]) for k in t[0])
    assert not torch.equal(t[0]["model.fc1.weight"], t[2]["model.fc1.weight"])


def test_float64_run(tmp_path):
    run = train(tiny(algo="pfedloru", dtype="float64", rounds=1), tmp_path / "r", progress=False)
    assert run.load_model(1).fc1.weight.dtype == torch.float64
    assert 0.0 <= run.metrics()["personal_test_accuracy"].iloc[-1] <= 1.0


def test_run_directory_contents(tmp_path):
    run = train(tiny(algo="fedloru", rounds=3), tmp_path / "run", progress=False)
    assert run.rounds() == [0, 2, 3]  # init, every save_every, the final round
    rows = run.metrics()
    first = rows.iloc[1]
    assert first["floats_up_total"] == sum(first["floats_up"].values())
    assert sorted(first["ranks"].values()) == [4]
    assert 0.0 <= rows["test_accuracy"].iloc[-1] <= 1.0
    assert rows["train_loss"].iloc[-1] < rows["train_loss"].iloc[0]
    notes = run.config.notes
    assert "merge" in notes and notes["factorized_layers"] == "fc2"
    assert (tmp_path / "run" / "partition.json").is_file()


def test_different_config_in_existing_dir_is_refused(tmp_path):
    train(tiny(rounds=1), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"different config \(lr: 0.1 -> 0.2\)"):
        train(tiny(rounds=1, lr=0.2), tmp_path / "run", progress=False)


def test_bad_configs_fail_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="config key 'algo': unknown value 'fedsgd'"):
        TrainConfig(algo="fedsgd")
    with pytest.raises(ValueError, match=r"config keys \['roundz'\] \(did you mean 'rounds'"):
        train({"algo": "fedavg", "roundz": 3}, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="'lr_schedule': unknown value 'linear'; choose one"):
        train(tiny(lr_schedule="linear"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="'model': unknown value 'vgg'; choose one of mlp"):
        train(tiny(model="vgg"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="'dtype': unknown value 'int32'"):
        train(tiny(dtype="int32"), tmp_path / "d", progress=False)
    assert not any(tmp_path.iterdir())  # refused before any directory was made


def test_sample_clients_fraction_and_minimum():
    g = torch.Generator().manual_seed(0)
    assert sample_clients(10, 1.0, g) == list(range(10))
    picked = sample_clients(10, 0.3, g)
    assert len(picked) == 3 and len(set(picked)) == 3
    assert len(sample_clients(10, 0.01, g)) == 1


def test_learning_rate_schedules():
    cos = TrainConfig(lr=1.0, lr_schedule="cosine", rounds=10)
    assert learning_rate(cos, 1) == 1.0 and learning_rate(cos, 6) == pytest.approx(0.5)
    step = TrainConfig(lr=1.0, lr_schedule="step", lr_decay=0.1, lr_step_every=3)
    assert [learning_rate(step, t) for t in (1, 3, 4, 7)] == pytest.approx([1, 1, 0.1, 0.01])


def test_configs_saved_before_new_fields_keep_their_meaning(tmp_path):
    old = {"algo": "fedavg", "from_scratch": False, "rounds": 3, "notes": {}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = TrainConfig.load(tmp_path / "config.json")
    assert cfg.from_scratch is None and cfg.rounds == 3
    old = {"algo": "fedlrt", "notes": {}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = TrainConfig.load(tmp_path / "config.json")
    assert (cfg.fedlrt_init, cfg.fedlrt_weighting, cfg.trunc_theta) == ("svd", "size", 0.1)
    assert RunDir(tmp_path).config.fedlrt_init == "svd"
