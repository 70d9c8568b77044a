"""Generated blocks of docs/scaling.md are current (numbers come from the benchmark results
and the model, never typed by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "render_scaling.py"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_scaling", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaling_doc_blocks_are_current():
    mod = _renderer()
    text = mod.DOC.read_text()
    assert text == mod.render(text, mod.blocks()), (
        "docs/scaling.md is stale: run python experiments/benchmarks/render_scaling.py")


def test_all_reduce_model():
    mod = _renderer()
    assert mod.all_reduce_seconds(1e6, 1, 10) == 0.0
    # 2 ranks move the whole message once each way: 2·(1/2)·4 MB at 10 Gbit/s = 3.2 ms
    assert abs(mod.all_reduce_seconds(1e6, 2, 10) - 3.2e-3) < 1e-12
