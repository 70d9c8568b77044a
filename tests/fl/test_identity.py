"""Issue 19 #2-#4 on the trainer's side: checkpoints carry their run's fingerprint and a
content hash (a checkpoint from another run, one overwritten with finite garbage, or one
whose model.* and state.* copies disagree is refused with one line naming both values); the
fingerprint covers rounds when the schedule depends on them; a damaged training history is
never silently cut short, and a finished run with a lost history is one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save as st_save

from hessrank.cli import main
from hessrank.fl import RunDir, TrainConfig, run_fingerprint, train
from hessrank.fl.rundir import read_checkpoint
from hessrank.io import tensor_digest

from .test_runner import tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 2-round runs of different seeds (same shapes, other weights)."""
    root = tmp_path_factory.mktemp("runs")
    a = train(tiny(rounds=2, save_every=1), root / "a", progress=False)
    b = train(tiny(rounds=2, save_every=1, seed=1), root / "b", progress=False)
    return a, b


def _copy(run: RunDir, dest) -> RunDir:
    shutil.copytree(run.path, dest)
    return RunDir(dest)


def test_every_checkpoint_carries_fingerprint_and_content_hash(runs):
    a, _ = runs
    for r in a.rounds():
        tensors, meta = read_checkpoint(a.checkpoint_path(r))
        assert meta["fingerprint"] == a.fingerprint == run_fingerprint(a.config)
        assert meta["content_sha256"] == tensor_digest(tensors) == a.checkpoint_hash(r)
    saved = json.loads((a.path / "config.json").read_text())
    assert run_fingerprint(saved) == a.fingerprint  # the analysis hashes the saved config


def test_checkpoint_copied_from_another_run_is_refused(runs, tmp_path):
    a, b = runs
    c = _copy(a, tmp_path / "c")
    shutil.copy(b.checkpoint_path(1), c.checkpoint_path(1))
    with pytest.raises(ValueError, match="belongs to another run") as err:
        c.load_model(1)
    assert b.fingerprint[:16] in str(err.value) and a.fingerprint[:16] in str(err.value)
    shutil.copy(b.checkpoint_path(2), c.checkpoint_path(2))  # the one a resume starts from
    with pytest.raises(ValueError, match="belongs to another run"):
        train(tiny(rounds=3, save_every=1), c.path, progress=False)


def test_checkpoint_overwritten_with_finite_garbage_is_refused(runs, tmp_path):
    a, _ = runs
    c = _copy(a, tmp_path / "c")
    path = c.checkpoint_path(2)
    tensors, meta = read_checkpoint(path)
    tensors = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
               for k, v in tensors.items()}  # fmt: skip
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="changed after it was written") as err:
        c.load_model(2)
    assert tensor_digest(tensors)[:16] in str(err.value)
    assert meta["content_sha256"][:16] in str(err.value)
    assert "\n" not in str(err.value)


def test_model_and_state_copies_that_disagree_are_refused(runs, tmp_path):
    a, _ = runs
    c = _copy(a, tmp_path / "c")
    path = c.checkpoint_path(1)
    tensors, meta = read_checkpoint(path)
    tensors["model.fc1.weight"] = tensors["model.fc1.weight"] + 1.0
    meta["content_sha256"] = tensor_digest(tensors)  # consistent hash, inconsistent copies
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(ValueError, match="model.fc1.weight and state.fc1.weight hold different"):
        c.load_model(1)


def test_fingerprint_covers_every_trajectory_key_and_rounds_under_cosine():
    base = TrainConfig(**tiny())
    same = [dict(rounds=9), dict(save_every=7), dict(eval_every=3), dict(record_updates=True),
            dict(data_root="/elsewhere"), dict(notes={"x": "y"}), dict(prox_mu=0.5),
            dict(server_lr=2.0)]  # bookkeeping, or options fedavg does not read
    for change in same:
        assert TrainConfig(**{**tiny(), **change}).fingerprint() == base.fingerprint(), change
    for change in (dict(lr=0.2), dict(seed=1), dict(dtype="float64"), dict(clients=5),
                   dict(dataset_kwargs={"limit": 100}), dict(momentum=0.5)):
        assert TrainConfig(**{**tiny(), **change}).fingerprint() != base.fingerprint(), change
    fedprox = TrainConfig(**tiny(algo="fedprox"))
    assert TrainConfig(**tiny(algo="fedprox", prox_mu=0.5)).fingerprint() != fedprox.fingerprint()
    cos = [TrainConfig(**tiny(lr_schedule="cosine", rounds=r)).fingerprint() for r in (2, 4)]
    assert cos[0] != cos[1]  # the schedule depends on rounds: a 4-round run is another run


def test_cosine_run_of_other_rounds_cannot_take_the_directory(tmp_path):
    train(tiny(lr_schedule="cosine", rounds=2), tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match=r"different config \(rounds: 2 -> 4\)"):
        train(tiny(lr_schedule="cosine", rounds=4), tmp_path / "r", progress=False)


# ---- training history ---------------------------------------------------------------------------
def _damage(path, line_no: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_no - 1] = '{"round": 1, "train_loss": 0.3, "te\n'
    path.write_text("".join(lines))


def test_damaged_line_refuses_resume_naming_file_and_line(tmp_path):
    run = train(tiny(rounds=4, save_every=2), tmp_path / "r", progress=False)
    metrics = run.path / "metrics.jsonl"
    _damage(metrics, 2)  # round 1's row; rounds 2..4 after it are valid
    before = metrics.read_text()
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics row"):
        train(tiny(rounds=6, save_every=2), tmp_path / "r", progress=False)
    assert metrics.read_text() == before  # nothing dropped, nothing rewritten
    with pytest.raises(ValueError, match="line 2"):
        run.metrics()


def test_torn_last_line_is_dropped_and_recomputed(tmp_path):
    whole = train(tiny(rounds=3, save_every=2), tmp_path / "whole", progress=False)
    cut = train(tiny(rounds=2, save_every=2), tmp_path / "cut", progress=False)
    with open(cut.path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "train_lo')  # a kill in the middle of an append
    assert cut.metrics()["round"].tolist() == [0, 1, 2]
    resumed = train(tiny(rounds=3, save_every=2), tmp_path / "cut", progress=False)
    assert resumed.metrics()["round"].tolist() == [0, 1, 2, 3]
    a, b = whole.metrics(), resumed.metrics()
    assert a["test_loss"].tolist() == b["test_loss"].tolist()


def test_missing_rows_refuse_resume(tmp_path):
    run = train(tiny(rounds=4, save_every=2), tmp_path / "r", progress=False)
    metrics = run.path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2] + lines[3:]))  # round 2's row gone
    with pytest.raises(ValueError, match=r"lacks the rows of rounds \[2\]"):
        train(tiny(rounds=6, save_every=2), tmp_path / "r", progress=False)


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage"])
def test_finished_run_with_lost_history_is_one_line(tmp_path, capsys, damage):
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--rounds", "2", "--clients", "2", "--partition",
            "iid", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    metrics = out / "metrics.jsonl"
    if damage == "missing":
        metrics.unlink()
    elif damage == "empty":
        metrics.write_text("")
    else:
        metrics.write_text("not json\n" + metrics.read_text())
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "metrics.jsonl" in err and "IndexError" not in err and "Traceback" not in err
