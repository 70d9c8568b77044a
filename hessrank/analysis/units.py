"""Computing one unit of an analysis plan at one model (docs/design.md, analysis).

:class:`UnitRunner` runs a unit's estimator family (:mod:`hessrank.analysis.quantities`) on the
unit's stacked operator — built from its subject group by
:func:`hessrank.analysis.subjects.build_operator`, on this rank's shard under torchrun — or,
for a family computed once per round, on the model and the clients' data, and lays the result
out in the table's columns (:data:`hessrank.analysis.store.COLUMNS`) with the SLQ
tridiagonals and the product route the operator reported (:func:`route_of`). Each estimator
call gets the seed :func:`hessrank.analysis.settings.probe_seed` of its (round, group,
family), so units draw independent probes and the same command gives the same bits.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd
from torch import nn

from hessrank.analysis.distributed import Ranks
from hessrank.analysis.planner import Unit
from hessrank.analysis.progress import CountingOperator, Progress
from hessrank.analysis.quantities import FAMILIES, QUANTITIES, quantity_rows
from hessrank.analysis.settings import AnalysisSettings, probe_seed
from hessrank.analysis.store import COLUMNS
from hessrank.analysis.subjects import Subject, SubjectGroup, build_operator

__all__ = ["UnitRunner", "route_of"]

Pair = tuple[Any, Any]


def route_of(op: Any, j: int | None = None) -> dict[str, Any]:
    """The product route an operator reports (``route``, else ``settings``). A stack of
    operators: operator ``j``'s route with ``"stack": J``; without ``j`` the shared route with
    ``"stack": J`` when all J agree, else ``{"stack": [each route]}``."""
    route = getattr(op, "route", None)
    if route is None and hasattr(op, "operators"):
        ops = op.operators
        if j is not None:
            return {**route_of(ops[j]), "stack": len(ops)}
        routes = [route_of(o) for o in ops]
        if all(r == routes[0] for r in routes):
            return {**routes[0], "stack": len(ops)}
        return {"stack": routes}
    if route is None:
        route = getattr(op, "settings", None)
    return dict(route) if isinstance(route, dict) else {}


class UnitRunner:
    """Computes units at one model: the family's estimator on the unit's stacked operator
    (or the per-round family on the clients), rows in the table's columns."""

    def __init__(self, settings: AnalysisSettings, task: Any, client_data: list[Pair],
                 hashes: dict[str, str], ranks: Ranks | None) -> None:
        self.s, self.task, self.client_data = settings, task, client_data
        self.hashes, self.ranks = hashes, ranks
        self.rtol = float("nan") if settings.rtol is None else float(settings.rtol)

    def _operator(self, group: SubjectGroup, model: nn.Module) -> Any:
        s = self.s
        kw: dict[str, Any] = {"params": list(s.params) if s.params else None, "mode": s.mode,
                              "batch_size": s.batch_size, "cache_budget_mb": float(s.memory_mb)}
        if self.ranks is not None:
            kw.update(shard=(self.ranks.rank, self.ranks.world), process_group=True)
        return build_operator(group, model, self.task, curvature=s.curvature, **kw)

    def _base(self, u: Unit, subj: Subject, data: str, route: str) -> dict[str, Any]:
        s = self.s
        return {"round": int(u.round), "subject": subj.name, "subject_kind": subj.kind,
                "subject_size": int(subj.size), "seed": int(s.seed),
                "data_seed": int(subj.data_seed), "curvature": s.curvature, "rtol": self.rtol,
                "checkpoint": u.checkpoint, "data": data, "settings": u.settings,
                "unit": u.key, "route": route}

    def compute(self, u: Unit, model: nn.Module, progress: Progress
                ) -> tuple[pd.DataFrame, dict[str, tuple] | None, str]:
        """The unit's rows (all quantities of its family), densities and route (JSON)."""
        family = FAMILIES[u.family]
        if not family.per_group:
            t0 = time.perf_counter()
            found = family.per_round(model, self.task, self.client_data, self.s)
            dt = time.perf_counter() - t0
            progress.advance(1)
            n = sum(int(y.shape[0]) for _, y in self.client_data)
            base = self._base(u, Subject("clients", "client", n), self.hashes["clients"], "{}")
            rows = [{**base, **r, "seconds": dt} for r in found]
            return pd.DataFrame(rows, columns=COLUMNS), None, "{}"
        op = self._operator(u.group, model)
        seed = probe_seed(self.s.seed, u.round, f"{u.family}:{u.label}")
        t0 = time.perf_counter()
        res = family.estimate(CountingOperator(op, progress), self.s, seed)
        dt = time.perf_counter() - t0
        route = json.dumps(route_of(op), sort_keys=True, default=str)
        names = [q for q in QUANTITIES if QUANTITIES[q].family == u.family]
        per_op = quantity_rows(names, res)
        rows = []
        for subj, j in zip(u.group.subjects, u.group.index):
            own = json.dumps(route_of(op, j), sort_keys=True, default=str)  # this subject's
            base = {**self._base(u, subj, self.hashes[subj.name], own), "seed": seed}
            rows.extend({**base, **r, "layer": "", "seconds": dt} for r in per_op[j])
        dens = None
        if family.densities is not None:
            tri = family.densities(res)
            dens = {subj.name: tri[j] for subj, j in zip(u.group.subjects, u.group.index)}
        return pd.DataFrame(rows, columns=COLUMNS), dens, route
