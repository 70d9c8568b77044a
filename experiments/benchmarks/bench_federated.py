"""Joint FederatedOperator versus K + 1 separate HessianOperator analyses, same budget.

The question (docs/design.md §3): is one stacked (K+1, p, p) operator — one pass over client c's
data pushes both H_c's and the server's tangents — cheaper than analysing every client and the
server (pooled data) one by one? Both sides compute the stable rank of all K + 1 Hessians with
40 matvecs each, same seed, same data (scikit-learn digits, iid split among K clients), same
model at the same weights (a digits MLP 64-64-64-10 or a small CNN, float32). A timing covers
operator construction and ``stable_rank``; calibration of the product strategy is warm (the
steady state of a trajectory analysis, where rounds after the first reuse it).

Reported per K: medians of interleaved repeats (``_timing.interleaved``), the ratio joint /
separate (target ≤ 0.6), and counts of the data read by the products: *data passes* = samples
pushed through a Hessian-vector product call / N (one call pushes a block of tangents), and
*tangent passes* = Σ samples × tangents / N, the work that scales with the number of vectors.

    python experiments/benchmarks/bench_federated.py            # K = 5, 10, 20; a few minutes
    python experiments/benchmarks/bench_federated.py --fast     # K = 5, 10; 3 repeats
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hessrank.curvature import FederatedOperator, HessianOperator
from hessrank.curvature.base import CurvatureOperator
from hessrank.data.datasets import load_dataset
from hessrank.data.partition import make_partition
from hessrank.linalg import stable_rank
from hessrank.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "federated.md"
MATVECS = 40


def setting(model_name: str, K: int, seed: int = 0, partition: str = "iid"):
    """(model, loss, client_data) for digits split among K clients (iid, or Dirichlet with
    α = 0.5: unequal sizes, which the stacked strategy pads)."""
    ds = load_dataset("digits", seed=seed)
    part = make_partition(ds.train_y, K, partition, alpha=0.5, seed=seed)
    clients = [(ds.train_x[torch.as_tensor(i)], ds.train_y[torch.as_tensor(i)])
               for i in part.indices]
    torch.manual_seed(seed)
    model = build_model(model_name, ds.input_shape, ds.num_classes).eval()
    return model, ds.task, clients


def joint(model, loss, clients, **kw) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        return stable_rank(FederatedOperator(model, loss, clients, **kw), num_matvecs=MATVECS,
                           seed=0).value
    return run


def separate(model, loss, clients, **kw) -> Callable[[], np.ndarray]:
    kw = {k: v for k, v in kw.items() if k != "strategy"}  # FederatedOperator's own setting
    pooled = (torch.cat([x for x, _ in clients]), torch.cat([y for _, y in clients]))

    def run() -> np.ndarray:
        vals = [stable_rank(HessianOperator(model, loss, d, **kw), num_matvecs=MATVECS,
                            seed=0).value
                for d in [*clients, pooled]]
        return np.concatenate(vals)
    return run


class PassCounter:
    """Counts samples (and samples × tangents) pushed through product calls:
    CurvatureOperator._batch_product, and FederatedOperator._unit_products (padded samples,
    one tangent per unit)."""

    def __init__(self) -> None:
        self.samples = 0
        self.tangent_samples = 0

    def __enter__(self) -> PassCounter:
        self._orig = CurvatureOperator._batch_product
        counter = self

        def counted(op, b, tangents):
            n = op.batches.sizes[b]
            k = next(iter(tangents.values())).shape[0]
            counter.samples += n
            counter.tangent_samples += n * k
            return counter._orig(op, b, tangents)

        self._orig_units = FederatedOperator._unit_products

        def counted_units(F, i, rows):
            a, b = F._groups[i]
            counter.samples += (b - a) * F.route["unit_size"]
            counter.tangent_samples += (b - a) * F.route["unit_size"]
            return counter._orig_units(F, i, rows)

        CurvatureOperator._batch_product = counted
        FederatedOperator._unit_products = counted_units
        return self

    def __exit__(self, *exc) -> None:
        CurvatureOperator._batch_product = self._orig
        FederatedOperator._unit_products = self._orig_units


CONFIGS = {
    "stacked": {"cache": True, "block": "loop", "strategy": "stacked"},
    "cached-loop": {"cache": True, "block": "loop", "strategy": "per-client"},
    "cached-vmap": {"cache": True, "block": "vmap", "strategy": "per-client"},
    "uncached-vmap": {"cache": False, "hvp": "fwd-rev", "block": "vmap"},
    "auto": {},
}
"""Product strategies: HessianOperator kwargs, the same on both sides of a comparison, plus
FederatedOperator's ``strategy`` for the joint side ("stacked": all clients as padded units in
one linearization; "per-client": one operator per client; uncached products are per-client)."""


def product_breakdown(model, loss, clients, kw: dict, reps: int = 9) -> tuple[float, ...]:
    """Median ms of one warm product: joint (K+1 stacked), the K client operators one by one
    (k = 1 each), the pooled server operator (one call over N), and the vjp/jvp calls per
    joint product (number of per-batch tangent calls)."""
    pooled = (torch.cat([x for x, _ in clients]), torch.cat([y for _, y in clients]))
    F = FederatedOperator(model, loss, clients, **kw)
    kw = {k: v for k, v in kw.items() if k != "strategy"}
    ops = [HessianOperator(model, loss, d, **kw) for d in clients]
    server = HessianOperator(model, loss, pooled, **kw)
    J, p, _ = F.shape
    V = torch.randn(J, p, 1, generator=torch.Generator().manual_seed(0))

    def med(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    joint_ms = med(lambda: F.matmat(V))
    clients_ms = med(lambda: [op.matmat(V[j : j + 1]) for j, op in enumerate(ops)])
    server_ms = med(lambda: server.matmat(V[-1:]))
    return joint_ms, clients_ms, server_ms


def measure(K: int, model_name: str, kw: dict, repeats: int,
            partition: str = "iid") -> list[object]:
    """One table row: times, ratio, data and tangent passes, per-product ms, agreement."""
    model, loss, clients = setting(model_name, K, partition=partition)
    N = sum(len(y) for _, y in clients)
    fns = {"joint": joint(model, loss, clients, **kw),
           "separate": separate(model, loss, clients, **kw)}
    t = _timing.interleaved(fns, unit="separate", repeats=repeats, warmup=1, min_time=0.0)
    counts = {}
    for name, fn in fns.items():  # after the warm-up: calibration products are not counted
        with PassCounter() as c:
            fn()
        counts[name] = (c.samples / N, c.tangent_samples / N)
    a, b = fns["joint"](), fns["separate"]()
    rel = float(np.max(np.abs(a - b) / b))  # different random starts: estimator noise
    lo, hi = t.spread("joint")
    jm, cm, sm = product_breakdown(model, loss, clients, kw)
    return [
        K, f"{t.seconds('joint'):.2f}", f"{t.seconds('separate'):.2f}",
        f"**{t.ratio('joint'):.2f}** ({lo:.2f}–{hi:.2f})",
        f"{counts['joint'][0]:.0f} / {counts['separate'][0]:.0f}",
        f"{counts['joint'][1]:.0f} / {counts['separate'][1]:.0f}",
        f"{jm:.1f} / {cm:.1f} + {sm:.1f}", f"{rel:.1%}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--configs", default="stacked,cached-loop,uncached-vmap",
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true", help="K = 5, 10 and 3 repeats")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [5, 10] if args.fast else [int(k) for k in args.ks.split(",")]
    repeats = 3 if args.fast else args.repeats
    configs = [c.strip() for c in args.configs.split(",")]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    busy = _timing.busy_cores()
    header = ["K", "joint s", "separate s", "joint / separate (IQR)",
              "data passes joint / separate", "tangent passes joint / separate",
              "ms per product: joint / K clients + pooled server", "max rel. diff of srank"]
    p = sum(t.numel() for t in setting(args.model, 2)[0].parameters())
    parts = [
        "# Joint FederatedOperator vs K+1 separate analyses (stable rank, 40 matvecs each)",
        "",
        f"{datetime.date.today()} — {_timing.machine_line(args.threads)}; other work kept "
        f"{busy:.1f} cores busy at the start.",
        f"Model: digits {args.model} (p = {p}), float32, eval mode, {args.partition} split "
        f"of N = 1437{' (α = 0.5)' if args.partition == 'dirichlet' else ''}; "
        f"medians of {repeats} interleaved repeats (IQR of the paired ratios); warm "
        "calibration. Produced by `experiments/benchmarks/bench_federated.py "
        f"--model {args.model} --partition {args.partition} --configs {args.configs} "
        f"--repeats {repeats}`.",
        "",
    ]
    for name in configs:
        rows = []
        for K in ks:
            rows.append(measure(K, args.model, CONFIGS[name], repeats, args.partition))
            print(name, rows[-1], flush=True)
        parts += [f"## {name}: HessianOperator({CONFIGS[name]})", "",
                  _timing.markdown_table(header, rows), ""]
    parts += [
        "Data passes: samples pushed through product calls / N (a call pushes a block of "
        "tangents). Tangent passes: Σ samples × tangents / N. The srank column compares the "
        "two routes' estimates, which use different random starts (estimator noise). "
        "ms per product: one warm product with all K+1 Hessians, joint versus the K client "
        "operators (k = 1 each) plus the pooled server operator (one call over all N).",
        "",
    ]
    text = "\n".join(parts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
