"""FedLoRA / FedLoRU / pFedLoRU / mFedLoRU: aggregation, merging, communication counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessrank.data.task import ClassificationTask
from hessrank.fl.config import TrainConfig
from hessrank.fl.fedlora import FedLoRA
from hessrank.fl.layers import factorized_layers
from hessrank.fl.loop import Federation
from hessrank.fl.mfedloru import HierarchicalMFedLoRU, NestedClient, client_ranks
from hessrank.fl.protocol import ClientData

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


def _fed(algo: str, **kw) -> Federation:
    base = {"clients": 2, "rank": R, "lora_alpha": 6.0, "batch_size": 5, "lr": 0.2}
    return Federation.build(_mlp(), TrainConfig(algo=algo, **{**base, **kw}),
                            ClassificationTask())  # fmt: skip


def _spy_averages(fed: Federation) -> list:
    """Record the (full, rank-r) replies the server averages."""
    seen: list = []
    original = fed.strategy.average

    def spy(replies, sizes):
        seen.append([{k: v.clone() for k, v in r.items()} for r in replies])
        return original(replies, sizes)

    fed.strategy.average = spy
    return seen


def _low_rank_floats(r: int) -> int:
    """Closed form for _mlp(): layer '2' (9×10) factorized, the rest dense."""
    factors = r * (10 + 9)
    dense = (6 * 10 + 10) + 9 + (9 * 3 + 3)  # first layer, bias of layer 2, last layer
    return factors + dense


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_and_b_are_averaged_separately():
    fed = _fed("fedlora")
    seen = _spy_averages(fed)
    fed.round(1, _clients(), lr=0.2, rng=_gen())
    (r0, r1), w = seen[0], (15 / 40, 25 / 40)
    layer = factorized_layers(fed.strategy.model)["2"]
    avg_a = w[0] * r0["2.A"] + w[1] * r1["2.A"]
    avg_b = w[0] * r0["2.B"] + w[1] * r1["2.B"]
    torch.testing.assert_close(layer.A, avg_a, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.B, avg_b, rtol=0, atol=1e-14)
    # the product of the averages is not the average of the products
    avg_prod = w[0] * r0["2.B"] @ r0["2.A"] + w[1] * r1["2.B"] @ r1["2.A"]
    assert (layer.B @ layer.A - avg_prod).abs().max() > 1e-6


@pytest.mark.parametrize("algo", ["fedlora", "fedloru", "pfedloru"])
def test_communication_is_factors_plus_dense_layers(algo):
    stats = _fed(algo, merge_every=0).round(1, _clients(), lr=0.2, rng=_gen())
    expected = _low_rank_floats(R)
    assert stats.floats_up == {0: expected, 1: expected} == stats.floats_down
    assert stats.ranks == {"2": R}


def test_fedloru_merge_keeps_function_and_charges_missed_merges():
    fed = _fed("fedloru", merge_every=1)
    strategy, gen, clients = fed.strategy, _gen(), _clients()
    x = clients[0].inputs
    seen_before: list = []
    original = strategy.server_step

    def around_merge(round_idx, rng):
        seen_before.append(strategy.effective_model()(x))
        return original(round_idx, rng)

    strategy.server_step = around_merge
    s1 = fed.round(1, clients, lr=0.2, rng=gen)
    torch.testing.assert_close(strategy.effective_model()(x), seen_before[0], rtol=0, atol=1e-12)
    layer = factorized_layers(strategy.model)["2"]
    assert torch.count_nonzero(layer.B) == 0 and strategy.num_merges == 1
    assert s1.extra["merged"] == 1.0
    # round 2: client 0 missed one merge (one pair of 19·r floats), client 1 is not sampled
    s2 = fed.round(2, clients[:1], lr=0.2, rng=gen)
    assert s2.floats_down == {0: _low_rank_floats(R) + R * (10 + 9)}
    # round 3: client 1 missed two merges; 2 pairs (2·3·19 = 114) > W0 (90): W0 is cheaper
    s3 = fed.round(3, clients[1:], lr=0.2, rng=gen)
    assert s3.floats_down == {1: _low_rank_floats(R) + 90}


def test_fedloru_from_scratch_starts_at_zero_base():
    fed = _fed("fedloru")  # the paper's default
    layer = factorized_layers(fed.strategy.model)["2"]
    assert torch.count_nonzero(layer.weight0) == 0
    assert torch.count_nonzero(layer.B) > 0
    assert "lora_init" in fed.notes()


def test_pfedloru_personal_pair_stays_on_the_client():
    fed = _fed("pfedloru", personal_rank=2, personal_alpha=2.0, merge_every=0)
    seen = _spy_averages(fed)
    clients = _clients()
    for t in (1, 2):
        fed.round(t, clients, lr=0.2, rng=_gen(t))
    assert not any("PA" in k or "PB" in k for reply in seen[0] for k in reply)
    assert not any("PA" in k or "PB" in k for k in fed.strategy.state_tensors())
    assert sorted(fed.states.get(0)) == ["2.PA", "2.PB"]  # kept by the runtime
    x = clients[0].inputs
    strategy = fed.strategy
    out0 = strategy.client_model(0, fed.states.get(0))(x)
    out1 = strategy.client_model(1, fed.states.get(1))(x)
    glob = strategy.effective_model()(x)
    assert (out0 - out1).abs().max() > 1e-6 and (out0 - glob).abs().max() > 1e-6
    assert list(strategy.client_model(0, fed.states.get(0)).state_dict()) == list(
        strategy.template.state_dict()
    )
    fresh = _fed("pfedloru", personal_rank=2, personal_alpha=2.0, merge_every=0)
    fresh.strategy.load_state_tensors(strategy.state_tensors())
    torch.testing.assert_close(fresh.strategy.client_model(1, fed.states.get(1))(x), out1,
                               rtol=0, atol=0)  # fmt: skip


def test_mfedloru_width_maps_ranks_back():
    fed = _fed("mfedloru", rank=4, client_ranks=[4, 2], merge_every=0, mfedloru_scheme="width")
    seen = _spy_averages(fed)
    layer = factorized_layers(fed.strategy.model)["2"]
    a_start = layer.A.detach().clone()
    stats = fed.round(1, _clients(), lr=0.2, rng=_gen())
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


def test_mfedloru_width_keeps_components_nobody_held():
    fed = _fed("mfedloru", rank=4, client_ranks=[2, 1], merge_every=0, mfedloru_scheme="width")
    layer = factorized_layers(fed.strategy.model)["2"]
    a_start = layer.A.detach().clone()
    fed.round(1, _clients(), lr=0.2, rng=_gen())
    torch.testing.assert_close(layer.A[2:], a_start[2:], rtol=0, atol=0)


def test_mfedloru_tiers_are_client_state():
    fed = _fed("mfedloru", rank=4, client_ranks=[4, 2])
    assert [int(fed.states.get(c)["rank"]) for c in (0, 1)] == [4, 2]
    assert client_ranks(fed.client.config) == [4, 2]
    with pytest.raises(ValueError, match="client_ranks needs 2 entries"):
        _fed("mfedloru", rank=4, client_ranks=[8, 2])


def test_no_factorizable_layer_is_a_clear_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no layer is factorized"):
        FedLoRA(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), TrainConfig(algo="fedlora"))


def test_lora_family_defaults_to_pure_rank_r_and_can_start_from_dense():
    dense = _mlp()
    for algo in ("fedlora", "fedloru"):
        layer = factorized_layers(_fed(algo).strategy.model)["2"]
        assert torch.count_nonzero(layer.weight0) == 0 and torch.count_nonzero(layer.B) > 0
        kept = factorized_layers(_fed(algo, from_scratch=False).strategy.model)["2"]
        assert torch.equal(kept.weight0, dense[2].weight) and torch.count_nonzero(kept.B) == 0
    for algo in ("fedavg", "fedlrt"):  # an option that would be ignored is an error
        with pytest.raises(ValueError, match="'from_scratch' applies to fedlora"):
            TrainConfig(algo=algo, from_scratch=True)


def _phases(fed: Federation) -> list[tuple[str, int]]:
    """Record (which pair, steps) of each local phase of pFedLoRU's client."""
    seen: list = []
    original = fed.client.local

    def spy(model, params, data, lr, rng, steps=None):
        names = {id(p): n for n, p in model.named_parameters()}
        kind = "personal" if all(names[id(p)].endswith((".PA", ".PB")) for p in params) else (
            "global")
        result = original(model, params, data, lr, rng, steps=steps)
        seen.append((kind, result.num_steps))
        return result

    fed.client.local = spy
    return seen


