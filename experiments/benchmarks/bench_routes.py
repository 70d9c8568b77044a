"""The route rule, measured per cell: every product route's time against the rule's choice.

A cell is (model, dtype, curvature, block size k). In each cell every route that computes the
same products is timed in interleaved rounds with a gradient as the unit (paired ratios,
``_timing.interleaved``); the cell's figure is **the rule's choice ÷ the fastest route**
(1.00: the rule picked the fastest; the target is ≤ 1.10 in every cell). The rule itself
never times anything: it is :func:`hessrank.curvature.routes.plan_route`, a function of
shapes and memory, and the route it returns is looked up among the timed ones.

Routes: Hessian — ``hvp`` "graph" (kept double-backward graph), "rev-rev" (kept ``vjp``
closure of the gradient), either uncached (rebuilt per product), "fwd-rev" (``jvp`` of the
gradient, never kept); GGN and Fisher (empirical) — the kept ``vjp`` of the outputs or
rebuilt per product; for k = 8 each with the block pushed by a loop or by ``vmap``.

Models (``_models.py``): the digits MLP and CNN, a CIFAR-shaped ResNet-18 of width 8 and a
hand-written two-layer transformer with next-token targets; float32 and float64; one torch
thread. Writes ``results/routes.md``.

    python experiments/benchmarks/bench_routes.py                 # full
    python experiments/benchmarks/bench_routes.py --fast          # smoke test
    python experiments/benchmarks/bench_routes.py --models mlp --dtypes float32
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import hessrank as hr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _models  # noqa: E402
import _timing  # noqa: E402

RESULTS = HERE / "results" / "routes.md"
CURVATURES = {"hessian": hr.HessianOperator, "ggn": hr.GGNOperator, "fisher": hr.FisherOperator}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
K = 8
TARGET = 1.10


def routes(curvature: str, k: int) -> dict[str, dict]:
    """Every route of ``curvature`` for blocks of k: tag → operator keywords."""
    blocks = ("loop", "vmap") if k > 1 else ("loop",)
    out: dict[str, dict] = {}
    if curvature == "hessian":
        kinds = [("graph", True), ("graph", False), ("rev-rev", True), ("rev-rev", False),
                 ("fwd-rev", False)]
        for hvp, cache in kinds:
            for b in blocks:
                tag = f"{hvp}{' cached' if cache else ''}{' ' + b if k > 1 else ''}"
                out[tag] = {"hvp": hvp, "cache": cache, "block": b}
    else:
        for cache in (True, False):
            for b in blocks:
                tag = f"{'cached' if cache else 'uncached'}{' ' + b if k > 1 else ''}"
                out[tag] = {"cache": cache, "block": b}
    return out


def chosen_tag(route: dict, table: dict[str, dict], k: int) -> str:
    """The tag of the timed route the rule's choice computes with (k = 1: the block is moot)."""
    for tag, kw in table.items():
        if all(route.get(key) == val for key, val in kw.items()
               if not (key == "block" and k == 1)):
            return tag
    raise LookupError(f"the rule's route {route} is not among the timed routes")


