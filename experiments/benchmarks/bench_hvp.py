"""HVP cost and memory of hessrank's HessianOperator: the product strategies, before and after.

One run, same machine and threads, writes ``results/hvp.md``:

1. Cost — seconds per Hessian-vector product over seconds per gradient (``torch.autograd.grad``
   of the batch-mean cross-entropy, timed right before each contender: paired ratios), on the
   digits MLP 64-256-256-10 (batch 512), the digits CNN conv16-conv32-fc (batch 256) and a
   CIFAR-shaped ResNet-18 (``build_model("resnet18", (3, 32, 32), 10, width=16)``, random
   inputs, batch 128), float32, eval mode. Rows: the default operator ("auto") for one vector
   and for a block of k = 8, products from scratch (no cache) by reverse-over-reverse and
   forward-over-reverse, the other block strategy, two other ways to keep a linearization
   (``torch.func.linearize``; a kept double-backward autograd graph — measured here only, since
   hessrank's products go through torch.func) and, when the git history has it, the operator
   as it was before the curvature-family rework (``--baseline``, default commit 7383cb0).
2. Calibration — the "auto" choice made 5 times from scratch by the current rule and by the
   previous one (3 repeats, fastest median wins).
3. Peak memory of a block product (k = 8) against a gradient on the ResNet-18, each measured in
   a fresh subprocess: the peak of tensor memory allocated during the call above its start level,
   from torch.profiler's memory events (exact tensor bytes, whatever the C allocator keeps), and
   the memory a cached linearization keeps between products.

    python experiments/benchmarks/bench_hvp.py --threads 1          # full, ~15 minutes
    python experiments/benchmarks/bench_hvp.py --threads 1 --fast   # ~3 minutes, small ResNet
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from hessrank.curvature import HessianOperator
from hessrank.models import build_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402

RESULTS = HERE / "results" / "hvp.md"
CE = nn.functional.cross_entropy
K = 8


# ---- settings -----------------------------------------------------------------------------------
def digits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digits, pixels in [0, 1] (as in bench_estimators.py)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 16.0, dtype=dtype), torch.as_tensor(d.target)


def setting(name: str, fast: bool) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """(label, model in eval mode, inputs, targets), float32, seeded."""
    torch.manual_seed(0)
    if name == "mlp":
        x, y = digits(torch.float32)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
        return "MLP 64-256-256-10", model.eval(), x[:512], y[:512]
    if name == "cnn":
        x, y = digits(torch.float32)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
        )
        return "CNN conv16-conv32-fc", model.eval(), x[:256], y[:256]
    if name == "client":  # a small client subset: products are overhead-bound
        x, y = digits(torch.float32)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        return "client MLP 64-64-64-10 (143 samples)", model.eval(), x[:143], y[:143]
    width, n = (8, 32) if fast else (16, 128)
    model = build_model("resnet18", (3, 32, 32), 10, width=width)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return f"ResNet-18 width {width} (CIFAR-shaped)", model.eval(), x, y


def load_baseline(commit: str):
    """The operator module as of ``commit`` (git show), or None when git cannot give it."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:hessrank/curvature/operator.py"],
                             cwd=HERE, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "hessrank_operator_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("hessrank_operator_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---- 1. cost ------------------------------------------------------------------------------------
