"""How well the matched controls of next-token data match: total-variation distances on the
real Shakespeare roles.

For the clients of the federated Shakespeare study (``load_dataset("shakespeare", roles=20,
seq_len=32)``, natural partition: one client per role; replicate i draws its roles with
seed i), every client c gets D size-matched draws (uniform subsets of the pool of all
clients' training windows with n_c windows) and D histogram-matched draws
(:func:`hessrank.analysis.controls.histogram_matched_indices`, the defaults: 64 proposals,
patience 20), as ``hessrank study`` draws them. Per client and kind: TV between the draw's
pooled target-character histogram and the client's (mean over draws), and the client's own
share of the draw against its share of the pool, n_c / N. For scale, the TV between a
random half of the client's windows and the whole client (its own sampling noise). A second
table shows the search settings' trade-off: median TV and median own share ÷ n_c / N.

Counts and distances only, no timing beyond the wall clock of the run; same files, same
seeds, same numbers.

    python experiments/benchmarks/bench_matched_controls.py           # 3 role draws, D = 5
    python experiments/benchmarks/bench_matched_controls.py --fast    # 1 role draw, D = 2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hessrank.analysis import controls as ct
from hessrank.data.datasets import load_dataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402

RESULTS = HERE / "results" / "matched_controls.md"
ROLES, SEQ = 20, 32
SEARCHES = ((16, 10), (64, 20), (256, 50))


def clients_of(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-window target histograms (N, V), owner (N,)) of the study's replicate ``seed``."""
    ds = load_dataset("shakespeare", seed=seed, roles=ROLES, seq_len=SEQ)
    owner = ds.meta["train_groups"].numpy()
    return ct.target_histograms(ds.train_y, num_tokens=ds.num_classes), owner


def measure(H: np.ndarray, owner: np.ndarray, draws: int, seed: int,
            proposals: int = 64, patience: int = 20) -> list[dict]:
    clients = np.unique(owner)
    own = [H[owner == c] for c in clients]
    sizes = [len(h) for h in own]
    size_m = ct.size_matched_indices(len(H), sizes, draws, seed)
    hist_m = ct.histogram_matched_indices(H, own, draws, seed, proposals=proposals,
                                          patience=patience)
    rows = []
    for c in clients:
        target = own[c].sum(0)
        members = np.flatnonzero(owner == c)
        rng = np.random.default_rng([seed, 99, int(c)])
        halves = [ct.histogram_tv(H[rng.choice(members, sizes[c] // 2, replace=False)].sum(0),
                                  target) for _ in range(draws)]
        row = {"client": int(c), "n": sizes[c], "base": sizes[c] / len(H),
               "half_tv": float(np.mean(halves))}
        for kind, idx in (("size", size_m[c]), ("hist", hist_m[c])):
            row[f"{kind}_tv"] = float(np.mean([ct.histogram_tv(H[i].sum(0), target)
                                               for i in idx]))
            row[f"{kind}_share"] = float(np.mean([np.isin(i, members).mean() for i in idx]))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="one role draw, 2 draws per client")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    role_seeds = [0] if args.fast else [0, 1, 2]
    draws = 2 if args.fast else 5
    t0 = time.perf_counter()
    per_seed = {s: clients_of(s) for s in role_seeds}
    rows = [{"roles": s, **r} for s in role_seeds for r in measure(*per_seed[s], draws, seed=s)]
    trade = []
    for proposals, patience in SEARCHES:
        got = [r for s in role_seeds
               for r in measure(*per_seed[s], draws, s, proposals, patience)]
        trade.append([proposals, patience, f"{np.median([r['hist_tv'] for r in got]):.4f}",
                      f"{np.median([r['hist_share'] / r['base'] for r in got]):.2f}"])
    seconds = time.perf_counter() - t0
    tv_s = np.array([r["size_tv"] for r in rows])
    tv_h = np.array([r["hist_tv"] for r in rows])
    half = np.array([r["half_tv"] for r in rows])
    ratio = np.array([r["hist_share"] / r["base"] for r in rows])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python experiments/benchmarks/bench_matched_controls.py" + (
        " --fast" if args.fast else "")
    lines = [
        "# Matched controls of next-token data: how close the histograms come",
        "",
        f"Machine: {_timing.machine_line(torch.get_num_threads())}; numpy {np.__version__}; "
        f"{platform.platform()}. Run: `{cmd}` on {when} ({seconds:.0f} s; distances and "
        "shares only: they do not depend on the machine or its load).",
        "",
        f"Data: `load_dataset('shakespeare', seed=s, roles={ROLES}, seq_len={SEQ})` for role "
        f"draws s = {', '.join(map(str, role_seeds))} (the federated Shakespeare study's "
        "replicates 0..), one client per role; the pool is all clients' training windows. "
        f"{draws} draws per client and kind from streams of seed s (`hessrank study` draws "
        "the same way from its analysis seed). TV: "
        "½ Σ_k |q_k − p_k| between a draw's pooled target-character distribution q and its "
        "client's p. *own share*: the fraction of a draw's windows that are the client's own, "
        "against n_c / N, the share of a uniform draw. *half-client TV*: a random half of the "
        "client's own windows against the whole client, the scale of its sampling noise.",
        "",
        "## Summary over all clients",
        "",
        _timing.markdown_table(
            ["", "size-matched", "histogram-matched", "half-client (noise scale)"],
            [["median TV", f"{np.median(tv_s):.4f}", f"{np.median(tv_h):.4f}",
              f"{np.median(half):.4f}"],
             ["TV range", f"{tv_s.min():.4f}–{tv_s.max():.4f}",
              f"{tv_h.min():.4f}–{tv_h.max():.4f}", f"{half.min():.4f}–{half.max():.4f}"],
             ["clients where histogram-matched TV < size-matched TV", "",
              f"{int((tv_h < tv_s).sum())} of {len(rows)}", ""],
             ["median TV ratio histogram ÷ size", "", f"{np.median(tv_h / tv_s):.2f}", ""],
             ["median own share ÷ (n_c / N)",
              f"{np.median([r['size_share'] / r['base'] for r in rows]):.2f}",
              f"{np.median(ratio):.2f} (max {ratio.max():.2f})", ""]]),
        "",
        "## The search's trade-off (proposals per step, patience)",
        "",
        "More proposals and patience match closer and take more of the client's own windows; "
        "the default is 64, 20.",
        "",
        _timing.markdown_table(["proposals", "patience", "median TV", "median own share ÷ "
                                "(n_c / N)"], trade),
        "",
        "## Per client",
        "",
        _timing.markdown_table(
            ["role draw", "client", "n_c", "TV size-matched", "TV histogram-matched",
             "half-client TV", "own share size-matched", "own share histogram-matched",
             "n_c / N"],
            [[r["roles"], r["client"], r["n"], f"{r['size_tv']:.4f}", f"{r['hist_tv']:.4f}",
              f"{r['half_tv']:.4f}", f"{r['size_share']:.3f}", f"{r['hist_share']:.3f}",
              f"{r['base']:.3f}"] for r in rows]),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}: median TV size {np.median(tv_s):.4f}, histogram "
          f"{np.median(tv_h):.4f}, half-client {np.median(half):.4f} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
