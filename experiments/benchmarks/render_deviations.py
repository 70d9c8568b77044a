"""Render the generated blocks of ``docs/deviations.md``.

Block ``fedlrt``: the body of ``results/fedlrt_cap.md`` (``bench_fedlrt_cap.py``: FeDLRT's
floats vs accuracy with and without the rank cap). Each block sits between
``<!-- deviations:NAME:start -->`` and ``<!-- deviations:NAME:end -->``.

Block ``mfedloru``: the floats each client downloads and uploads in one
round, counted by the trainer itself (``RoundStats.floats_down`` / ``floats_up``), for
FedLoRU and both mFedLoRU schemes on the digits MLP (64-64-64-10, rank 8, the default
factorization: the 64×64 layer ``fc2``), three clients of ranks 8, 4, 2, every client
sampled; plus the factor floats of the factorized layer alone from the closed forms that the
counts must match (hierarchical up: r_c·(2r + m + n); width: r_c·(m + n); FedLoRU: r·(m + n)).

    python experiments/benchmarks/render_deviations.py   # rewrites the blocks in place

``tests/fl/test_deviations_doc.py`` fails when a block is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOC = REPO / "docs" / "deviations.md"
RESULTS = HERE / "results"
RANK, TIERS = 8, (8, 4, 2)
SETTINGS = {"dataset": "digits", "model": "mlp", "clients": 3, "partition": "iid", "rank": RANK,
            "local_steps": 1, "rounds": 1, "merge_every": 0, "client_ranks": list(TIERS)}
SCHEMES = (("FedLoRU", {"algo": "fedloru"}),
           ("mFedLoRU hierarchical", {"algo": "mfedloru", "mfedloru_scheme": "hierarchical"}),
           ("mFedLoRU width", {"algo": "mfedloru", "mfedloru_scheme": "width"}))


def counts() -> list[dict]:
    """One row per (scheme, client): its tier and the floats it moved in round 1."""
    sys.path.insert(0, str(REPO))
    import torch

    from hessrank.fl.config import TrainConfig
    from hessrank.fl.layers import factorized_layers
    from hessrank.fl.setup import build_setup

    rows = []
    for label, algo in SCHEMES:
        cfg = TrainConfig(**{**SETTINGS, **algo})
        if cfg.algo == "fedloru":
            cfg.client_ranks = None
        setup = build_setup(cfg)
        fed = setup.federation
        (name, layer), = factorized_layers(fed.strategy.model).items()
        m, n = layer.out_dim, layer.fan_in
        stats = fed.round(1, setup.clients, 0.1, torch.Generator().manual_seed(0))
        for cid in sorted(stats.floats_down):
            tier = TIERS[cid] if cfg.algo == "mfedloru" else RANK
            if label == "FedLoRU":
                factors = (RANK * (m + n), RANK * (m + n))
            elif label.endswith("hierarchical"):
                factors = (RANK * (m + n), tier * (2 * RANK + m + n))
            else:
                factors = (tier * (m + n), tier * (m + n))
            rows.append({"scheme": label, "tier": tier, "down": stats.floats_down[cid],
                         "up": stats.floats_up[cid], "layer": f"{name} ({m}×{n})",
                         "factors_down": factors[0], "factors_up": factors[1]})
    return rows


def block() -> str:
    rows = counts()
    head = ("| scheme | client rank r_c | floats down | floats up | of which factors of "
            f"{rows[0]['layer']}, down / up |")
    lines, seen = [head, "|---|---|---|---|---|"], set()
    for r in rows:
        if (r["scheme"], r["tier"]) in seen:  # FedLoRU: every client alike, shown once
            continue
        seen.add((r["scheme"], r["tier"]))
        lines.append(f"| {r['scheme']} | {r['tier']} | {r['down']:,} | {r['up']:,} | "
                     f"{r['factors_down']:,} / {r['factors_up']:,} |")
    return "\n".join(lines)


def results_body(name: str) -> str:
    """A results file without its title line (the doc gives its own heading)."""
    lines = (RESULTS / name).read_text().strip().splitlines()
    return "\n".join(lines[1:]).strip() if lines and lines[0].startswith("# ") else "\n".join(
        lines)


def blocks() -> dict[str, str]:
    """Block name → body."""
    return {"mfedloru": block(), "fedlrt": results_body("fedlrt_cap.md")}


def render(text: str, bodies: dict[str, str]) -> str:
    """``text`` with every block's body replaced."""
    for name, body in bodies.items():
        start, end = f"<!-- deviations:{name}:start -->\n", f"<!-- deviations:{name}:end -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{DOC} has no deviations:{name} block")
        text = pattern.sub(lambda _, b=body, s=start, e=end: s + b + "\n" + e, text)
    return text


def main() -> None:
    text = DOC.read_text()
    new = render(text, blocks())
    if new != text:
        DOC.write_text(new)
    print(f"{DOC}: {'updated' if new != text else 'current'}")


if __name__ == "__main__":
    main()