def test_pfedloru_trains_global_pair_first_with_more_steps():
    fed = _fed("pfedloru", merge_every=0, local_epochs=2)  # 15 samples: 3 + 3 steps
    seen = _phases(fed)
    fed.round(1, _clients()[:1], lr=0.2, rng=_gen())
    assert seen == [("global", 6), ("personal", 3)]
    rev = _fed("pfedloru", merge_every=0, personal_order="AB-first", personal_steps=2)
    seen = _phases(rev)
    rev.round(1, _clients()[:1], lr=0.2, rng=_gen())
    assert seen == [("personal", 2), ("global", 3)]
    assert "LU-first" in fed.notes()["personal"]


def test_mfedloru_hierarchical_nested_updates():
    """Each client's change to A and B is a rank <= r_c matrix, it sends only the nested
    factors, and the server averages the reconstructed rank-r factors like FedLoRA."""
    fed = _fed("mfedloru", rank=4, client_ranks=[4, 2], merge_every=0)
    assert isinstance(fed.strategy, HierarchicalMFedLoRU) and isinstance(fed.client, NestedClient)
    seen = _spy_averages(fed)
    sent: list = []
    client = fed.client

    def execute(task, data, state, rng):
        reply, state = client(task, data, state, rng)
        sent.append(sorted(k for k in reply.tensors if k.startswith("2.")))
        return reply, state

    layer = factorized_layers(fed.strategy.model)["2"]
    a0, b0 = layer.A.detach().clone(), layer.B.detach().clone()
    stats = fed.round(1, _clients(), lr=0.2, rng=_gen(), execute=execute)
    assert sent[0] == ["2.PA", "2.PB", "2.QA", "2.QB", "2.bias"]  # no rank-r factor travels
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