def cost(key: str, args, baseline) -> dict:
    label, model, x, y = setting(key, args.fast)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    p = sum(t.numel() for t in params)
    gen = torch.Generator().manual_seed(0)
    v1, vk = torch.randn(p, 1, generator=gen), torch.randn(p, K, generator=gen)

    def op(**kw) -> HessianOperator:
        return HessianOperator(model, CE, (x, y), **kw)

    def autograd_grad():
        return torch.autograd.grad(CE(model(x), y), params)

    auto1, autok = op(), op()
    autok.matmat(vk)  # calibrates on a block of k, as an estimator's first block would
    auto1.matmat(vk)
    s = autok.route
    tag = f"{s['hvp']}{', cached' if s['cache'] else ''}, {s['block']}"
    other = "vmap" if s["block"] == "loop" else "loop"
    rr, fr = op(hvp="rev-rev", cache=False, block="loop"), op(hvp="fwd-rev", cache=False,
                                                                block="loop")
    cached_other = op(hvp="rev-rev", cache=True, block=other)
    uncached_k = op(hvp="rev-rev", cache=False, block=s["block"])
    contenders: dict[str, tuple] = {
        "gradient (torch.autograd)": (autograd_grad, 1),
        "hessrank op.gradient": (auto1.gradient, 1),
        f"hessrank default (auto → {tag}), k=1": (lambda: auto1.matmat(v1), 1),
        f"hessrank default (auto → {tag}), k={K}": (lambda: autok.matmat(vk), K),
        "hessrank rev-rev from scratch (cache=False), k=1": (lambda: rr.matmat(v1), 1),
        "hessrank fwd-rev from scratch (cache=False), k=1": (lambda: fr.matmat(v1), 1),
        f"hessrank rev-rev from scratch (cache=False), k={K} {s['block']}":
            (lambda: uncached_k.matmat(vk), K),
        f"hessrank cached rev-rev, k={K} {other}": (lambda: cached_other.matmat(vk), K),
    }
    # other ways to keep a linearization (the tangent pass only), k = 1
    pdict = {n: t.detach() for n, t in model.named_parameters()}
    fixed = dict(model.named_buffers())

    def loss_of(pp):
        return CE(torch.func.functional_call(model, (pp, fixed), (x,)), y)

    tang = dict(zip(names, (t.reshape(q.shape) for t, q in
                            zip(torch.split(v1[:, 0], [q.numel() for q in params]), params))))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, lin = torch.func.linearize(torch.func.grad(loss_of), pdict)
        lin_build = time.perf_counter() - t0
        contenders["torch.func.linearize (jvp traced once), k=1"] = (lambda: lin(tang), 1)
    except Exception as err:  # noqa: BLE001 - a comparison row, not a requirement
        lin_build = f"failed: {type(err).__name__}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gg = torch.autograd.grad(CE(model(x), y), params, **{"create_graph": True})
    vl = [tang[n] for n in names]
    contenders["kept autograd graph (double backward; not torch.func), k=1"] = (
        lambda: torch.autograd.grad(gg, params, vl, retain_graph=True), 1)
    if baseline is not None:
        bop1 = baseline.HessianOperator(model, CE, (x, y))
        bopk = baseline.HessianOperator(model, CE, (x, y))
        bopk.matmat(vk)
        bop1.matmat(vk)
        bs = bopk.settings
        btag = f"{bs['hvp']}{', cached' if bs['cache'] else ''}, {bs['block']}"
        contenders[f"before ({args.baseline}): op.gradient"] = (bop1.gradient, 1)
        contenders[f"before ({args.baseline}): default ({btag}), k=1"] = (
            lambda: bop1.matmat(v1), 1)
        contenders[f"before ({args.baseline}): default ({btag}), k={K}"] = (
            lambda: bopk.matmat(vk), K)

    # correctness of every hessrank k=1 row against the kept autograd graph
    ref = flat(torch.autograd.grad(gg, params, vl, retain_graph=True))
    for cname, (fn, kk) in contenders.items():
        if kk == 1 and ("k=1" in cname):
            out = fn()
            out = out[:, 0] if isinstance(out, torch.Tensor) else flat(
                out[n] for n in names) if isinstance(out, dict) else flat(out)
            err = float((out - ref).norm() / ref.norm())
            if err > 1e-4:
                raise AssertionError(f"{label}: {cname} differs from the reference by {err:.1e}")
    out_k = autok.matmat(vk)
    ref_k = torch.stack([flat(torch.autograd.grad(gg, params, [t.reshape(q.shape) for t, q in zip(
        torch.split(vk[:, i], [q.numel() for q in params]), params)], retain_graph=True))
        for i in range(K)], dim=1)
    err_k = float((out_k - ref_k).norm() / ref_k.norm())
    assert err_k <= 1e-4, f"{label}: block product differs by {err_k:.1e}"

    unit = "gradient (torch.autograd)"
    t = _timing.interleaved({n: f for n, (f, _) in contenders.items()}, unit=unit,
                            repeats=args.repeats, warmup=1, min_time=args.min_time)
    rows, per = [], {}
    for cname, (_, kk) in contenders.items():
        lo, hi = t.spread(cname)
        per[cname] = t.ratio(cname) / kk
        rows.append([cname, f"{per[cname]:.2f}", f"{lo / kk:.2f}–{hi / kk:.2f}",
                     f"{1e3 * t.seconds(cname) / kk:.2f}"])
    d1 = per[f"hessrank default (auto → {tag}), k=1"]
    dk = per[f"hessrank default (auto → {tag}), k={K}"]
    scratch = min(per["hessrank rev-rev from scratch (cache=False), k=1"],
                  per["hessrank fwd-rev from scratch (cache=False), k=1"])
    best_cached = min(d1, dk, per[f"hessrank cached rev-rev, k={K} {other}"]) \
        if s["cache"] else float("nan")
    return {"label": label, "p": p, "n": len(y), "grad_ms": 1e3 * t.seconds(unit),
            "rows": rows, "settings": tag, "k1": d1, "kblock": dk, "scratch": scratch,
            "block_vs_scratch": dk / scratch, "block_vs_default1": dk / d1,
            "best_cached": best_cached, "cached": s["cache"],
            "lin_build": lin_build, "graph_mb": autok.estimated_cache_mb()}


