"""The quantity registry: each quantity's rows come from its estimator's own ``rows()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessrank.analysis.quantities import QUANTITIES, parse_quantities, quantity_rows
from hessrank.linalg import exact_stable_rank, stable_rank


def test_rows_of_the_lanczos_family_come_from_rows():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    lam = np.concatenate([[10.0, -6.0, 3.0], rng.normal(scale=0.3, size=27)])
    A = torch.as_tensor((Q * lam) @ Q.T)
    res = stable_rank(A, num_matvecs=30, seed=0, k_top=4)
    (row,) = res.rows()
    got = quantity_rows(["stable-rank", "top-eig", "trace", "frobenius"], res)
    assert len(got) == 1
    by = {(r["quantity"], r["k"]): r for r in got[0]}
    assert by[("stable-rank", 0)]["value"] == row["stable_rank"]
    assert by[("stable-rank", 0)]["value"] == pytest.approx(exact_stable_rank(A), rel=0.05)
    assert [by[("top-eig", k)]["value"] for k in range(1, 5)] == row["top_eigenvalues"]
    assert by[("top-eig", 1)]["value"] == pytest.approx(10.0, rel=1e-6)
    assert by[("trace", 0)]["stderr"] == row["trace_stderr"]
    assert by[("frobenius", 0)]["value"] == row["frobenius_sq"]
    assert {q for q, _ in by} == {"stable-rank", "top-k-stable-rank", "intrinsic-dimension",
                                  "top-eig", "trace", "frobenius"}


def test_registry_and_parsing():
    assert set(QUANTITIES) == {"stable-rank", "top-eig", "trace", "frobenius", "density",
                               "alignment"}
    assert parse_quantities("top-eig,stable-rank,top-eig") == ["top-eig", "stable-rank"]
    with pytest.raises(ValueError, match="valid quantities"):
        parse_quantities("stable_rank")


def test_cli_help_lists_match_the_registries(capsys):
    from hessrank.analysis import cli
    from hessrank.analysis.subjects import VALID_FORMS
    from hessrank.cli import build_parser

    assert cli.VALID_FORMS == VALID_FORMS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} (" in text for name in QUANTITIES)
