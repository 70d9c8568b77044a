"""One registry per extension axis, analysis side (issue 21, item 4): an estimator family and
its quantities are entries that the planner, the executor and the CLI all read; the
curvature names come from the curvature registry."""

from __future__ import annotations

import pytest

from hessrank.analysis import quantities as reg
from hessrank.analysis.quantities import FAMILIES, QUANTITIES, Family, Quantity
from hessrank.analysis.trajectory import analyze
from hessrank.cli import build_parser


def _diagonal(op, s, seed):
    from hessrank.linalg import diagonal

    return diagonal(op, method="hutchinson", num_matvecs=s.matvecs, seed=seed)


def test_a_new_estimator_family_is_two_registry_entries(trained_run, tmp_path, monkeypatch,
                                                        capsys):
    """The extension cost measured: a family (its settings, its product count and its
    estimator call) and a quantity (its rows), nothing else, reach the plan, the table, the
    store and `hessrank analyze --help`."""
    family = Family("diagonal", "Hutchinson diagonal (hessrank.linalg.diagonal)",
                    lambda s: {"family": "diagonal", "seed": s.seed, "matvecs": s.matvecs,
                               "curvature": s.curvature},
                    lambda s, J: J * s.matvecs, estimate=_diagonal)
    quantity = Quantity("diag-sum", "diagonal", "tr(H) as the sum of the estimated diagonal",
                        lambda r: [reg._r("diag-sum", r["diagonal_sum"], float("nan"),
                                          r["num_matvecs"])])
    monkeypatch.setitem(FAMILIES, family.name, family)
    monkeypatch.setitem(QUANTITIES, quantity.name, quantity)
    t = analyze(trained_run, rounds="1", subjects="server,clients", quantities="diag-sum,trace",
                out=tmp_path / "an", matvecs=20, progress=False, threads=1)
    diag = t[t["quantity"] == "diag-sum"].set_index("subject")["value"]
    trace = t[t["quantity"] == "trace"].set_index("subject")["value"]
    assert len(diag) == 4 and set(diag.index) == set(trace.index)
    # two estimators of tr(H) on the same operators agree within their error
    assert ((diag - trace).abs() <= 0.5 * trace.abs().max()).all()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    assert "diag-sum (tr(H) as the sum" in " ".join(capsys.readouterr().out.split())


def test_cli_help_and_checks_read_the_registries(capsys):
    from hessrank.curvature import curvature_class

    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for q in QUANTITIES.values():
        assert f"{q.name} ({' '.join(q.help.split())})" in text
    for name in ("hessian", "ggn", "fisher"):  # the examples --curvature's help names
        assert curvature_class(name).curvature == name
    from hessrank.analysis.settings import AnalysisSettings

    with pytest.raises(ValueError, match="--curvature hessain: unknown curvature.*hessian"):
        AnalysisSettings(curvature="hessain").validate()