# ---- 2. calibration stability -------------------------------------------------------------------
def calibration_runs(key: str, args, baseline) -> list[object]:
    label, model, x, y = setting(key, args.fast)
    p = sum(t.numel() for t in model.parameters())
    V = torch.randn(p, K, generator=torch.Generator().manual_seed(0))
    out = [label]
    for mod in (None, baseline):
        if mod is None:  # the current operator: a rule, no timing
            picks, secs = [], []
            for _ in range(5):
                o = HessianOperator(model, CE, (x, y))
                t0 = time.perf_counter()
                o.matmat(V)
                secs.append(time.perf_counter() - t0)
                st = o.route
                picks.append(f"{st['hvp']}{'+cache' if st['cache'] else ''}/{st['block']}")
        elif not hasattr(mod, "_CALIBRATION"):
            out += ["—", "—"]
            continue
        else:
            picks, secs = [], []
            for _ in range(5):
                mod._CALIBRATION.clear()
                o = mod.HessianOperator(model, CE, (x, y))
                t0 = time.perf_counter()
                o.matmat(V)
                secs.append(time.perf_counter() - t0)
                st = o.settings
                picks.append(f"{st['hvp']}{'+cache' if st['cache'] else ''}/{st['block']}")
        counts = {c: picks.count(c) for c in dict.fromkeys(picks)}
        out += [", ".join(f"{c} ×{n}" for c, n in counts.items()),
                f"{_timing.median(secs):.2f}"]
    return out


# ---- 4. same route, before and after -------------------------------------------------------
ROUTES = {"rev-rev, cached, loop": {"hvp": "rev-rev", "cache": True, "block": "loop"},
          "rev-rev, cached, vmap": {"hvp": "rev-rev", "cache": True, "block": "vmap"}}


def paired_routes(key: str, args, baseline) -> list[list[str]]:
    """ms per vector of the baseline and the current operator forced onto the same route, and
    of each one's default, interleaved; the fastest of ``args.repeats`` rounds (other work on
    the machine only slows calls down) and the median. Rows: route, k, before, after, ratio."""
    label, model, x, y = setting(key, args.fast)
    p = sum(t.numel() for t in model.parameters())
    gen = torch.Generator().manual_seed(0)
    vs = {1: torch.randn(p, 1, generator=gen), K: torch.randn(p, K, generator=gen)}
    ops = {}
    for name, kw in [("default", {}), *ROUTES.items()]:
        for side, mod in (("before", baseline), ("after", None)):
            cls = mod.HessianOperator if mod is not None else HessianOperator
            op = cls(model, CE, (x, y), **kw)
            op.matmat(vs[K])
            ops[(name, side)] = op
    times: dict[tuple, list[float]] = {}
    for r in range(args.repeats):
        items = list(ops.items())
        for (name, side), op in (items if r % 2 == 0 else items[::-1]):
            for k, V in vs.items():
                t0 = time.perf_counter()
                op.matmat(V)
                times.setdefault((name, side, k), []).append((time.perf_counter() - t0) / k)
    rows = []
    for name in ["default", *ROUTES]:
        for k in vs:
            b, a = times[(name, "before", k)], times[(name, "after", k)]
            tag = name
            if name == "default":
                sb, sa = ops[(name, "before")].settings, ops[(name, "after")].settings
                tag = (f"default (before {sb['hvp']}/{sb['block']}, "
                       f"after {sa['hvp']}/{sa['block']})")
            med = _timing.median(a) / _timing.median(b)
            rows.append([label, tag, str(k), f"{1e3 * min(b):.2f}", f"{1e3 * min(a):.2f}",
                         f"**{min(a) / min(b):.2f}**", f"{med:.2f}"])
    return rows


