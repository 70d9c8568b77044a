"""Render the generated block of ``docs/deviations.md``: mFedLoRU's communication per tier.

Block ``mfedloru`` (between ``<!-- deviations:mfedloru:start -->`` and
``<!-- deviations:mfedloru:end -->``): the floats each client downloads and uploads in one
round, counted by the trainer itself (``RoundStats.floats_down`` / ``floats_up``), for
FedLoRU and both mFedLoRU schemes on the digits MLP (64-64-64-10, rank 8, the default
factorization: the 64×64 layer ``fc1``), three clients of ranks 8, 4, 2, every client
sampled; plus the factor floats of the factorized layer alone from the closed forms that the
counts must match (hierarchical up: r_c·(2r + m + n); width: r_c·(m + n); FedLoRU: r·(m + n)).

    python experiments/benchmarks/render_deviations.py   # rewrites the block in place

``tests/fl/test_deviations_doc.py`` fails when the block is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOC = REPO / "docs" / "deviations.md"
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


def render(text: str, body: str) -> str:
    """``text`` with the block's body replaced by ``body``."""
    start, end = "<!-- deviations:mfedloru:start -->\n", "<!-- deviations:mfedloru:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{DOC} has no deviations:mfedloru block")
    return pattern.sub(lambda _: start + body + "\n" + end, text)


def main() -> None:
    text = DOC.read_text()
    new = render(text, block())
    if new != text:
        DOC.write_text(new)
    print(f"{DOC}: {'updated' if new != text else 'current'}")


if __name__ == "__main__":
    main()
