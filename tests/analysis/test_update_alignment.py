"""Update-alignment metrics on synthetic client updates with known shared structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hessrank.analysis import update_alignment as ua


def _updates(shared_rank: int, noise: float, K: int = 6, m: int = 12, n: int = 10, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(m, shared_rank, generator=g) @ torch.randn(shared_rank, n, generator=g)
    ups = {}
    for c in range(K):
        signal = S if shared_rank else torch.zeros(m, n)
        ups[c] = {"w": signal + noise * torch.randn(m, n, generator=g),
                  "b": torch.randn(m, generator=g)}
    return ups


def test_principal_cosines_of_known_subspaces():
    e = torch.eye(4, dtype=torch.float64)
    A = e[:, :2]
    B = torch.stack([e[:, 0], (e[:, 1] + e[:, 2]) / math.sqrt(2)], dim=1)
    np.testing.assert_allclose(ua.principal_cosines(A, B).numpy(), [1.0, 1 / math.sqrt(2)],
                               atol=1e-12)
    Q = ua.random_orthogonal(5, torch.Generator().manual_seed(0))
    np.testing.assert_allclose((Q @ Q.T).numpy(), np.eye(5), atol=1e-12)


def test_shared_low_rank_updates_align_above_the_null():
    t = ua.update_alignment(_updates(1, 0.3), ranks=(1, 2), null_draws=10)
    assert set(t["layer"]) == {"w"}  # vectors are skipped
    ra = t[(t["metric"] == "rank-alignment") & (t["rank"] == 1)].iloc[0]
    assert ra["value"] > 0.05 and ra["z"] > 3
    left = t[(t["metric"] == "subspace-overlap-left") & (t["rank"] == 1)].iloc[0]
    assert left["value"] > 0.9 and left["z"] > 3
    # random r-dim subspaces of R^m: mean squared principal cosine is exactly r/m
    assert left["null_mean"] == pytest.approx(1 / 12, abs=0.03)


def test_independent_updates_match_the_null():
    t = ua.update_alignment(_updates(0, 1.0, K=8, seed=3), ranks=(2,), null_draws=20)
    for row in t.itertuples():
        assert abs(row.z) < 3.5, row
    right = t[t["metric"] == "subspace-overlap-right"].iloc[0]
    assert right["value"] == pytest.approx(2 / 10, abs=0.08)


def test_hessian_overlap_in_and_out_of_the_span():
    g = torch.Generator().manual_seed(1)
    p, k = 40, 3
    E, _ = torch.linalg.qr(torch.randn(p, k, generator=g, dtype=torch.float64))
    inside = {c: {"w": (E @ torch.randn(k, generator=g, dtype=torch.float64)).reshape(8, 5)}
              for c in range(4)}
    t = ua.hessian_overlap(inside, E, ["w"])
    assert t["value"].iloc[0] == pytest.approx(1.0)
    assert t["null_mean"].iloc[0] == pytest.approx(k / p, abs=0.02)
    rand = {c: {"w": torch.randn(8, 5, generator=g)} for c in range(30)}
    t = ua.hessian_overlap(rand, E, ["w"])
    assert abs(t["z"].iloc[0]) < 3.5
    with pytest.raises(ValueError, match="entries"):
        ua.hessian_overlap(rand, E[:10], ["w"])


def test_load_client_updates_format(tmp_path):
    ups = _updates(1, 0.1, K=3)
    (tmp_path / "updates").mkdir()
    save_file({f"{c}/{n}": t.contiguous() for c, d in ups.items() for n, t in d.items()},
              str(tmp_path / "updates" / "round_0007.safetensors"))
    got = ua.load_client_updates(tmp_path, 7)
    assert sorted(got) == [0, 1, 2] and torch.equal(got[1]["w"], ups[1]["w"])
    with pytest.raises(FileNotFoundError, match="round_0008"):
        ua.load_client_updates(tmp_path, 8)
    with pytest.raises(ValueError, match=">= 2 clients"):
        ua.rank_alignment({0: ups[0]})
