"""FedLoRA / FedLoRU / pFedLoRU / mFedLoRU: aggregation, merging, communication counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessrank.fl.base import ClientData
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedlora import FedLoRA
from hessrank.fl.fedloru import FedLoRU, MFedLoRU, PFedLoRU
from hessrank.fl.layers import factorized_layers

DT = torch.float64
R = 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 3)
    ).to(DT)


def _clients(sizes=(15, 25)) -> list[ClientData]:
    out = []
    for cid, n in enumerate(sizes):
        g = torch.Generator().manual_seed(cid + 1)
        out.append(ClientData(cid, torch.randn(n, 6, generator=g, dtype=DT),
                              torch.randint(0, 3, (n,), generator=g)))  # fmt: skip
    return out


def _config(**kw) -> TrainConfig:
    base = {"clients": 2, "rank": R, "lora_alpha": 6.0, "batch_size": 5, "lr": 0.2}
    return TrainConfig(**{**base, **kw})


def _spy_replies(algo) -> list:
    """Record the client replies the server aggregates."""
    seen: list = []
    original = algo._aggregate

    def spy(replies, clients):
        seen.append([{k: v.clone() for k, v in r.items()} for r in replies])
        return original(replies, clients)

    algo._aggregate = spy
    return seen


def _low_rank_floats(r: int) -> int:
    """Closed form for _mlp(): layer '2' (9×10) factorized, the rest dense."""
    factors = r * (10 + 9)
    dense = (6 * 10 + 10) + 9 + (9 * 3 + 3)  # first layer, bias of layer 2, last layer
    return factors + dense


def test_a_and_b_are_averaged_separately():
    algo = FedLoRA(_mlp(), _config())
    seen = _spy_replies(algo)
    clients = _clients()
    algo.run_round(1, clients, lr=0.2, generator=torch.Generator().manual_seed(0))
    (r0, r1), w = seen[0], (15 / 40, 25 / 40)
    layer = factorized_layers(algo.model)["2"]
    avg_a = w[0] * r0["2.A"] + w[1] * r1["2.A"]
    avg_b = w[0] * r0["2.B"] + w[1] * r1["2.B"]
    torch.testing.assert_close(layer.A, avg_a, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.B, avg_b, rtol=0, atol=1e-14)
    # the product of the averages is not the average of the products
    avg_prod = w[0] * r0["2.B"] @ r0["2.A"] + w[1] * r1["2.B"] @ r1["2.A"]
    assert (layer.B @ layer.A - avg_prod).abs().max() > 1e-6


@pytest.mark.parametrize("cls", [FedLoRA, FedLoRU, PFedLoRU])
def test_communication_is_factors_plus_dense_layers(cls):
    algo = cls(_mlp(), _config(merge_every=0))
    stats = algo.run_round(1, _clients(), lr=0.2, generator=torch.Generator().manual_seed(0))
    expected = _low_rank_floats(R)
    assert stats.floats_up == {0: expected, 1: expected} == stats.floats_down
    assert stats.ranks == {"2": R}


def test_fedloru_merge_keeps_function_and_charges_missed_merges():
    algo = FedLoRU(_mlp(), _config(merge_every=1))
    gen = torch.Generator().manual_seed(0)
    clients = _clients()
    x = clients[0].inputs
    seen_before: list = []
    original = algo._after_round

    def around_merge(round_idx, generator):
        seen_before.append(algo.effective_model()(x))
        return original(round_idx, generator)

    algo._after_round = around_merge
    s1 = algo.run_round(1, clients, lr=0.2, generator=gen)
    torch.testing.assert_close(algo.effective_model()(x), seen_before[0], rtol=0, atol=1e-12)
    layer = factorized_layers(algo.model)["2"]
    assert torch.count_nonzero(layer.B) == 0 and algo.num_merges == 1
    assert s1.extra["merged"] == 1.0
    # round 2: client 0 missed one merge (one pair of 19·r floats), client 1 is not sampled
    s2 = algo.run_round(2, clients[:1], lr=0.2, generator=gen)
    assert s2.floats_down == {0: _low_rank_floats(R) + R * (10 + 9)}
    # round 3: client 1 missed two merges; 2 pairs (2·3·19 = 114) > W0 (90): W0 is cheaper
    s3 = algo.run_round(3, clients[1:], lr=0.2, generator=gen)
    assert s3.floats_down == {1: _low_rank_floats(R) + 90}


def test_fedloru_from_scratch_starts_at_zero_base():
    algo = FedLoRU(_mlp(), _config(algo="fedloru"))  # the paper's default
    layer = factorized_layers(algo.model)["2"]
    assert torch.count_nonzero(layer.weight0) == 0
    assert torch.count_nonzero(layer.B) > 0
    assert "lora_init" in algo.config.notes


def test_pfedloru_personal_pair_stays_on_the_client():
    algo = PFedLoRU(_mlp(), _config(personal_rank=2, personal_alpha=2.0, merge_every=0))
    seen = _spy_replies(algo)
    clients = _clients()
    for t in (1, 2):
        algo.run_round(t, clients, lr=0.2, generator=torch.Generator().manual_seed(t))
    assert not any("PA" in k or "PB" in k for reply in seen[0] for k in reply)
    x = clients[0].inputs
    out0, out1 = algo.client_model(0)(x), algo.client_model(1)(x)
    glob = algo.effective_model()(x)
    assert (out0 - out1).abs().max() > 1e-6 and (out0 - glob).abs().max() > 1e-6
    assert list(algo.client_model(0).state_dict()) == list(algo.template.state_dict())
    state = algo.state_tensors()
    fresh = PFedLoRU(_mlp(), _config(personal_rank=2, personal_alpha=2.0, merge_every=0))
    fresh.load_state_tensors(state)
    torch.testing.assert_close(fresh.client_model(1)(x), out1, rtol=0, atol=0)


def test_mfedloru_maps_nested_ranks_back():
    algo = MFedLoRU(_mlp(), _config(rank=4, client_ranks=[4, 2], merge_every=0,
                                    mfedloru_scheme="width"))  # fmt: skip
    seen = _spy_replies(algo)
    layer = factorized_layers(algo.model)["2"]
    a_start = layer.A.detach().clone()
    stats = algo.run_round(1, _clients(), lr=0.2, generator=torch.Generator().manual_seed(0))
    r_full, r_half = seen[0]
    assert r_full["2.A"].shape == (4, 10) and r_half["2.A"].shape == (2, 10)
    assert r_half["2.B"].shape == (9, 2)
    w = (15 / 40, 25 / 40)
    # components 0, 1: both clients hold them; components 2, 3: only client 0 (weight 1)
    torch.testing.assert_close(
        layer.A[:2], w[0] * r_full["2.A"][:2] + w[1] * r_half["2.A"], rtol=0, atol=1e-14
    )
    torch.testing.assert_close(layer.A[2:], r_full["2.A"][2:], rtol=0, atol=1e-15)
    torch.testing.assert_close(
        layer.B[:, :2], w[0] * r_full["2.B"][:, :2] + w[1] * r_half["2.B"], rtol=0, atol=1e-14
    )
    assert not torch.equal(layer.A, a_start)
    dense = _low_rank_floats(0)
    assert stats.floats_up == {0: dense + 4 * 19, 1: dense + 2 * 19}
    assert stats.floats_down == stats.floats_up


def test_mfedloru_keeps_components_nobody_held():
    algo = MFedLoRU(_mlp(), _config(rank=4, client_ranks=[2, 1], merge_every=0,
                                    mfedloru_scheme="width"))  # fmt: skip
    layer = factorized_layers(algo.model)["2"]
    a_start = layer.A.detach().clone()
    algo.run_round(1, _clients(), lr=0.2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.A[2:], a_start[2:], rtol=0, atol=0)


def test_mfedloru_rejects_bad_ranks():
    with pytest.raises(ValueError, match="client_ranks needs 2 entries"):
        MFedLoRU(_mlp(), _config(rank=4, client_ranks=[8, 2]))


def test_no_factorizable_layer_is_a_clear_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no layer is factorized"):
        FedLoRA(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), _config())


def test_lora_family_defaults_to_pure_rank_r_and_can_start_from_dense():
    dense = _mlp()
    for cls in (FedLoRA, FedLoRU):
        layer = factorized_layers(cls(_mlp(), _config()).model)["2"]
        assert torch.count_nonzero(layer.weight0) == 0 and torch.count_nonzero(layer.B) > 0
        cfg = _config(algo="fedlora", from_scratch=False)
        kept = factorized_layers(cls(_mlp(), cfg).model)["2"]
        assert torch.equal(kept.weight0, dense[2].weight) and torch.count_nonzero(kept.B) == 0
    for algo in ("fedavg", "fedlrt"):  # an option that would be ignored is an error
        with pytest.raises(ValueError, match="from_scratch applies to fedlora"):
            TrainConfig(algo=algo, from_scratch=True)


def _phases(algo) -> list[tuple[str, int]]:
    """Record (which pair, steps) of each local phase of pFedLoRU."""
    seen: list = []
    original = algo._local

    def spy(model, params, client, lr, gen, steps=None):
        names = {id(p): n for n, p in model.named_parameters()}
        kind = "personal" if all(names[id(p)].endswith((".PA", ".PB")) for p in params) else (
            "global")
        result = original(model, params, client, lr, gen, steps=steps)
        seen.append((kind, result.num_steps))
        return result

    algo._local = spy
    return seen


def test_pfedloru_trains_global_pair_first_with_more_steps():
    algo = PFedLoRU(_mlp(), _config(merge_every=0, local_epochs=2))  # 15 samples: 3 + 3 steps
    seen = _phases(algo)
    algo.run_round(1, _clients()[:1], lr=0.2, generator=torch.Generator().manual_seed(0))
    assert seen == [("global", 6), ("personal", 3)]
    rev = PFedLoRU(_mlp(), _config(merge_every=0, personal_order="personal-first",
                                   personal_steps=2))  # fmt: skip
    seen = _phases(rev)
    rev.run_round(1, _clients()[:1], lr=0.2, generator=torch.Generator().manual_seed(0))
    assert seen == [("personal", 2), ("global", 3)]
    assert "global-first" in algo.config.notes["personal"]


def test_mfedloru_hierarchical_nested_updates():
    """Each client's change to A and B is a rank <= r_c matrix, it sends only the nested
    factors, and the server averages the reconstructed rank-r factors like FedLoRA."""
    algo = MFedLoRU(_mlp(), _config(rank=4, client_ranks=[4, 2], merge_every=0))
    assert algo.scheme == "hierarchical"
    seen = _spy_replies(algo)
    layer = factorized_layers(algo.model)["2"]
    a0, b0 = layer.A.detach().clone(), layer.B.detach().clone()
    stats = algo.run_round(1, _clients(), lr=0.2, generator=torch.Generator().manual_seed(0))
    r_full, r_half = seen[0]
    assert r_half["2.A"].shape == (4, 10) and r_half["2.B"].shape == (9, 4)
    for reply, rc in ((r_full, 4), (r_half, 2)):
        for key, start in (("2.A", a0), ("2.B", b0)):
            change = reply[key] - start
            assert torch.linalg.matrix_rank(change, atol=1e-10) <= rc
        assert (reply["2.A"] - a0).abs().max() > 1e-6  # the nested update trained
    w = (15 / 40, 25 / 40)
    torch.testing.assert_close(layer.A, w[0] * r_full["2.A"] + w[1] * r_half["2.A"],
                               rtol=0, atol=1e-14)  # fmt: skip
    dense = _low_rank_floats(0)
    nested = {rc: rc * (4 + 10) + rc * (9 + 4) for rc in (4, 2)}
    assert stats.floats_up == {0: dense + nested[4], 1: dense + nested[2]}
    assert stats.floats_down == {0: _low_rank_floats(4), 1: _low_rank_floats(4)}
