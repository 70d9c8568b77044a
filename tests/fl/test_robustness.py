"""Issue 9 #5-#7 on the training side: divergence, bad input, locks, provenance, threads."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save as st_save

from hessrank.cli import main
from hessrank.fl import RunDir, TrainConfig, train
from hessrank.fl.protocol import NonFiniteError
from hessrank.fl.rundir import read_checkpoint
from hessrank.fl.runner import LOCK_FILE
from hessrank.io import tensor_digest

from .test_runner import tiny


def _rewrite(path, change) -> None:
    """Rewrite a checkpoint file after ``change(tensors)`` mutated its tensors, with the
    content hash of the new tensors (a genuine checkpoint that holds bad values; a changed
    file without its hash is refused earlier, tests/fl/test_identity.py)."""
    tensors, meta = read_checkpoint(path)
    change(tensors)
    meta["content_sha256"] = tensor_digest(tensors)
    path.write_bytes(st_save(tensors, metadata=meta))


@pytest.mark.parametrize("lr", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_learning_rates_are_refused_before_any_work(tmp_path, lr):
    with pytest.raises(ValueError, match="config key 'lr': input should be"):
        TrainConfig(lr=lr)
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--lr", str(lr), "--quiet"]) != 0
    assert not out.exists()


@pytest.mark.parametrize("algo", ["fedavg", "fedloru", "fedlrt"])
def test_divergence_stops_names_round_and_client_keeps_last_finite(tmp_path, algo):
    # lr 0.1 for rounds 1-2, then 0.1 * 1e12: diverges in round 3
    cfg = tiny(algo=algo, rounds=6, save_every=5, lr_schedule="step", lr_decay=1e12,
               lr_step_every=2)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"diverged in round 3 .*client \d") as err:
        train(cfg, tmp_path / "r", progress=False)
    assert err.value.client_id is not None
    assert "last finite checkpoint is round 2" in str(err.value)
    run = RunDir(tmp_path / "r")
    assert run.rounds() == [0, 2]  # round 2 was not a save round: kept on divergence
    assert run.metrics()["round"].tolist() == [0, 1, 2]
    tensors, _ = read_checkpoint(run.checkpoint_path(2))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    # the kept round-2 checkpoint is the uninterrupted run's round 2
    ref = train(tiny(algo=algo, rounds=2, save_every=5), tmp_path / "ref", progress=False)
    ref_t, _ = read_checkpoint(ref.checkpoint_path(2))
    for key in ref_t:
        if key.startswith("model."):
            assert torch.equal(ref_t[key], tensors[key]), key


def test_cli_divergence_exits_nonzero_with_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--lr", "1e30", "--clients", "3",
                 "--rounds", "3", "--partition", "iid", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and "diverged in round 1" in err and len(err.splitlines()) == 1


def test_resume_from_non_finite_checkpoint_is_refused(tmp_path):
    run = train(tiny(rounds=2), tmp_path / "r", progress=False)

    def poison(t):
        t["state.fc1.weight"][0, 0] = float("nan")
        t["model.fc1.weight"][0, 0] = float("nan")

    _rewrite(run.checkpoint_path(2), poison)
    with pytest.raises(ValueError, match="non-finite values .*refusing to resume"):
        train(tiny(rounds=4), tmp_path / "r", progress=False)


def test_resume_with_wrong_tensor_shape_is_one_line(tmp_path):
    run = train(tiny(rounds=2), tmp_path / "r", progress=False)

    def reshape(t):
        t["state.fc1.weight"] = torch.zeros(3, 3)
        t["model.fc1.weight"] = torch.zeros(3, 3)

    _rewrite(run.checkpoint_path(2), reshape)
    with pytest.raises(ValueError, match=r"does not fit this run's model .*shape \(3, 3\)"):
        train(tiny(rounds=4), tmp_path / "r", progress=False)


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        train(tiny(rounds=1), f, progress=False)
    with pytest.raises(NotADirectoryError):
        train(tiny(rounds=1), f / "sub", progress=False)
    # /sys refuses new entries even to root (chmod-based read-only tests do not bind root)
    assert main(["train", "--out", "/sys/hessrank-test-run", "--rounds", "1", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "hessrank-test-run" in err and len(err.splitlines()) == 1


def test_cuda_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(tiny(rounds=1), tmp_path / "r", progress=False, device="cuda")
    assert not (tmp_path / "r").exists()


def test_config_file_with_wrong_type(tmp_path, capsys):
    with pytest.raises(ValueError, match="'clients': input should be a valid integer, got str"):
        TrainConfig.from_dict({"clients": "5"})
    with pytest.raises(ValueError, match="'rank': input should be a valid integer, got bool"):
        TrainConfig.from_dict({"rank": True})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": "fast"}))
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(path)]) != 0
    assert "'lr': input should be a valid number, got str 'fast'" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(path)]) != 0
    assert "not valid JSON" in capsys.readouterr().err


def test_flags_checked_before_any_work(tmp_path):
    for bad in ({"batch_size": 0}, {"seed": 2**40}, {"momentum": 1.5}, {"partition": "x"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="'model': unknown value 'vgg'"):
        train(tiny(model="vgg"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "config.json").exists()


def test_disk_full_is_one_line_not_a_traceback(tmp_path, capsys):
    """``ulimit -f`` in this process for the call: writes beyond 20 kB fail with EFBIG (Python
    ignores SIGXFSZ), the way a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    argv = ["train", "--out", str(tmp_path / "r"), "--rounds", "1", "--clients", "2",
            "--partition", "iid", "--quiet"]  # fmt: skip
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err.strip()
    assert code != 0 and "File too large" in err and len(err.splitlines()) == 1


