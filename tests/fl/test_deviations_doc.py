"""docs/deviations.md's generated mFedLoRU table is current, and the trainer's per-tier counts
match the closed forms (issue 23: tier downloads counted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "render_deviations.py"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_deviations", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tier_counts_match_closed_forms_and_the_doc_is_current():
    mod = _renderer()
    rows = mod.counts()
    # every message is the factors of the one factorized layer plus the same dense part
    dense = {r["down"] - r["factors_down"] for r in rows} | {r["up"] - r["factors_up"]
                                                             for r in rows}
    assert len(dense) == 1 and dense.pop() > 0
    tiers = {(r["scheme"], r["tier"]): r for r in rows}
    hier = [tiers["mFedLoRU hierarchical", t]["down"] for t in mod.TIERS]
    assert len(set(hier)) == 1  # every tier downloads the rank-r factors
    assert tiers["mFedLoRU hierarchical", 8]["up"] > tiers["FedLoRU", 8]["up"]
    width = [tiers["mFedLoRU width", t]["down"] for t in mod.TIERS]
    assert width == sorted(width, reverse=True) and len(set(width)) == 3
    text = mod.DOC.read_text()
    assert text == mod.render(text, mod.blocks()), (
        "docs/deviations.md is stale: run python experiments/benchmarks/render_deviations.py")
