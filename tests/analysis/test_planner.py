"""The planner is pure: settings and the source's identities in, keyed units out — built here
without a model, data or files."""

from __future__ import annotations

from dataclasses import dataclass

from hessrank.analysis.planner import plan
from hessrank.analysis.settings import AnalysisSettings


@dataclass(frozen=True)
class _Subj:
    name: str


@dataclass(frozen=True)
class _Group:
    label: str
    subjects: tuple
    index: tuple


GROUPS = [_Group("server+clients", (_Subj("client0"), _Subj("client1"), _Subj("server")),
                 (0, 1, 2)),
          _Group("subset5x2", (_Subj("subset5_0"), _Subj("subset5_1")), (0, 1))]
HASHES = {"client0": "a", "client1": "b", "server": "s", "clients": "s", "subset5_0": "c",
          "subset5_1": "d"}


def _plan(s=None, **kw):
    s = s or AnalysisSettings(quantities=("stable-rank", "density", "alignment"))
    args = dict(rounds=[0, 5], groups=GROUPS, fingerprint="run", data_hashes=HASHES,
                checkpoints={0: "c0", 5: "c5"}, threads=1)
    args.update(kw)
    return plan(s, **args)


def test_units_in_order_with_one_key_each():
    p = _plan()
    got = [(u.round, u.label, u.family) for u in p.units]
    assert got == [(r, g, f) for r in (0, 5) for g, f in (
        ("server+clients", "lanczos"), ("server+clients", "density"), ("subset5x2", "lanczos"),
        ("subset5x2", "density"), ("alignment", "alignment"))]
    assert len({u.key for u in p.units}) == len(p.units)
    assert p.units[0].stack == 3 and p.units[-1].stack == 1
    assert _plan().units == p.units  # a function of its inputs


def test_every_ingredient_changes_the_keys():
    base = {u.key for u in _plan().units}
    for change in ({"fingerprint": "other"}, {"checkpoints": {0: "x", 5: "y"}},
                   {"data_hashes": {**HASHES, "client0": "z", "subset5_0": "z", "clients": "z"}},
                   {"code": "factory-source"}, {"threads": 2}):
        assert base.isdisjoint(u.key for u in _plan(**change).units), change
    seed = AnalysisSettings(quantities=("stable-rank", "density", "alignment"), seed=1)
    assert base.isdisjoint(u.key for u in _plan(seed).units)


def test_unreadable_checkpoints_are_errors_not_units_and_shards_partition():
    p = _plan(checkpoints={0: ValueError("torn file"), 5: "c5"}, paths={0: "r0.st"})
    assert {u.round for u in p.units} == {5}
    assert p.errors == ({"round": 0, "unit": "*", "path": "r0.st", "error": "torn file"},)
    full = _plan()
    shards = [full.shard(i, 3) for i in (1, 2, 3)]
    keys = [u.key for s in shards for u in s.units]
    assert sorted(keys) == sorted(u.key for u in full.units)
    for s in shards:  # a (round, group) pair is never split over shards
        pairs = {(u.round, u.label) for u in s.units}
        others = {(u.round, u.label) for t in shards if t is not s for u in t.units}
        assert pairs.isdisjoint(others)
