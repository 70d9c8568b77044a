"""Before/after: this branch's hessrank against the code it started from, in one process.

The baseline package (``_baseline.load``: ``hessrank/`` as of the merge base with main, or
``--baseline COMMIT``) is imported beside the current one. Every contender is a pair — the same
call on the same model, data and vectors, once through each package — timed in interleaved
rounds with the baseline right before the current version (``_timing.interleaved``, unit =
the baseline); the figure is the median over rounds of after ÷ before (< 1: faster now), with
the IQR. Where both versions take the same route the outputs are also compared bit for bit.

Pairs, by the benchmark whose timings they cover:

- ``bench_hvp.py`` / ``bench_peers.py``: the default HessianOperator's products (k = 1 and a
  block of 8) and gradient on the digits MLP and CNN, a 143-sample client MLP, a ResNet-18 of
  width 8 and the hand-written transformer (float32); the GGN and Fisher defaults;
- ``bench_estimators.py``: ``stable_rank``/``frobenius_sq``/``lanczos``/``trace`` at fixed
  budgets on the trained digits MLP 64-32-10 (float64 operator) and on a dense 610×610 Hessian;
- ``bench_federated.py``: the joint operator's stable rank (construction + 40 products),
  stacked and per-client, on digits split among 10 clients.

Then **same bits**: ``hessrank analyze`` (server and clients, stable rank, 40 matvecs, and the
GGN) on a tiny FedAvg run by both versions; the tables must be equal in every computed column.
Writes ``results/before_after.md``.

    python experiments/benchmarks/bench_before_after.py                  # ~15 minutes
    python experiments/benchmarks/bench_before_after.py --fast           # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessrank as hr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _baseline  # noqa: E402
import _models  # noqa: E402
import _timing  # noqa: E402

RESULTS = HERE / "results" / "before_after.md"
CE = nn.functional.cross_entropy
K = 8


def product_pairs(base, key: str) -> list[tuple[str, object, object, bool]]:
    """(label, before, after, same bits expected) for the operators' default products."""
    if key == "client":
        _, model, x, y, task = _models.setting("mlp")
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10)).eval()
        x, y, label = x[:143], y[:143], "client MLP 64-64-64-10 (143 samples)"
    else:
        label, model, x, y, task = _models.setting(key)
    loss = CE if key != "transformer" else task
    p = sum(q.numel() for q in model.parameters())
    gen = torch.Generator().manual_seed(0)
    v1, vk = torch.randn(p, 1, generator=gen), torch.randn(p, K, generator=gen)
    pairs = []
    for name in ("HessianOperator", "GGNOperator", "FisherOperator"):
        if name != "HessianOperator" and key in ("client", "resnet"):
            continue
        b = getattr(base.curvature, name)(model, loss, (x, y))
        a = getattr(hr.curvature, name)(model, loss, (x, y))
        same = b.route == {k: v for k, v in a.route.items() if k != "attention"}
        short = name.removesuffix("Operator")
        pairs.append((f"{label}: {short} k=1", (lambda o=b: o.matmat(v1)),
                      (lambda o=a: o.matmat(v1)), same))
        pairs.append((f"{label}: {short} k={K}", (lambda o=b: o.matmat(vk)),
                      (lambda o=a: o.matmat(vk)), same))
        if name == "HessianOperator":
            pairs.append((f"{label}: gradient", b.gradient, a.gradient, True))
    return pairs


def estimator_pairs(base) -> list[tuple[str, object, object, bool]]:
    from bench_estimators import digits, mlp, mlp_hessians, train_briefly

    x, y = digits(torch.float64)
    model = mlp([64, 32, 10], torch.float64, seed=0)
    train_briefly(model, x, y, steps=300, seed=0)
    model.eval()
    ob = base.curvature.HessianOperator(model, CE, (x, y))
    oa = hr.HessianOperator(model, CE, (x, y))
    A = mlp_hessians()["MLP trained"]
    calls = {
        "stable_rank(40)": lambda lib, op: lib.linalg.stable_rank(op, num_matvecs=40, seed=0),
        "frobenius_sq(40)": lambda lib, op: lib.linalg.frobenius_sq(op, num_matvecs=40, seed=0),
        "lanczos(k=1, 20)": lambda lib, op: lib.linalg.lanczos(op, k=1, num_matvecs=20, seed=0),
        "trace(hutchinson, 40)": lambda lib, op: lib.linalg.trace(op, num_matvecs=40, seed=0,
                                                                  method="hutchinson"),
    }
    pairs = []
    for name, call in calls.items():
        pairs.append((f"digits MLP 64-32-10 (operator): {name}",
                      (lambda c=call: c(base, ob)), (lambda c=call: c(hr, oa)), True))
        pairs.append((f"dense 610×610 Hessian: {name}", (lambda c=call: c(base, A)),
                      (lambda c=call: c(hr, A)), True))
    return pairs


def federated_pairs(base) -> list[tuple[str, object, object, bool]]:
    from bench_federated import setting

    model, task, clients = setting("mlp", 10)
    pairs = []
    for strategy in ("stacked", "per-client"):
        def run(lib, s=strategy):
            F = lib.curvature.FederatedOperator(model, task, clients, "hessian", strategy=s)
            return lib.linalg.stable_rank(F, num_matvecs=40, seed=0).value

        pairs.append((f"digits MLP, K = 10, {strategy}: joint stable rank (40 matvecs)",
                      (lambda r=run: r(base)), (lambda r=run: r(hr)), True))
    return pairs


