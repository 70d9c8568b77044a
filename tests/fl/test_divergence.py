"""Issue 23: divergence caught before overflow (loss ratio, weight bound), and the options
added for the authors' settings leave every existing run's identity and weights unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from hessrank.cli import main
from hessrank.fl import RunDir, TrainConfig, train
from hessrank.fl.divergence import DivergedError, DivergenceGuard
from hessrank.fl.rundir import read_checkpoint

from .test_runner import tiny

# The heterogeneous least-squares run of issue 23: FeDLRT at lr 0.3, 25 full-batch local
# steps, one group per client, float32. Measured before the check existed (50 rounds): the
# training loss grew to 3.1e31 (full correction) and 1.6e27 (simplified), every value finite,
# and the run finished with exit status 0.
HETERO_LSQ = ["--algo", "fedlrt", "--dataset", "hetero-lsq", "--dataset-kwargs",
              '{"groups": 4, "heterogeneity": 1.0}', "--model", "linear", "--factorize", "fc",
              "--clients", "4", "--partition", "shards", "--shards-per-client", "1",
              "--local-steps", "25", "--batch-size", "100000", "--lr", "0.3", "--rank", "4",
              "--trunc-theta", "0.01", "--quiet"]  # fmt: skip

# Fingerprints of the default config of every algorithm, computed on main before the options
# of issue 23 existed (99180e6): the new keys at their neutral values stay out of the identity.
FINGERPRINTS_BEFORE = {
    "fedavg": "38c19af6d83ce5b2dbb67b6ce93af00348490e0f84dafb75a8d223e7311209e9",
    "fedlora": "7cb70d3786cf9ff6cf75603f00110bc4f066366bfd4e8644777d2c42012640eb",
    "fedloru": "acebd46db40d8f47094c35fb7e57ef78673cb3855318ed42b7a6acab9a337a10",
    "fedlrt": "0024b45257c491eccbd15e633203935898dc4c133ebe1db7923c881252d956f2",
    "fedprox": "5e2515900d2ea9dfd3dd98ce295c7145cc15d9d8742df019c3662283d1e1dbaf",
    "mfedloru": "850ae43ada43954fbd047be5bb142005a92483d63ee4d9743057af3c6c9dd7e1",
    "pfedloru": "5ea30cb767bb3c9b1715e6a0e9f7ad2023637810bdbd40570ce041abd8d7149e",
    "scaffold": "cffa0843ba0773206d47c130b2fba1ec90945c3bd902e315620e13e53226c3f2",
}


@pytest.mark.parametrize("correction,stop", [("full", 6), ("simplified", 8)])
def test_hetero_lsq_lr_03_stops_before_overflow(tmp_path, capsys, correction, stop):
    out = tmp_path / correction
    code = main(["train", "--out", str(out), "--rounds", "12", "--correction", correction,
                 *HETERO_LSQ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "Traceback" not in err
    # measured: full stops in round 6 (loss 7.85e3 > 1e3 x 4.167), simplified in round 8
    assert f"diverged in round {stop} " in err and "client " in err, err
    assert "divergence_factor 1000 x the initial training loss" in err
    run = RunDir(out)
    assert run.rounds()[-1] == stop - 1  # the last good round is kept
    assert run.metrics()["round"].tolist() == list(range(stop))
    tensors, _ = read_checkpoint(run.checkpoint_path(stop - 1))
    assert max(float(t.abs().max()) for t in tensors.values() if t.is_floating_point()) < 1e3


def test_hetero_lsq_with_the_check_off_runs_on(tmp_path):
    """The same run with --divergence-factor 0 passes round 6 (the check is what stops it)."""
    out = tmp_path / "off"
    assert main(["train", "--out", str(out), "--rounds", "7", "--correction", "full",
                 "--divergence-factor", "0", *HETERO_LSQ]) == 0  # fmt: skip
    losses = RunDir(out).metrics()["train_loss"].tolist()
    assert losses[7] > 1e3 * losses[0]


def test_weight_bound_names_the_client_and_resume_may_raise_it(tmp_path):
    cfg = tiny(rounds=3, save_every=1, weight_bound=0.2)  # a tiny MLP has weights up to 1/4
    with pytest.raises(DivergedError, match=r"diverged in round 1 .*client \d's reply holds") as e:
        train(cfg, tmp_path / "r", progress=False)
    assert e.value.client_id is not None and "weight_bound 0.2" in str(e.value)
    assert RunDir(tmp_path / "r").rounds() == [0]
    # the checks are no part of the run's identity: the stopped run resumes with them off
    run = train({**cfg, "weight_bound": 0.0}, tmp_path / "r", progress=False)
    whole = train(tiny(rounds=3, save_every=1), tmp_path / "whole", progress=False)
    a, b = read_checkpoint(run.checkpoint_path(3))[0], read_checkpoint(whole.checkpoint_path(3))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo", ["fedavg", "fedloru", "fedlrt"])
def test_checks_never_change_the_weights(tmp_path, algo):
    on = train(tiny(algo=algo, rounds=3), tmp_path / "on", progress=False)
    off = train(tiny(algo=algo, rounds=3, divergence_factor=0.0, weight_bound=0.0),
                tmp_path / "off", progress=False)  # fmt: skip
    a, b = read_checkpoint(on.checkpoint_path(3))[0], read_checkpoint(off.checkpoint_path(3))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on.fingerprint == off.fingerprint


@pytest.mark.parametrize("algo", sorted(FINGERPRINTS_BEFORE))
def test_new_options_at_their_defaults_keep_every_fingerprint(algo):
    assert TrainConfig(algo=algo).fingerprint() == FINGERPRINTS_BEFORE[algo]


def test_new_options_enter_the_fingerprint_when_set():
    base = TrainConfig(**tiny(algo="fedloru")).fingerprint()
    for change in (dict(max_grad_norm=0.1), dict(lowrank_dropout=0.1), dict(lora_init="kaiming"),
                   dict(merge_mode="accumulate"), dict(factorize_rule="conv")):
        assert TrainConfig(**tiny(algo="fedloru", **change)).fingerprint() != base, change
    for change in (dict(divergence_factor=10.0), dict(weight_bound=5.0)):
        assert TrainConfig(**tiny(algo="fedloru", **change)).fingerprint() == base, change


def test_a_saved_config_without_the_new_keys_reads_back_to_the_same_identity():
    cfg = TrainConfig(**tiny(algo="fedloru"))
    saved = json.loads(json.dumps(cfg.to_dict()))
    for key in ("max_grad_norm", "lowrank_dropout", "lora_init", "merge_mode", "factorize_rule",
                "divergence_factor", "weight_bound"):
        saved.pop(key)
    assert TrainConfig.from_saved(saved).fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize("factor", [0.5, 1.0, -1.0])
def test_bad_divergence_factor_is_one_line(tmp_path, capsys, factor):
    code = main(["train", "--out", str(tmp_path / "r"), "--divergence-factor", str(factor)])
    err = capsys.readouterr().err
    assert code != 0 and "divergence_factor" in err and "\n" not in err.strip()


def test_guard_without_a_usable_initial_loss_checks_weights_only():
    guard = DivergenceGuard(0.0, 1e3, 2.0)
    guard.check_loss(1e30, "x")  # no loss limit: L0 = 0
    with pytest.raises(DivergedError, match=r"\|w\| = 3 > weight_bound 2"):
        guard.check_weights({"w": torch.tensor([1.0, -3.0])}, "x")
    DivergenceGuard(1.0, 0.0, 0.0).check_weights({"w": torch.tensor([1e30])}, "x")  # both off