# ---- 3. memory ----------------------------------------------------------------------------------
def profiled(call) -> tuple[float, float, float]:
    """(peak, net, seconds) of ``call()``: MiB of tensor memory allocated above the level at
    its start, at the peak and at the end (torch.profiler memory events: exact tensor bytes,
    independent of what the C allocator keeps or returns)."""
    from torch.profiler import profile

    t0 = time.perf_counter()
    with profile(profile_memory=True) as prof:
        out = call()
    secs = time.perf_counter() - t0
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    cur = peak = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        peak = max(peak, cur)
    del out
    return peak / 2**20, cur / 2**20, secs


def memory_probe(variant: str, fast: bool, threads: int) -> dict:
    """Run in a fresh process: peak tensor memory of one call, and what a first call keeps."""
    torch.set_num_threads(threads)
    _, model, x, y = setting("resnet", fast)
    params = [q for q in model.parameters()]
    p = sum(t.numel() for t in params)
    V = torch.randn(p, K, generator=torch.Generator().manual_seed(0))
    kw = {"default-first": {}, "default": {},
          "rev-rev-loop": {"hvp": "rev-rev", "cache": False, "block": "loop"},
          "fwd-rev-loop": {"hvp": "fwd-rev", "cache": False, "block": "loop"},
          "fwd-rev-vmap": {"hvp": "fwd-rev", "cache": False, "block": "vmap"},
          "cached-vmap": {"hvp": "rev-rev", "cache": True, "block": "vmap"},
          "default-half": {"batch_size": len(y) // 2},
          "rev-rev-loop-half": {"hvp": "rev-rev", "cache": False, "block": "loop",
                                "batch_size": len(y) // 2},
          "micro-half": {"micro_batch_size": len(y) // 2},
          "micro-quarter": {"micro_batch_size": len(y) // 4},
          }.get(variant)
    if variant == "streamed":  # the auto rule when the linearizations exceed the budget
        est = HessianOperator(model, CE, (x, y)).estimated_cache_mb()
        kw = {"cache_budget_mb": 0.9 * est}
    torch.autograd.grad(CE(model(x), y), params)  # warm-up: lazy initialisation
    resident = 0.0
    if variant == "gradient":
        def call():
            return torch.autograd.grad(CE(model(x), y), params)
    else:
        op = HessianOperator(model, CE, (x, y), **kw)
        if variant != "default-first":
            # a first call (calibration, the cached linearization if any): what it leaves
            # allocated is the resident cache
            _, resident, _ = profiled(lambda: op.matmat(V))
            resident -= V.numel() * V.element_size() / 2**20  # its output, counted as kept

        def call():
            return op.matmat(V)
    peak, _, secs = profiled(call)
    return {"peak_mb": peak, "resident_mb": resident, "seconds": secs,
            "settings": "" if variant == "gradient" else str(op.route)}


MEMORY_VARIANTS = ("gradient", "default-first", "default", "rev-rev-loop", "fwd-rev-loop",
                   "fwd-rev-vmap", "cached-vmap", "default-half", "rev-rev-loop-half")
STREAMING_VARIANTS = ("gradient", "default", "rev-rev-loop", "streamed", "micro-half",
                      "micro-quarter")
"""``--memory-only`` rows: see :func:`memory_only`."""


def memory(args, variants=MEMORY_VARIANTS) -> list[dict]:
    out = []
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-probe", v, "--threads", str(args.threads)]
        if args.fast:
            cmd.append("--fast")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            out.append({"variant": v, "error": r.stderr.strip().splitlines()[-1:]})
            continue
        out.append({"variant": v, **json.loads(r.stdout.strip().splitlines()[-1])})
    return out


def memory_only(args) -> None:
    """Peak memory of uncached products streamed over micro-batches vs a gradient (issue 14's
    target: ≤ 3× a gradient's, ResNet-18, batch 128); writes results/memory.md."""
    started = time.perf_counter()
    mem = memory(args, STREAMING_VARIANTS)
    g = next(m for m in mem if m["variant"] == "gradient")
    rows = []
    for m in mem:
        if "error" in m:
            rows.append([m["variant"], "error", " ".join(m["error"]), "", "", "", ""])
            continue
        total = m["peak_mb"] + m["resident_mb"]
        rows.append([m["variant"], m["settings"] or "—", f"{m['peak_mb']:.0f}",
                     f"{m['resident_mb']:.0f}", f"{total:.0f}", f"{total / g['peak_mb']:.2f}",
                     f"{m['seconds']:.2f}"])
    cmd = " ".join(["python", "experiments/benchmarks/bench_hvp.py", "--memory-only"]
                   + (["--fast"] if args.fast else []) + ["--threads", str(args.threads)])
    text = "\n".join([
        "# Memory of a streamed product vs a gradient (ResNet-18, batch 128)", "",
        f"Machine: {_timing.machine_line(args.threads)}. Run: `{cmd}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({time.perf_counter() - started:.0f} s; memory does not depend on the load, "
        "seconds do).", "",
        f"A block of k = {K} Hessian-vector products on the CIFAR-shaped ResNet-18 of "
        "`hessrank.models` (float32, eval mode, one batch of inputs), each row a fresh "
        "process. *peak*: most tensor memory (torch.profiler memory events) allocated during "
        "the measured call above its start; *resident*: what a first call leaves allocated "
        "(kept linearizations); ratio = (peak + resident) / the gradient's peak. "
        "`rev-rev-loop`: nothing kept, whole batch; `streamed`: the default operator with "
        "`cache_budget_mb` below its linearizations' estimate (the rule then streams over "
        "micro-batches of half the batch); `micro-half` / `micro-quarter`: "
        "`micro_batch_size=n/2`, `n/4`.", "",
        _timing.markdown_table(["variant", "route", "peak MiB", "resident MiB", "total MiB",
                                "÷ gradient", "call s"], rows), ""])
    out = args.out if args.out != RESULTS else RESULTS.with_name("memory.md")
    out.write_text(text)
    print(text)


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true",
                    help="ResNet-18 of width 8 on 32 inputs, fewer repeats (a smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (7; fast 5)")
    ap.add_argument("--models", default="mlp,cnn,resnet",
                    help="comma list of mlp, cnn, resnet, client (MLP 64-64-64-10 on 143 "
                    "samples, as a client of a 10-way digits split)")
    ap.add_argument("--baseline", default="7383cb0",
                    help="git commit of the 'before' operator ('' to skip)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the streaming memory rows (results/memory.md)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paired-routes", action="store_true",
                    help="only: the baseline and the current operator on the same routes")
    args = ap.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.fast, args.threads)))
        return
    if args.memory_only:
        memory_only(args)
        return
    if args.paired_routes:
        torch.set_num_threads(args.threads)
        args.repeats = args.repeats or 15
        baseline = load_baseline(args.baseline)
        rows = [r for key in args.models.split(",") for r in paired_routes(key, args, baseline)]
        table = _timing.markdown_table(
            ["model", "route", "k", f"before ({args.baseline}) ms/vector",
             "after ms/vector", "after / before (fastest round)", "after / before (medians)"],
            rows)
        text = ("# Per-product cost before and after, same route\n\n"
                f"Machine: {_timing.machine_line(torch.get_num_threads())}; other work kept "
                f"{_timing.busy_cores():.1f} cores busy at the start. "
                f"{args.repeats} interleaved rounds. Run: `python experiments/benchmarks/"
                f"bench_hvp.py --paired-routes --models {args.models}"
                f"{' --fast' if args.fast else ''}`.\n\n" + table + "\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        return
    args.repeats = args.repeats or (5 if args.fast else 7)
    args.min_time = 0.02 if args.fast else 0.1
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None
    busy = _timing.busy_cores()
    started = time.perf_counter()
    cmd = " ".join(["python", "experiments/benchmarks/bench_hvp.py"]
                   + (argv if argv is not None else sys.argv[1:]))
    lines = ["# HVP cost and memory: hessrank's product strategies", "",
             f"Machine: {_timing.machine_line(torch.get_num_threads())}; other work kept "
             f"{busy:.1f} cores busy when this run started (/proc/stat).  ",
             f"Run: `{cmd}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
             "UTC." + ("" if baseline else " (no baseline: git history not available)"), ""]
    lines += ["## 1. Cost per product (× one gradient)", "",
              "Unit: `torch.autograd.grad` of the batch-mean cross-entropy (forward + backward), "
              "timed right before each contender in every round; ratio per adjacent pair, median "
              f"over {args.repeats} interleaved rounds, IQR of the per-round ratios. Block rows "
              f"are per vector (block time ÷ {K}). float32, eval mode, all parameters. Every k=1 "
              "row and the default block were checked against the kept-graph product "
              "(relative difference ≤ 1e-4). *from scratch*: no cached linearization, every "
              "product redoes the forward and backward pass.", ""]
    results = {}
    for key in args.models.split(","):
        r = cost(key, args, baseline)
        results[key] = r
        lines += [f"### {r['label']}: p = {r['p']:,}, batch {r['n']}; gradient = "
                  f"{r['grad_ms']:.1f} ms", "",
                  _timing.markdown_table(["product", "× gradient (per vector)", "IQR",
                                          "ms per vector"], r["rows"]), "",
                  "`torch.func.linearize` build: "
                  + (f"{r['lin_build']:.2f} s" if isinstance(r["lin_build"], float)
                     else r["lin_build"])
                  + f"; estimated graph memory of the cached linearization "
                  f"{r['graph_mb']:.0f} MB.", ""]
        print("\n".join(lines[-6:]), flush=True)
    t1 = time.perf_counter() - started

    lines += ["## 2. Calibration: the auto choice, 5 fresh runs", "",
              f"Each run clears the remembered choice, builds a default operator and applies it "
              f"to a block of {K}; seconds = that first call (calibration included). Current "
              "rule: the deterministic route of `HessianOperator` (no timing; `op.route`). "
              "Previous: the baseline commit's timed calibration.", ""]
    cal_rows = [calibration_runs(k, args, baseline) for k in args.models.split(",")
                if k != "resnet"]
    lines += [_timing.markdown_table(["model", "current: choices", "current: s",
                                      "previous: choices", "previous: s"], cal_rows), ""]
    print("\n".join(lines[-3:]), flush=True)
    t2 = time.perf_counter() - started - t1

    mem = [] if args.no_memory or "resnet" not in args.models else memory(args)
    if mem:
        g = next((m for m in mem if m["variant"] == "gradient" and "peak_mb" in m), None)
        mrows = []
        for m in mem:
            if "error" in m:
                mrows.append([m["variant"], "error", " ".join(m["error"]), "", "", ""])
                continue
            total = m["peak_mb"] + m["resident_mb"]
            mrows.append([m["variant"], f"{m['peak_mb']:.0f}", f"{m['resident_mb']:.0f}",
                          f"{total:.0f}", f"{total / g['peak_mb']:.2f}" if g else "—",
                          f"{m['seconds']:.2f}"])
        lines += [f"## 3. Peak memory of a block product (k = {K}) vs a gradient, "
                  f"{results.get('resnet', {}).get('label', 'ResNet-18')}", "",
                  "MiB of tensor memory (torch.profiler memory events), each row a fresh "
                  "process. *peak*: most tensor memory allocated during the call above the level "
                  "at its start (model, data, operator and V already allocated). Every row but "
                  "`default-first` measures a second call: the first "
                  "(calibration, one-time kernel set-up, building the cached linearization) "
                  "runs before, and what it leaves resident is the *resident cache*. "
                  "*total* = peak + resident cache; ratio = total / the gradient's peak. "
                  "`default-first` is the default operator's first block call, which builds "
                  "the cache inside the measured call. `-half` rows: the same operator with "
                  "`batch_size=n/2` (products over two half batches: the same Hessian).", "",
                  _timing.markdown_table(["variant", "peak MiB", "resident cache MiB",
                                          "total MiB", "÷ gradient", "call s"], mrows), ""]
        print("\n".join(lines[-3:]), flush=True)
    t3 = time.perf_counter() - started - t1 - t2

    lines += ["## Targets", ""]
    for r in results.values():
        lines.append(
            f"- {r['label']} (auto → {r['settings']}): single vector "
            f"{r['k1']:.2f}× a gradient (target ≤ 2.0: {'met' if r['k1'] <= 2.0 else 'missed'});"
            f" block of {K} per vector {r['kblock']:.2f}×, = {r['block_vs_scratch']:.2f} of "
            f"{K} separate products from scratch and {r['block_vs_default1']:.2f} of {K} "
            f"separate default (k=1) products (target ≤ 0.6); cached per product "
            f"{r['best_cached']:.2f}× at best (target ≤ 1.2: "
            f"{'met' if r['best_cached'] <= 1.2 else 'missed'}).")
    if mem and g:
        for m in mem:
            if m["variant"] in ("default-first", "default", "rev-rev-loop",
                                "fwd-rev-loop") and "peak_mb" in m:
                tot = (m["peak_mb"] + m["resident_mb"]) / g["peak_mb"]
                lines.append(f"- memory, {m['variant']}: {tot:.2f}× a gradient's peak "
                             f"(target ≤ 3: {'met' if tot <= 3 else 'missed'}).")
    lines += ["", f"Wall time: §1 {t1:.0f} s, §2 {t2:.0f} s, §3 {t3:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(len(results) + 6):]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