def cell(key: str, dtype: torch.dtype, curvature: str, k: int, args, model, x, y, task):
    cls = CURVATURES[curvature]
    table = routes(curvature, k)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    V = torch.randn(p, k, generator=torch.Generator().manual_seed(0), dtype=dtype)
    rule = cls(model, task, (x, y))
    tag = chosen_tag(rule.route, table, k)
    ops = {t: cls(model, task, (x, y), **kw) for t, kw in table.items()}
    ref = ops[tag].matmat(V)
    for t, op in ops.items():  # every route computes the same products
        err = float((op.matmat(V) - ref).norm() / ref.norm())
        if err > (1e-4 if dtype == torch.float32 else 1e-10):
            raise AssertionError(f"{key} {curvature} k={k}: route {t} differs by {err:.1e}")
    params = [q for q in model.parameters() if q.requires_grad]

    def gradient():
        return torch.autograd.grad(task(task.forward(model, x), y), params)

    contenders = {"gradient": gradient}
    contenders.update({t: (lambda o=op: o.matmat(V)) for t, op in ops.items()})
    tm = _timing.interleaved(contenders, unit="gradient", repeats=args.repeats, warmup=1,
                             min_time=args.min_time)
    per = {t: tm.ratio(t) / k for t in ops}
    fastest = min(per, key=per.get)
    return {"route": rule.route, "tag": tag, "per": per, "fastest": fastest,
            "ratio": per[tag] / per[fastest], "grad_ms": 1e3 * tm.seconds("gradient"),
            "spread": {t: tuple(s / k for s in tm.spread(t)) for t in ops}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer rounds: a smoke test")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (9; fast 3)")
    ap.add_argument("--models", default=",".join(_models.SETTINGS))
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--curvatures", default="hessian,ggn,fisher")
    ap.add_argument("--ks", default=f"1,{K}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.fast else 9)
    args.min_time = 0.02 if args.fast else 0.1
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    busy = _timing.busy_cores()
    load = _timing.load_average()
    started = time.perf_counter()
    cmd = " ".join(["python", "experiments/benchmarks/bench_routes.py"]
                   + (argv if argv is not None else sys.argv[1:]))
    rows, detail, worst = [], [], (0.0, "")
    for key in args.models.split(","):
        for dname in args.dtypes.split(","):
            label, model, x, y, task = _models.setting(key, DTYPES[dname])
            for curvature in args.curvatures.split(","):
                for k in (int(s) for s in args.ks.split(",")):
                    r = cell(key, DTYPES[dname], curvature, k, args, model, x, y, task)
                    mark = "" if r["ratio"] <= TARGET else " **over**"
                    rows.append([label, dname, curvature, k, r["tag"], r["fastest"],
                                 f"{r['ratio']:.2f}{mark}", f"{r['per'][r['tag']]:.2f}",
                                 f"{r['grad_ms']:.1f}"])
                    if r["ratio"] > worst[0]:
                        worst = (r["ratio"], f"{label} {dname} {curvature} k={k}")
                    cells = ", ".join(
                        f"{t} {v:.2f} ({r['spread'][t][0]:.2f}–{r['spread'][t][1]:.2f})"
                        for t, v in sorted(r["per"].items(), key=lambda kv: kv[1]))
                    detail.append(f"- {label}, {dname}, {curvature}, k={k}: {cells}")
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    over = sum(1 for r in rows if "over" in r[6])
    lines = [
        "# The route rule, measured per cell", "",
        f"Machine: {_timing.machine_line(torch.get_num_threads())}; other work kept "
        f"{busy:.1f} cores busy when this run started (/proc/stat), load average {load}.  ",
        f"Run: `{cmd}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{time.perf_counter() - started:.0f} s; hessrank at this commit.", "",
        "Each cell times every route that computes the same products, interleaved with a "
        f"gradient as the unit ({args.repeats} rounds, medians of the paired ratios, per "
        "vector). **rule ÷ fastest** is the rule's route's time over the fastest route's "
        f"(target ≤ {TARGET:.2f}); the rule (`hessrank.curvature.routes.plan_route`) reads "
        "shapes and memory only. × gradient: the rule's route per vector, in gradients.", "",
        f"**Worst cell: {worst[0]:.2f} ({worst[1]}); {over} of {len(rows)} cells over "
        f"{TARGET:.2f}.**", "",
        _timing.markdown_table(["model", "dtype", "curvature", "k", "rule's route",
                                "fastest route", "rule ÷ fastest", "× gradient",
                                "gradient ms"], rows), "",
        "## Every route per cell (× gradient per vector, IQR)", "", *detail, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"worst cell {worst[0]:.2f} ({worst[1]}); wrote {args.out}")


if __name__ == "__main__":
    main()