def outputs_equal(b, a) -> bool | None:
    """Whether two results are bit-identical (tensors, arrays, result dataclasses)."""
    if isinstance(b, torch.Tensor):
        return torch.equal(b, a)
    if isinstance(b, np.ndarray):
        return bool(np.array_equal(b, a))
    if hasattr(b, "value") and hasattr(a, "value"):
        return bool(np.array_equal(b.value, a.value))
    if hasattr(b, "eigenvalues"):
        return bool(np.array_equal(b.eigenvalues, a.eigenvalues))
    return None


def analysis_bits(base, fast: bool) -> list[list[str]]:
    """The same analyze command through both versions on a tiny FedAvg run: equal tables?"""
    import hessrank.analysis.trajectory as trajectory
    import hessrank.fl as fl

    base_trajectory = importlib.import_module(f"{base.__name__}.analysis.trajectory")

    run = Path(tempfile.mkdtemp()) / "run"
    fl.train({"algo": "fedavg", "dataset": "digits", "model": "mlp",
              "model_kwargs": {"hidden": [16]}, "clients": 4, "partition": "dirichlet",
              "rounds": 2, "save_every": 1, "local_steps": 2, "seed": 0}, run, progress=False)
    cols = ["round", "subject", "quantity", "index", "value", "stderr", "matvecs", "route"]
    rows = []
    for curvature in ("hessian", "ggn", "fisher"):
        kw = dict(rounds="0,2", subjects="server,clients", quantities="stable-rank,trace",
                  matvecs=20 if fast else 40, curvature=curvature, progress=False)
        tb = base_trajectory.analyze(run, out=run.parent / f"b-{curvature}", **kw)
        ta = trajectory.analyze(run, out=run.parent / f"a-{curvature}", **kw)
        keep = [c for c in cols if c in tb.columns]
        tb = tb[keep].sort_values(keep[:4]).reset_index(drop=True)
        ta = ta[keep].sort_values(keep[:4]).reset_index(drop=True)
        equal = tb.shape == ta.shape and all(tb[c].equals(ta[c]) for c in keep)
        rows.append([curvature, str(len(ta)), "**equal**" if equal else "DIFFERENT"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="3 rounds, small models only")
    ap.add_argument("--baseline", default=None, help="commit (default: merge base with main)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (15; fast 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="products,estimators,federated,bits")
    ap.add_argument("--models", default="mlp,cnn,client,resnet,transformer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.fast else 15)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    base = _baseline.load(args.baseline)
    busy, load = _timing.busy_cores(), _timing.load_average()
    started = time.perf_counter()
    only = set(args.only.split(","))
    pairs = []
    if "products" in only:
        for key in args.models.split(","):
            if args.fast and key in ("resnet", "transformer"):
                continue
            pairs += product_pairs(base, key)
    if "estimators" in only:
        pairs += estimator_pairs(base)
    if "federated" in only:
        pairs += federated_pairs(base)
    rows, worst = [], (0.0, "")
    for label, before, after, same in pairs:
        bits = outputs_equal(before(), after()) if same else None
        t = _timing.interleaved({"before": before, "after": after}, unit="before",
                                repeats=repeats, warmup=1, min_time=0.05 if args.fast else 0.2)
        r, (lo, hi) = t.ratio("after"), t.spread("after")
        if r > worst[0]:
            worst = (r, label)
        rows.append([label, f"{r:.3f}", f"{lo:.2f}–{hi:.2f}", f"{1e3 * t.seconds('before'):.2f}",
                     f"{1e3 * t.seconds('after'):.2f}",
                     "yes" if bits else ("—" if bits is None else "**no**")])
        print(" | ".join(rows[-1]), flush=True)
    tables = analysis_bits(base, args.fast) if "bits" in only else None
    lines = [
        "# Before/after: this branch against the code it started from", "",
        f"Machine: {_timing.machine_line(torch.get_num_threads())}; other work kept {busy:.1f} "
        f"cores busy when this run started (/proc/stat), load average {load}.  ",
        f"Run: `python experiments/benchmarks/bench_before_after.py"
        f"{' ' + ' '.join(argv) if argv else ' ' + ' '.join(sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - started:.0f} s; before = {base.COMMIT}.", "",
        f"after ÷ before: median over {repeats} interleaved rounds of the paired ratio (the "
        "baseline timed right before the current version), IQR of the per-round ratios; "
        "< 1 is faster now. bits: the two outputs are bit-identical (— where the route "
        "changed on purpose).", "",
        f"**Slowest pair: {worst[0]:.3f} ({worst[1]}).**" if rows else "No timed pairs.", "",
        _timing.markdown_table(["pair", "after ÷ before", "IQR", "before ms", "after ms",
                                "bits"], rows), ""]
    if tables is not None:
        lines += ["## Same command, same bits", "",
                  "`analyze(run, rounds='0,2', subjects='server,clients', quantities="
                  f"'stable-rank,trace', matvecs={20 if args.fast else 40}, curvature=...)` "
                  "on a 2-round FedAvg run "
                  "(digits, MLP 64-16-10, 4 Dirichlet clients), once through each version; "
                  "columns round, subject, quantity, index, value, stderr, matvecs, route.", "",
                  _timing.markdown_table(["curvature", "rows", "tables"], tables), ""]
        print("\n".join(lines[-2:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"slowest {worst[0]:.3f} ({worst[1]}); wrote {args.out}")


if __name__ == "__main__":
    main()
