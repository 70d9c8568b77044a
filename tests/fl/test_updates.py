"""Recorded client updates (``record_updates``): format, reader, and their meaning."""

from __future__ import annotations

import pytest
import torch

from hessrank.fl import RunDir, train
from hessrank.fl.rundir import read_client_updates

from .test_runner import tiny


def test_fedavg_one_client_one_step_update_is_minus_lr_grad(tmp_path):
    cfg = tiny(algo="fedavg", clients=1, partition="iid", rounds=2, local_steps=1,
               batch_size=10**6, dtype="float64", record_updates=True, save_every=1)  # fmt: skip
    run = train(cfg, tmp_path / "r", progress=False)
    assert run.update_rounds() == [1, 2]
    updates = read_client_updates(run.path, 1)
    assert list(updates) == [0]
    model = run.load_model(0)
    (x, y), loss_fn = run.client_data()[0], run.task()
    model.train()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    assert set(updates[0]) == set(model.state_dict())
    for (name, _), g in zip(params.items(), grads):
        # full-batch mean over a permutation of the same samples: equal up to rounding
        torch.testing.assert_close(updates[0][name], -0.1 * g, rtol=0, atol=1e-13)
    # and the update is what the round did: round 1 weights = round 0 + update (one client)
    after = run.load_model(1).state_dict()
    for name, delta in updates[0].items():
        torch.testing.assert_close(model.state_dict()[name] + delta, after[name], rtol=0,
                                   atol=1e-15)  # fmt: skip


@pytest.mark.parametrize("algo", ["fedloru", "mfedloru", "fedlrt"])
def test_low_rank_updates_have_the_dense_keys_and_bounded_rank(tmp_path, algo):
    cfg = tiny(algo=algo, clients=3, rounds=1, record_updates=True, dtype="float64")
    run = train(cfg, tmp_path / "r", progress=False)
    updates = run.client_updates(1)
    assert sorted(updates) == [0, 1, 2]
    keys = set(run.load_model(0).state_dict())
    rank = 4  # tiny(): rank 4, fc2 (16 x 16) factorized
    for per_client in updates.values():
        assert set(per_client) == keys
        assert per_client["fc2.weight"].abs().max() > 0
        # LoRA: (a/r)(B'A' - BA) has rank <= 2r; FeDLRT: U~ S~_c V~^T - U S V^T <= 2r
        assert torch.linalg.matrix_rank(per_client["fc2.weight"], atol=1e-10) <= 2 * rank
    # on a dense (non-factorized) layer the size-weighted mean update is the server's step
    # (not on fc2: A and B are averaged separately, and FeDLRT truncates)
    sizes = {c: len(idx) for c, idx in enumerate(run.partition().indices)}
    total = sum(sizes.values())
    mean = sum(sizes[c] / total * u["fc1.weight"] for c, u in updates.items())
    step = run.load_model(1).fc1.weight - run.load_model(0).fc1.weight
    torch.testing.assert_close(mean, step, rtol=0, atol=1e-12)


def test_missing_update_round_is_a_clear_error(tmp_path):
    run = train(tiny(rounds=1), tmp_path / "r", progress=False)
    assert RunDir(run.path).update_rounds() == []
    with pytest.raises(ValueError, match="--record-updates"):
        read_client_updates(run.path, 1)
