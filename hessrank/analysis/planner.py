"""The analysis plan: settings and a source's identities → units of work with keys (pure).

A *unit* is one (round, subject group, estimator family) — or (round, family) for a family
computed once per round over the clients (:attr:`~hessrank.analysis.quantities.Family.
per_group`). Its key hashes everything that determines its rows (docs/design.md, analysis):

    key = digest({run, checkpoint, round, group, subjects, data, settings[, code, threads]})

- run: the source's fingerprint (:meth:`hessrank.analysis.sources.Source.fingerprint`);
- checkpoint: the content hash of the round's checkpoint;
- group, subjects, data: the group's label, its subjects' names and their data hashes;
- settings: the hash of the family's settings (the ``settings`` column);
- code: the hash of the user code that builds the model (a ``--model-factory`` module), when
  there is one;
- threads: the torch thread count (the numbers depend on it: :func:`thread_key`).

Units are planned round by round in a fixed order: per round, every subject group's
per-group families (registry order), then the per-round families. :func:`plan` reads nothing
and writes nothing: the caller hands it the checkpoints' hashes (or the error that kept one
from being read), the groups and their data hashes, so the plan of a call is a function of
its inputs and tests can build one without a model. :meth:`Plan.shard` slices it for
``--shard I/N`` and ``--workers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hessrank.analysis.quantities import FAMILIES, families_of
from hessrank.analysis.settings import AnalysisSettings, digest

__all__ = ["Plan", "Unit", "plan", "thread_key"]


@dataclass(frozen=True)
class Unit:
    """One unit of work.

    round: the checkpoint's round. label: the subject group's label ("server+clients",
    "subset50x5", ...), or the family's name for a per-round family ("alignment").
    family: the estimator family's name. group: the subject group (None for a per-round
    family). key: the unit key (module docstring). settings: the hash of the family's
    settings. checkpoint: the checkpoint's hash.
    """

    round: int
    label: str
    family: str
    group: Any = field(compare=False)  # hessrank.analysis.subjects.SubjectGroup | None
    key: str
    settings: str
    checkpoint: str

    @property
    def stack(self) -> int:
        """Operators in the unit's stack (1 for a per-round family)."""
        return 1 if self.group is None else max(self.group.index) + 1

    def products(self, settings: AnalysisSettings) -> int:
        """Estimated products (the progress total)."""
        return FAMILIES[self.family].products(settings, self.stack)


@dataclass(frozen=True)
class Plan:
    """The units of one call, in order, and the rounds that could not be planned.

    errors: one ``{"round", "unit", "path", "error"}`` per round whose checkpoint could not be
    read (those rounds have no units; the call reports them).
    """

    units: tuple[Unit, ...]
    errors: tuple[dict[str, Any], ...] = ()

    def shard(self, i: int, n: int) -> Plan:
        """The i-th (1-based) of n slices: (round, group) pairs in plan order, round-robin."""
        pairs = list(dict.fromkeys((u.round, u.label) for u in self.units))
        mine = {pair for k, pair in enumerate(pairs) if k % n == i - 1}
        return Plan(tuple(u for u in self.units if (u.round, u.label) in mine), self.errors)

    def settings_hashes(self) -> dict[str, str]:
        """Family name → settings hash, for the call record."""
        return {u.family: u.settings for u in self.units}


def thread_key(settings: AnalysisSettings, threads: int) -> int:
    """The torch thread count as a unit-key ingredient.

    Measured (``experiments/benchmarks/results/threads.md``, made by ``measure_threads.py``):
    the same analysis at 1 and at 2 torch threads gave different bits, in float32 and in
    float64 (intra-op reductions sum in another order), so a unit computed at one thread
    count is not reused by a call at another. (Making the numbers independent of it would
    mean one thread for every product.)
    """
    return int(threads)


def plan(settings: AnalysisSettings, *, rounds: Sequence[int], groups: Sequence[Any],
         fingerprint: str, checkpoints: Mapping[int, str | BaseException],
         data_hashes: Mapping[str, str], paths: Mapping[int, str] | None = None,
         code: str | None = None, threads: int | None = None) -> Plan:
    """The units of one call (module docstring).

    Args:
        settings: the validated settings of the call.
        rounds: the rounds to analyze, ascending.
        groups: the subject groups (:func:`hessrank.analysis.subjects.realize`).
        fingerprint: the source's run fingerprint.
        checkpoints: per round its checkpoint hash, or the error reading it raised.
        data_hashes: per subject name its data hash; also "clients" (every client's).
        paths: per round the checkpoint's path (for the error records).
        code: hash of the user code that builds the model (None: hessrank's own models).
        threads: the thread count (:func:`thread_key`; None: not a key, for callers that
            plan without running).
    """
    families = families_of(settings.quantities)
    hashes = {f.name: digest(f.settings(settings)) for f in FAMILIES.values()}
    extra: dict[str, Any] = {}
    if code is not None:
        extra["code"] = code
    if threads is not None:
        extra["threads"] = threads
    units: list[Unit] = []
    errors: list[dict[str, Any]] = []
    for r in rounds:
        ckpt = checkpoints[r]
        if isinstance(ckpt, BaseException):
            errors.append({"round": r, "unit": "*", "path": (paths or {}).get(r, ""),
                           "error": str(ckpt)})
            continue
        for g in groups:
            names = [subj.name for subj in g.subjects]
            for f in families:
                if not f.per_group:
                    continue
                key = digest({"run": fingerprint, "checkpoint": ckpt, "round": r,
                              "group": g.label, "subjects": names,
                              "data": [data_hashes[n] for n in names],
                              "settings": hashes[f.name], **extra})
                units.append(Unit(r, g.label, f.name, g, key, hashes[f.name], ckpt))
        for f in families:
            if f.per_group:
                continue
            key = digest({"run": fingerprint, "checkpoint": ckpt, "round": r,
                          "group": f.name, "data": data_hashes["clients"],
                          "settings": hashes[f.name], **extra})
            units.append(Unit(r, f.name, f.name, None, key, hashes[f.name], ckpt))
    return Plan(tuple(units), tuple(errors))