def test_concurrent_train_on_one_out_is_refused(tmp_path):
    out = tmp_path / "r"
    train(tiny(rounds=1), out, progress=False)
    with FileLock(str(out / LOCK_FILE)):  # another process holds the run
        with pytest.raises(ValueError, match="another process is training into"):
            train(tiny(rounds=2), out, progress=False)
    run = train(tiny(rounds=2), out, progress=False)
    assert run.metrics()["round"].tolist() == [0, 1, 2]  # no duplicated rows


def test_threads_flag_and_provenance(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--threads", "1", "--rounds", "1", "--clients", "2",
                 "--partition", "iid", "--quiet"]) == 0  # fmt: skip
    train(tiny(rounds=2, clients=2, partition="iid"), tmp_path / "p", progress=False, threads=1)
    train(tiny(rounds=3, clients=2, partition="iid"), tmp_path / "p", progress=False, threads=1)
    sessions = json.loads((tmp_path / "p" / "provenance.json").read_text())["sessions"]
    assert [s["resumed_from"] for s in sessions] == [None, 2]
    first = sessions[0]
    assert first["threads"] == 1 and first["device"] == "cpu" and first["finished"]
    assert first["torch"] == torch.__version__ and len(first["dataset_fingerprint"]) == 64
    assert {"hessrank", "git_revision", "numpy", "python", "command", "started"} <= set(first)
    cli = json.loads((out / "provenance.json").read_text())["sessions"][0]
    assert cli["command"][:2] == ["hessrank", "train"] and "--threads" in cli["command"]
    assert sessions[0]["dataset_fingerprint"] == sessions[1]["dataset_fingerprint"]
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--threads", "x"])
    assert main(["train", "--out", str(out), "--threads", "0"]) != 0


def test_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    for kwargs in ('{"hidden": "wide"}', '{"hidden": [-3]}'):
        code = main(["train", "--out", str(tmp_path / "r"), "--model-kwargs", kwargs, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and "model 'mlp'" in err, err
    code = main(["train", "--out", str(tmp_path / "r"), "--model", "cnn",
                 "--dataset", "lowrank-lsq", "--partition", "iid", "--quiet"])  # fmt: skip
    assert code != 0 and "image inputs" in capsys.readouterr().err


def test_provenance_never_records_a_session_token():
    """A Flower deployment starts its ServerApp as ``flwr-serverapp --token SECRET``."""
    from hessrank.fl.provenance import redacted

    argv = ["flwr-serverapp", "--token", "abc123", "--insecure", "--auth-secret=xyz", "--lr", "1"]
    assert redacted(argv) == ["flwr-serverapp", "--token", "<redacted>", "--insecure",
                              "--auth-secret=<redacted>", "--lr", "1"]  # fmt: skip
