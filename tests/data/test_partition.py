"""Tests of hessrank.data.partition: cover, determinism, skew, errors, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hessrank.data.partition import SCHEMES, Partition, make_partition

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 balanced classes
DRAWN = tuple(s for s in SCHEMES if s != "natural")  # the schemes that draw with the seed


def _assert_disjoint_cover(part: Partition, n: int) -> None:
    allidx = np.concatenate(part.indices)
    assert allidx.dtype == np.int64
    assert np.array_equal(np.sort(allidx), np.arange(n))  # each index exactly once
    assert all(np.array_equal(idx, np.sort(idx)) for idx in part.indices)
    assert len(part.indices) == part.num_clients and min(part.sizes()) >= 1


def _label_skew(part: Partition, labels: np.ndarray) -> float:
    """Size-weighted mean total-variation distance of client label mixes from the global mix."""
    counts = part.label_counts(labels).astype(float)
    local = counts / counts.sum(1, keepdims=True)
    glob = counts.sum(0) / counts.sum()
    return float((part.weights() * 0.5 * np.abs(local - glob).sum(1)).sum())


@pytest.mark.parametrize("scheme", DRAWN)
def test_disjoint_cover_and_determinism(scheme):
    a = make_partition(LABELS, 7, scheme, seed=3)
    b = make_partition(torch.as_tensor(LABELS), 7, scheme, seed=3)
    c = make_partition(LABELS, 7, scheme, seed=4)
    _assert_disjoint_cover(a, len(LABELS))
    assert a.scheme == scheme and a.num_clients == 7 and a.seed == 3
    assert a.to_json() == b.to_json()
    assert a.to_json()["indices"] != c.to_json()["indices"]
    assert sum(a.sizes()) == len(LABELS) and a.params["num_samples"] == len(LABELS)
    np.testing.assert_allclose(a.weights().sum(), 1.0, rtol=1e-12)


def test_iid_sizes_near_equal():
    part = make_partition(LABELS, 7, "iid")
    assert max(part.sizes()) - min(part.sizes()) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    # averaged over seeds so the ordering does not hang on one draw
    skews = {
        alpha: np.mean(
            [_label_skew(make_partition(LABELS, 10, "dirichlet", alpha=alpha, seed=s), LABELS)
             for s in range(5)]
        )
        for alpha in (100.0, 1.0, 0.1)
    }
    assert skews[100.0] < 0.1 < skews[1.0] < skews[0.1]
    assert skews[0.1] > 0.5


def test_dirichlet_redraws_until_min_size_and_records_attempts():
    part = make_partition(LABELS, 10, "dirichlet", alpha=1.0, min_size=40, seed=0)
    _assert_disjoint_cover(part, len(LABELS))
    assert min(part.sizes()) >= 40
    assert part.params["attempts"] > 1 and part.params["alpha"] == 1.0
    again = make_partition(LABELS, 10, "dirichlet", alpha=1.0, min_size=40, seed=0)
    assert again.to_json() == part.to_json()


def test_dirichlet_failure_names_smallest_client():
    with pytest.raises(ValueError, match=r"client \d+ got only \d+ samples.*larger alpha"):
        make_partition(LABELS, 20, "dirichlet", alpha=0.01, min_size=25)


def test_shards_give_few_labels_per_client():
    part = make_partition(LABELS, 10, "shards", shards_per_client=2, seed=1)
    _assert_disjoint_cover(part, len(LABELS))
    assert part.sizes() == [60] * 10
    assert np.all((part.label_counts(LABELS) > 0).sum(1) <= 2)
    assert part.params["num_shards"] == 20


def test_too_many_clients_is_an_error():
    labels = np.arange(10) % 3
    for scheme in DRAWN:
        with pytest.raises(ValueError, match="at most 10 clients"):
            make_partition(labels, 11, scheme)
    with pytest.raises(ValueError, match="shards"):
        make_partition(labels, 6, "shards", shards_per_client=2)


def test_regression_targets_allow_only_iid():
    targets = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    _assert_disjoint_cover(make_partition(targets, 5, "iid"), 50)
    for scheme in ("dirichlet", "shards", "natural"):
        with pytest.raises(ValueError, match="use scheme='iid'"):
            make_partition(targets, 5, scheme)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid schemes: iid, dirichlet, shards"):
        make_partition(LABELS, 3, "pathological")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        make_partition(LABELS, 3, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="num_clients"):
        make_partition(LABELS, 0)


def test_json_roundtrip():
    part = make_partition(LABELS, 6, "dirichlet", alpha=0.5, seed=2)
    back = Partition.from_json(json.loads(json.dumps(part.to_json())))
    assert back.to_json() == part.to_json()
    assert all(b.dtype == np.int64 for b in back.indices)
    with pytest.raises(ValueError, match="lacks key"):
        Partition.from_json({"scheme": "iid"})


# ---- natural: one client per group ----------------------------------------------------------
def test_natural_gives_one_client_per_group_in_group_order():
    groups = np.array([4, 0, 4, 9, 0, 0, 9, 4, 4])  # unequal groups, ids not contiguous
    part = make_partition(groups, 3, "natural", seed=5)
    _assert_disjoint_cover(part, len(groups))
    assert [idx.tolist() for idx in part.indices] == [[1, 4, 5], [0, 2, 7, 8], [3, 6]]
    assert part.params["groups"] == [0, 4, 9] and part.sizes() == [3, 4, 2]
    # nothing is drawn: another seed gives the same clients; JSON round trip keeps them
    assert make_partition(groups, 3, "natural", seed=6).to_json()["indices"] == \
        part.to_json()["indices"]
    back = Partition.from_json(json.loads(json.dumps(part.to_json())))
    assert back.to_json() == part.to_json() and back.scheme == "natural"


def test_natural_needs_one_client_per_group_and_min_size():
    with pytest.raises(ValueError, match=r"hold 10 groups, not num_clients=7; pass num_clients=10"):
        make_partition(LABELS, 7, "natural")
    with pytest.raises(ValueError, match=r"client 1 got only 1 samples \(min_size=2\)"):
        make_partition(np.array([0, 0, 1, 2, 2, 2]), 3, "natural", min_size=2)