# ---- pFedLoRU's names (issue 23: the rebuttal calls the shared pair L, U) ----------------
# fingerprint of TrainConfig(algo="pfedloru", personal_order="personal-first") before the rename
PERSONAL_FIRST_BEFORE = "a999b5174faf208305427b84d6bb402bf7d144f040f0774e22925346d7a0f902"


@pytest.mark.parametrize("old,new", [("global-first", "LU-first"), ("personal-first", "AB-first")])
def test_old_order_names_are_accepted_with_one_deprecation_line(old, new):
    with pytest.warns(FutureWarning, match=f"'{old}' is deprecated, use '{new}'") as seen:
        cfg = TrainConfig(algo="pfedloru", personal_order=old)
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert cfg.personal_order == new
    assert cfg.fingerprint() == TrainConfig(algo="pfedloru", personal_order=new).fingerprint()


def test_renamed_orders_keep_the_fingerprints_of_saved_runs(recwarn):
    cfg = TrainConfig(algo="pfedloru", personal_order="AB-first")
    assert cfg.fingerprint() == PERSONAL_FIRST_BEFORE
    saved = {**cfg.to_dict(), "personal_order": "personal-first"}  # a run saved before
    assert TrainConfig.from_saved(saved).personal_order == "AB-first"
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]  # reading is silent
