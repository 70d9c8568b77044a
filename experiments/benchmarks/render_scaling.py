"""Render the generated blocks of ``docs/scaling.md`` from the benchmark results and the model.

Blocks (between ``<!-- scaling:NAME:start -->`` and ``<!-- scaling:NAME:end -->``):

- ``workers``: the body of ``results/workers.md`` (``bench_workers.py``: one analysis process
  vs ``--workers 2`` vs ``torchrun`` × 2 on the digits CNN trajectory);
- ``memory``: the body of ``results/memory.md`` (``bench_hvp.py --memory-only``: streamed
  products vs a gradient on ResNet-18, batch 128);
- ``communication``: the communication model. One block product of a stack of J operators on
  k vectors all-reduces J·p·k floats once; a ring all-reduce over R ranks moves
  2(R − 1)/R of the message through each link, so it costs ≈ 2(R − 1)/R · 4·J·p·k / B
  seconds in float32 at link bandwidth B (latency ignored; R = 1: nothing). p is counted on
  the CIFAR-shaped ResNet-18 of :func:`hessrank.models.build_model` at widths 64 and 16.

    python experiments/benchmarks/render_scaling.py   # rewrites the blocks in place

``tests/test_docs.py`` fails when a block is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOC = REPO / "docs" / "scaling.md"
RESULTS = HERE / "results"
J = 21
"""Operators in the modelled stack: the server and 20 clients."""
RANKS = (8, 64)
GBITS = (10, 100)


def results_body(name: str) -> str:
    """A results file without its title line (the doc gives its own heading)."""
    lines = (RESULTS / name).read_text().strip().splitlines()
    return "\n".join(lines[1:]).strip() if lines and lines[0].startswith("# ") else "\n".join(
        lines)


def resnet_dims() -> dict[int, int]:
    """p of the CIFAR-shaped ResNet-18 at widths 64 and 16."""
    sys.path.insert(0, str(REPO))
    from hessrank.models import build_model

    return {w: sum(t.numel() for t in build_model("resnet18", (3, 32, 32), 10,
                                                  width=w).parameters()) for w in (64, 16)}


def all_reduce_seconds(floats: float, ranks: int, gbit: float) -> float:
    """Ring all-reduce of ``floats`` float32 values over ``ranks`` ranks at ``gbit`` Gbit/s."""
    return 2 * (ranks - 1) / ranks * 4 * floats / (gbit * 1e9 / 8)


def communication_block() -> str:
    head = ["model", "p", "k", "MB per product"] + [
        f"R = {r}, {g} Gbit/s" for r in RANKS for g in GBITS]
    rows = []
    for width, p in resnet_dims().items():
        for k in (1, 8):
            floats = J * p * k
            rows.append([f"ResNet-18 (width {width}, CIFAR)", f"{p:,}", str(k),
                         f"{4 * floats / 1e6:,.0f}"]
                        + [f"{all_reduce_seconds(floats, r, g):.2f} s"
                           for r in RANKS for g in GBITS])
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([
        f"J = {J} (server + 20 clients); seconds = 2(R − 1)/R · 4·J·p·k bytes / bandwidth "
        "(float32, one ring all-reduce per block product, latency ignored).", "",
        *table])


def blocks() -> dict[str, str]:
    return {"workers": results_body("workers.md"), "memory": results_body("memory.md"),
            "communication": communication_block()}


def render(text: str, contents: dict[str, str]) -> str:
    """``text`` with every named block replaced (a missing marker pair is an error)."""
    for name, body in contents.items():
        start, end = f"<!-- scaling:{name}:start -->", f"<!-- scaling:{name}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC} has no {start} ... {end} block")
        block = f"{start}\n{body}\n{end}"
        text = pattern.sub(lambda _m, block=block: block, text)
    return text


def main() -> int:
    text = DOC.read_text()
    new = render(text, blocks())
    if new != text:
        DOC.write_text(new)
        print(f"rewrote {DOC.relative_to(REPO)}")
    else:
        print(f"{DOC.relative_to(REPO)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
