"""hessrank against its peers, PyHessian 0.1 and curvlinops: time per product, ‖H‖_F² per matvec.

One run, same machine, threads, models, data and dtype, writes ``results/peers.md``:

1. Time per Hessian-vector product relative to PyHessian's (its kept double-backward graph, the
   path its ``eigenvalues``/``trace`` take with ``data=(x, y)``), interleaved with PyHessian's
   per-batch path (``dataloader_hv_product``: graph rebuilt per product), curvlinops'
   ``HessianLinearOperator`` (forward-over-reverse, recomputed per product; blocks by vmap) and
   hessrank's default operator, on the digits MLP 64-256-256-10 (batch 512) and the digits CNN
   (batch 256) in float32 and float64, and a CIFAR-shaped ResNet-18 (width 16, batch 128;
   ``--fast``: width 8, batch 32) in float32, eval mode. All products are checked against
   PyHessian's (relative 1e-4 in float32, 1e-10 in float64). Target: hessrank's products
   ≥ 1.05× faster than PyHessian's kept graph (ratio ≤ 0.952) on the MLP and the CNN, both
   dtypes, k = 1 and blocks of 8.
2. ‖H‖_F² relative error versus matvecs against the dense truth, hessrank's Krylov-deflated
   ``frobenius_sq`` versus curvlinops' ``hutchinson_squared_fro`` (Rademacher probes), equal
   budgets, on the briefly trained digits MLP of ``bench_estimators.py`` §2 in float64.
3. The PyHessian drop-in (``hessrank.compat.pyhessian``) against PyHessian itself on the same
   call, ``hessian(model, criterion, data=(x, y)).eigenvalues(top_n=...)`` with the defaults
   (maxIter=100, tol=1e-3): wall time from construction to the eigenvalues (median over
   seeds, interleaved), products used, and the relative error of each eigenvalue against the
   dense truth, on the trained digits MLP 64-32-10 (float32, PyHessian's dtype).

The comparisons with PyHessian on accuracy (stable rank versus budget, matvecs to a 1e-4 top
eigenvalue) live in ``bench_estimators.py``; they are not repeated here.

    python experiments/benchmarks/bench_peers.py --threads 1          # full, ~10 minutes
    python experiments/benchmarks/bench_peers.py --threads 1 --fast   # ~2 minutes
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hessrank as hr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402
from bench_estimators import (  # noqa: E402
    CountingHVP,
    PyHessian,
    default_dtype,
    digits,
    mlp,
    ph_hvp,
    pyhessian_on,
    train_briefly,
)  # noqa: E402
from bench_hvp import setting  # noqa: E402

from hessrank.compat.pyhessian import hessian as DropIn  # noqa: E402

try:
    from curvlinops import HessianLinearOperator, hutchinson_squared_fro
except ImportError as err:  # pragma: no cover - an optional benchmark extra
    raise SystemExit(
        f"curvlinops is needed for this benchmark ({err}); install it in a separate "
        "environment (it pulls torchvision, which breaks transformers in .venv): python -m venv "
        ".venv-bench && .venv-bench/bin/pip install -e . torch==2.13.0 pyhessian==0.1 "
        "curvlinops-for-pytorch"
    ) from None

RESULTS = HERE / "results" / "peers.md"
CE = nn.functional.cross_entropy
K = 8


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ---- 1. time per product ------------------------------------------------------------------------
def product_times(key: str, args, dtype: torch.dtype = torch.float32) -> dict:
    label, model, x, y = setting(key, args.fast)
    model, x = model.to(dtype), x.to(dtype)
    label = f"{label}, {str(dtype).removeprefix('torch.')}"
    params = [q for q in model.parameters() if q.requires_grad]
    sizes = [q.numel() for q in params]
    p = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    v1 = torch.randn(p, 1, generator=gen, dtype=dtype)
    vk = torch.randn(p, K, generator=gen, dtype=dtype)

    def split(v):
        return [t.reshape(q.shape) for t, q in zip(torch.split(v, sizes), params)]

    with default_dtype(dtype):
        ph = pyhessian_on(model, x, y)
        ph_loader = PyHessian(model, CE, dataloader=[(x, y)], cuda=False)
    v1_list, vk_lists = split(v1[:, 0]), [split(vk[:, i]) for i in range(K)]
    cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                              check_deterministic=False)
    hr1, hrk = hr.HessianOperator(model, CE, (x, y)), hr.HessianOperator(model, CE, (x, y))
    hrk.matmat(vk)  # build the linearization, as an estimator's first block would
    hr1.matmat(v1)
    s = hrk.route
    tag = f"{s['hvp']}{', cached' if s['cache'] else ''}, {s['block']}"
    scratch = hr.HessianOperator(model, CE, (x, y), hvp="rev-rev", cache=False, block="loop")

    def ph_loader_call():
        with warnings.catch_warnings(), default_dtype(dtype):
            warnings.simplefilter("ignore")
            return ph_loader.dataloader_hv_product(v1_list)

    unit = "pyhessian, kept graph (its eigenvalues/trace path), k=1"
    contenders = {
        unit: (lambda: ph_hvp(ph.gradsH, ph.params, v1_list), 1),
        f"pyhessian, kept graph, k={K} (a loop: no block API)":
            (lambda: [ph_hvp(ph.gradsH, ph.params, v) for v in vk_lists], K),
        "pyhessian, graph rebuilt per product (dataloader_hv_product), k=1":
            (ph_loader_call, 1),
        "curvlinops HessianLinearOperator, k=1": (lambda: cl @ v1, 1),
        f"curvlinops HessianLinearOperator, k={K} (vmap)": (lambda: cl @ vk, K),
        f"hessrank default ({tag}), k=1": (lambda: hr1.matmat(v1), 1),
        f"hessrank default ({tag}), k={K}": (lambda: hrk.matmat(vk), K),
        "hessrank rev-rev from scratch (cache=False), k=1": (lambda: scratch.matmat(v1), 1),
    }
    ref = torch.cat([t.reshape(-1) for t in ph_hvp(ph.gradsH, ph.params, v1_list)])
    checks = {"curvlinops": (cl @ v1)[:, 0], "hessrank": hr1.matmat(v1)[:, 0],
              "hessrank from scratch": scratch.matmat(v1)[:, 0]}
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, out in checks.items():
        err = float((out - ref).norm() / ref.norm())
        if err > tol:
            raise AssertionError(f"{label}: {name} differs from PyHessian by {err:.1e}")
    t = _timing.interleaved({n: f for n, (f, _) in contenders.items()}, unit=unit,
                            repeats=args.repeats, warmup=1, min_time=args.min_time)
    per = {n: t.ratio(n) / kk for n, (_, kk) in contenders.items()}
    rows = []
    for n, (_, kk) in contenders.items():
        lo, hi = t.spread(n)
        rows.append([n, f"{per[n]:.2f}", f"{lo / kk:.2f}–{hi / kk:.2f}",
                     f"{1e3 * t.seconds(n) / kk:.1f}"])
    model.zero_grad(set_to_none=True)
    d1 = per[f"hessrank default ({tag}), k=1"]
    dk = per[f"hessrank default ({tag}), k={K}"]
    phk = per[f"pyhessian, kept graph, k={K} (a loop: no block API)"]
    return {"label": label, "p": p, "n": len(y), "rows": rows, "k1": d1, "kblock": dk,
            "kblock_vs_ph": dk / phk,
            "loader": per["pyhessian, graph rebuilt per product (dataloader_hv_product), k=1"],
            "cl1": per["curvlinops HessianLinearOperator, k=1"],
            "clk": per[f"curvlinops HessianLinearOperator, k={K} (vmap)"],
            "unit_ms": 1e3 * t.seconds(unit), "key": key, "dtype": dtype}


# ---- 2. ‖H‖_F² versus matvecs -------------------------------------------------------------------
def frobenius_vs_budget(args) -> dict:
    x, y = digits(torch.float64)
    model = mlp([64, args.hidden, 10], torch.float64, seed=0)
    train_briefly(model, x, y, steps=300, seed=0)
    model.eval()
    H = hr.dense_hessian(model, CE, [(x[i:i + 256], y[i:i + 256])
                                     for i in range(0, len(y), 256)])
    fro = float(torch.linalg.eigvalsh(H).pow(2).sum())
    p = H.shape[0]
    del H
    op = hr.HessianOperator(model, CE, (x, y))
    params = [q for q in model.parameters()]
    cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                              check_deterministic=False)
    rows, errs = [], {"hessrank": [], "curvlinops": []}
    for B in args.budgets:
        e_hr, e_cl, t_hr, t_cl = [], [], [], []
        for s in range(args.seeds):
            t0 = time.perf_counter()
            r = hr.frobenius_sq(op, num_matvecs=B, seed=s)
            t_hr.append(time.perf_counter() - t0)
            e_hr.append(abs(float(r.value[0]) - fro) / fro)
            torch.manual_seed(s)
            t0 = time.perf_counter()
            est = float(hutchinson_squared_fro(cl, num_matvecs=B))
            t_cl.append(time.perf_counter() - t0)
            e_cl.append(abs(est - fro) / fro)
        errs["hessrank"].append(_timing.median(e_hr))
        errs["curvlinops"].append(_timing.median(e_cl))
        rows.append([B, f"{100 * errs['hessrank'][-1]:.3g}%",
                     f"{100 * errs['curvlinops'][-1]:.3g}%",
                     f"{errs['curvlinops'][-1] / max(errs['hessrank'][-1], 1e-300):.0f}×",
                     f"{_timing.median(t_hr):.2f}", f"{_timing.median(t_cl):.2f}"])
    return {"rows": rows, "fro": fro, "p": p, "errs": errs}


# ---- 3. the drop-in's eigenvalues against PyHessian's -----------------------------------------
def dropin_eigenvalues(args) -> dict:
    x, y = digits(torch.float32)
    model = mlp([64, args.hidden, 10], torch.float32, seed=0)
    train_briefly(model, x, y, steps=300, seed=0)
    model.eval()
    H = hr.dense_hessian(model.double(), CE, (x.double(), y))
    model.float()
    truth = torch.linalg.eigvalsh(H).abs().sort(descending=True).values.numpy()
    rows = []
    for top_n in (1, 3):
        err, used, secs = {"pyhessian": [], "drop-in": []}, {"pyhessian": [], "drop-in": []}, \
            {"pyhessian": [], "drop-in": []}
        for seed in range(args.eig_seeds):
            for name in (("pyhessian", "drop-in") if seed % 2 == 0 else ("drop-in", "pyhessian")):
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                with warnings.catch_warnings(), CountingHVP().installed() as counter:
                    warnings.simplefilter("ignore")
                    if name == "pyhessian":
                        vals, _ = PyHessian(model, CE, data=(x, y), cuda=False).eigenvalues(
                            top_n=top_n)
                        n_products = counter.count
                    else:
                        comp = DropIn(model, CE, data=(x, y), cuda=False, seed=seed)
                        vals, _ = comp.eigenvalues(top_n=top_n)
                        n_products = comp.op.num_matvecs
                secs[name].append(time.perf_counter() - t0)
                used[name].append(n_products)
                v = np.sort(np.abs(np.asarray(vals)))[::-1]
                err[name].append(float(np.max(np.abs(v - truth[:top_n]) / truth[:top_n])))
                model.zero_grad(set_to_none=True)
        for name in ("pyhessian", "drop-in"):
            rows.append([top_n, name, f"{_timing.median(secs[name]):.3f}",
                         f"{_timing.median(used[name]):.0f}",
                         f"{_timing.median(err[name]):.1e}", f"{max(err[name]):.1e}"])
        ratio = _timing.median(secs["drop-in"]) / _timing.median(secs["pyhessian"])
        rows.append([top_n, "**drop-in ÷ pyhessian (time)**", f"**{ratio:.2f}**", "", "", ""])
    return {"rows": rows, "p": H.shape[0], "truth": truth[:3]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="small ResNet, fewer repeats and seeds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (9; fast 5)")
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--sections", default="1,2,3")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (5 if args.fast else 9)
    args.min_time = 0.02 if args.fast else 0.1
    args.seeds = 5 if args.fast else 7
    args.eig_seeds = 4 if args.fast else 10
    args.hidden = 16 if args.fast else 32
    args.budgets = [10, 20, 50, 100] if args.fast else [10, 20, 30, 50, 100, 200, 400]
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    busy = _timing.busy_cores()
    started = time.perf_counter()
    cmd = " ".join(["python", "experiments/benchmarks/bench_peers.py"]
                   + (argv if argv is not None else sys.argv[1:]))
    lines = ["# hessrank vs PyHessian and curvlinops", "",
             f"Machine: {_timing.machine_line(torch.get_num_threads())}; other work kept "
             f"{busy:.1f} cores busy when this run started (/proc/stat), load average "
             f"{_timing.load_average()}.  ",
             f"Run: `{cmd}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
             f"UTC; pyhessian {_version('pyhessian')}, curvlinops-for-pytorch "
             f"{_version('curvlinops-for-pytorch')} (references, imported only by benchmarks).", ""]
    res, timings = [], []
    if "1" in sections:
        lines += ["## 1. Time per product ÷ PyHessian's (kept graph, k=1)", "",
                  "Unit: one PyHessian product on its kept double-backward graph, timed right "
                  "before each contender in every round; ratio per adjacent pair, median over "
                  f"{args.repeats} interleaved rounds, IQR of the per-round ratios; block rows "
                  f"per vector (÷ {K}). Eval mode, all parameters. hessrank's default route is "
                  "named in its rows (`op.route`). Every k=1 product agrees with PyHessian's "
                  "(1e-4 relative in float32, 1e-10 in float64).", ""]
        for key in args.models.split(","):
            for dtype in ((torch.float32,) if key == "resnet" else (torch.float32,
                                                                       torch.float64)):
                r = product_times(key, args, dtype)
                res.append(r)
                lines += [f"### {r['label']}: p = {r['p']:,}, batch {r['n']}; PyHessian "
                          f"product = {r['unit_ms']:.1f} ms", "",
                          _timing.markdown_table(["product", "÷ PyHessian kept graph "
                                                  "(per vector)", "IQR", "ms per vector"],
                                                 r["rows"]), ""]
                print("\n".join(lines[-4:]), flush=True)
        timings.append(f"§1 {time.perf_counter() - started:.0f} s")
    fr = None
    if "2" in sections:
        t0 = time.perf_counter()
        fr = frobenius_vs_budget(args)
        lines += ["## 2. ‖H‖_F²: relative error vs matvecs, hessrank deflated vs curvlinops "
                  "Hutchinson", "",
                  f"Digits MLP 64-{args.hidden}-10 (ReLU), float64, p = {fr['p']:,}, N = 1797 in "
                  "one batch, trained 300 SGD steps as in `bench_estimators.py` §2; dense truth "
                  f"‖H‖_F² = {fr['fro']:.6g}. Median over {args.seeds} seeds of |estimate − "
                  "truth| / truth. hessrank: `frobenius_sq(op, num_matvecs=B, seed=s)` (the "
                  "adaptive Lanczos/probe split). curvlinops: `hutchinson_squared_fro(H, "
                  "num_matvecs=B)` after `torch.manual_seed(s)`. Seconds: median wall time of "
                  "one estimate.", "",
                  _timing.markdown_table(["budget B", "hessrank deflated",
                                          "curvlinops Hutchinson", "curvlinops ÷ hessrank",
                                          "s hessrank", "s curvlinops"], fr["rows"]), ""]
        print("\n".join(lines[-3:]), flush=True)
        timings.append(f"§2 {time.perf_counter() - t0:.0f} s")
    eig = None
    if "3" in sections:
        t0 = time.perf_counter()
        eig = dropin_eigenvalues(args)
        lines += ["## 3. The PyHessian drop-in's eigenvalues against PyHessian's", "",
                  f"`hessian(model, cross_entropy, data=(x, y), cuda=False).eigenvalues(top_n=n)` "
                  f"with PyHessian's defaults (maxIter=100, tol=1e-3), from `hessrank.compat."
                  f"pyhessian` and from `pyhessian` 0.1, on the digits MLP 64-{args.hidden}-10 "
                  f"trained as in §2, float32 (PyHessian's dtype), p = {eig['p']:,}, all 1797 "
                  f"samples; dense float64 truth |λ| = "
                  f"{', '.join(f'{v:.6g}' for v in eig['truth'])}. Seconds: construction + "
                  f"eigenvalues, median over {args.eig_seeds} seeds (the two interleaved, order "
                  "alternating); products: Hessian-vector products used; error: max over the "
                  "top_n of |λ̂ − λ| / λ (median and worst seed). PyHessian: power iteration with "
                  "deflation, stops when an eigenvalue changes by < tol; the drop-in: Lanczos "
                  "stopped once the top_n Ritz pairs have residual ≤ tol·|λ_max|.", "",
                  _timing.markdown_table(["top_n", "", "seconds", "products", "median error",
                                          "worst error"], eig["rows"]), ""]
        print("\n".join(lines[-3:]), flush=True)
        timings.append(f"§3 {time.perf_counter() - t0:.0f} s")
    lines += ["## Targets", ""]
    goal = 1 / 1.05
    for r in res:
        meets = "" if r["key"] == "resnet" else (
            " — **met**" if max(r["k1"], r["kblock_vs_ph"]) <= goal else " — **missed**")
        lines.append(
            f"- {r['label']}: hessrank ÷ PyHessian's kept graph {r['k1']:.3f} (k=1), "
            f"{r['kblock_vs_ph']:.3f} (blocks of {K} against its loop of {K}) (target ≤ "
            f"{goal:.3f}){meets}; ÷ its per-batch path {r['k1'] / r['loader']:.2f}; ÷ "
            f"curvlinops {r['k1'] / r['cl1']:.2f} (k=1) / {r['kblock'] / r['clk']:.2f} "
            f"(block of {K}).")
    if fr is not None:
        e, budgets = fr["errs"], list(args.budgets)

        def first(errs, thr):
            return next((b for b, x in zip(budgets, errs) if x <= thr), None)

        lines.append(
            f"- ‖H‖_F² to 1%: hessrank at {first(e['hessrank'], 0.01)} matvecs, curvlinops at "
            f"{first(e['curvlinops'], 0.01) or f'> {budgets[-1]}'}; to 5%: "
            f"{first(e['hessrank'], 0.05)} vs "
            f"{first(e['curvlinops'], 0.05) or '> ' + str(budgets[-1])}.")
    if eig is not None:
        ratios = [r[2].strip("*") for r in eig["rows"] if "÷" in str(r[1])]
        lines.append(f"- Drop-in eigenvalues ÷ PyHessian's time: {ratios[0]} (top_n=1), "
                     f"{ratios[1]} (top_n=3), errors in §3.")
    lines += ["", f"Wall time: {', '.join(timings)}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(len(res) + 5):]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
