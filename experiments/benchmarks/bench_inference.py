"""Error rates of the inference methods behind the study verdicts (issue 20).

Simulated studies x_ij = θ + b_i + e_ij: R replicates i (b_i ~ N(0, ICC)), n units j in each
(e_ij ~ N(0, 1 − ICC)); total variance 1, ICC = the share between replicates. One arm, as a
paired difference (client − server) is. Grid: R ∈ {3, 5, 10, 20} × n ∈ {5, 20} ×
ICC ∈ {0, 0.2, 0.5, 0.9}. Each method of :mod:`hessrank.analysis.inference` gives its 95 %
interval and its two-sided test of θ = 0 at α = 0.05 on the same studies, simulated at θ = 0:
every method is location-equivariant (adding c to every value adds c to the estimate and
the interval), so the coverage of 0 at θ = 0 is the coverage at any θ, and the rejection rate
is the false-positive rate. Target (issue 20): coverage in [93 %, 97.5 %] and FPR ≤ 6 % in
every cell.

Studies per cell (simulated once per cell, every method on the first S of them): t 4000,
bootstrap-t 2000 (B = 2000), percentile 500 (B = 2000), mixedlm 200 (statsmodels MixedLM,
~0.1 s a fit: 6,400 fits). Then: the four verdicts of the default at θ ∈ {δ, 0, −δ} beside
the former rule (percentile p < α for θ = 0, then θ̂ beyond ±δ), and the planning formula
(:mod:`hessrank.analysis.planning`) against simulation.

    python experiments/benchmarks/bench_inference.py          # ~15 min on one core
    python experiments/benchmarks/bench_inference.py --fast   # smoke test, not the result

Writes ``experiments/benchmarks/results/inference.md`` (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import statsmodels
from scipy import stats

from hessrank.analysis import inference as inf
from hessrank.analysis import planning

REPLICATES = (3, 5, 10, 20)
UNITS = (5, 20)
ICCS = (0.0, 0.2, 0.5, 0.9)
STUDIES = {"t": 4000, "bootstrap-t": 2000, "percentile": 500, "mixedlm": 200}
FAST = {"t": 400, "bootstrap-t": 200, "percentile": 100, "mixedlm": 20}
RESAMPLES = 2000
ALPHA = 0.05
COVER = (0.93, 0.975)
MAX_FPR = 0.06
SEED = 20


def simulate(rng: np.random.Generator, studies: int, R: int, n: int, icc: float,
             theta: float = 0.0) -> np.ndarray:
    """(studies, R, n) values of the model in the module doc."""
    b = rng.normal(0.0, np.sqrt(icc), size=(studies, R, 1))
    e = rng.normal(0.0, np.sqrt(1 - icc), size=(studies, R, n))
    return theta + b + e


def one_arm(x: np.ndarray) -> list[tuple[np.ndarray, None]]:
    return [(row, None) for row in x]


def rates(method: str, x: np.ndarray, seed: int) -> dict[str, float]:
    """Coverage of 0, rejection rate of θ = 0 and failed fits over the studies in ``x``."""
    cover = reject = failed = 0
    for s, study in enumerate(x):
        r = inf.infer_one(one_arm(study), method, num_resamples=RESAMPLES, seed=seed + s)
        if not np.isfinite(r.estimate):
            failed += 1
            continue
        lo, hi = r.interval(1 - ALPHA)
        cover += lo <= 0.0 <= hi
        reject += r.p_two_sided(0.0) < ALPHA
    ok = len(x) - failed
    return {"coverage": cover / ok if ok else np.nan, "fpr": reject / ok if ok else np.nan,
            "failed": failed, "studies": len(x)}


def in_target(r: dict[str, float]) -> bool:
    return COVER[0] <= r["coverage"] <= COVER[1] and r["fpr"] <= MAX_FPR


def coverage_grid(studies: dict[str, int]) -> tuple[list[dict], dict[str, float]]:
    rows, seconds = [], dict.fromkeys(studies, 0.0)
    for R in REPLICATES:
        for n in UNITS:
            for icc in ICCS:
                rng = np.random.default_rng([SEED, R, n, int(icc * 100)])
                x = simulate(rng, max(studies.values()), R, n, icc)
                row = {"R": R, "n": n, "icc": icc}
                for method, S in studies.items():
                    t0 = time.perf_counter()
                    row[method] = rates(method, x[:S], seed=1000 * R + n)
                    seconds[method] += time.perf_counter() - t0
                rows.append(row)
                print(f"R={R:2d} n={n:2d} icc={icc:.1f}: " + ", ".join(
                    f"{m} {row[m]['coverage']:.3f}/{row[m]['fpr']:.3f}" for m in studies),
                    flush=True)
    return rows, seconds


def old_rule(r: inf.Inference, delta: float) -> str:
    """The verdict rule before issue 20: p(θ = 0) < α, then θ̂ beyond ±δ."""
    if not r.p_two_sided(0.0) < ALPHA:
        return "inconclusive"
    if r.estimate >= delta:
        return "supported"
    if r.estimate <= -delta:
        return "reversed"
    return "inconclusive"


def verdict_rates(studies: int, old_studies: int, delta: float = 0.25, n: int = 20,
                  icc: float = 0.5) -> list[dict]:
    """Shares of each verdict of one test (no multiplicity) at θ ∈ {δ, 0, −δ}."""
    out = []
    for R in REPLICATES:
        for theta in (delta, 0.0, -delta):
            rng = np.random.default_rng([SEED, 7, R, int(1000 * theta) + 1000])
            x = simulate(rng, studies, R, n, icc, theta)
            new = [inf.verdict(inf.replicate_t(one_arm(s)), delta, ALPHA) for s in x]
            old = [old_rule(inf.cluster_bootstrap(one_arm(s), num_resamples=RESAMPLES,
                                                  seed=i), delta)
                   for i, s in enumerate(x[:old_studies])]
            out.append({"R": R, "theta": theta,
                        "new": {v: new.count(v) / len(new) for v in inf.VERDICTS},
                        "old": {v: old.count(v) / len(old) for v in inf.VERDICTS}})
    return out


PLAN_CASES = (
    # (σ_b², σ_w², units per replicate, δ, tests in the family)
    (0.5, 0.5, 20, 0.5, 1),
    (0.5, 0.5, 20, 0.5, 12),
    (0.1, 0.9, 5, 0.25, 12),
    (0.9, 0.1, 10, 0.5, 4),
)


def planning_check(studies: int) -> list[dict]:
    """Replicates the formula asks for vs the simulated share of claims at that R and R − 1:
    supported at θ = 2δ and negligible at θ = 0, at Holm's first-step level."""
    out = []
    for k, (sb, sw, n, delta, K) in enumerate(PLAN_CASES):
        level = planning.claim_level(ALPHA, K)
        var = sb + sw / n
        need = int(planning.replicates_needed(var, delta, level))
        row = {"case": (sb, sw, n, delta, K), "needed": need}
        for R in (need - 1, need):
            rng = np.random.default_rng([SEED, 9, k, R])
            got = {}
            for label, theta, want in (("supported", 2 * delta, "supported"),
                                       ("negligible", 0.0, "negligible")):
                b = rng.normal(0, np.sqrt(sb), size=(studies, R, 1))
                x = theta + b + rng.normal(0, np.sqrt(sw), size=(studies, R, n))
                hits = 0
                for s in x:
                    c = inf.claim(inf.replicate_t(one_arm(s)), delta)
                    hits += c.claim == want and c.p_value < 2 * level
                got[label] = hits / studies
            got["formula_supported"] = planning.power_directional(var, R, delta, level)
            got["formula_negligible"] = planning.power_equivalence(var, R, delta, level)
            row[R] = got
        out.append(row)
        print(f"plan {row['case']}: needed {need}", flush=True)
    return out


def pct(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{100 * x:.1f}"


def render(grid, seconds, verdicts, plans, studies, fast: bool, wall: float) -> str:
    methods = list(studies)
    worst = {}
    for m in methods:
        cov = [r[m]["coverage"] for r in grid]
        fpr = [r[m]["fpr"] for r in grid]
        worst[m] = (min(cov), max(cov), max(fpr), sum(in_target(r[m]) for r in grid))
    lines = [
        "# Inference methods: coverage and false positives (bench_inference.py"
        + (" --fast, a smoke test: not the result" if fast else "") + ")",
        "",
        f"{datetime.date.today()}; python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, statsmodels {statsmodels.__version__}; seed {SEED}; "
        f"{wall / 60:.0f} min on one core of a shared 2-core machine. Generated by "
        "`python experiments/benchmarks/bench_inference.py`; nothing here is typed by hand.",
        "",
        "Model: x_ij = θ + b_i + e_ij, R replicates × n units, b_i ~ N(0, ICC), "
        "e_ij ~ N(0, 1 − ICC), one arm (a paired difference). Every method is "
        "location-equivariant, so the studies are simulated at θ = 0: *coverage* is the "
        "share of 95 % intervals holding 0 (= coverage at any θ), *FPR* the share of "
        "two-sided tests of θ = 0 rejecting at α = 0.05. Target (issue 20): coverage in "
        f"[{100 * COVER[0]:.0f} %, {100 * COVER[1]:.1f} %] and FPR ≤ {100 * MAX_FPR:.0f} % in "
        "every cell.",
        "",
        "| method | studies per cell | Monte Carlo SD at 95 % | worst coverage (low / high) | "
        "worst FPR | cells in target | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        lo, hi, fpr, ok = worst[m]
        mc = 100 * np.sqrt(0.05 * 0.95 / studies[m])
        lines.append(f"| `{m}` | {studies[m]} | {mc:.1f} % | {pct(lo)} % / {pct(hi)} % | "
                     f"{pct(fpr)} % | {ok} of {len(grid)} | {seconds[m]:.0f} |")
    lines += [
        "",
        "Methods (`hessrank.analysis.inference`): `t` = t-interval on the R replicate means, "
        "df = R − 1 (`replicate_t`); `bootstrap-t` = studentized cluster bootstrap over "
        f"replicates, B = {RESAMPLES} (`bootstrap_t`); `percentile` = the two-stage percentile "
        f"cluster bootstrap that made the verdicts before issue 20, B = {RESAMPLES} "
        "(`cluster_bootstrap`); `mixedlm` = statsmodels MixedLM, random intercept per "
        "replicate, REML, Wald interval with a normal reference (`mixed_model`; fewer studies "
        "per cell because a fit takes ~0.1 s).",
        "",
        "## Every cell: coverage % / FPR % (**bold**: outside the target)",
        "",
        "| R | units | ICC | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for r in grid:
        cells = []
        for m in methods:
            c = f"{pct(r[m]['coverage'])} / {pct(r[m]['fpr'])}"
            if r[m]["failed"]:
                c += f" ({r[m]['failed']} fits failed)"
            cells.append(c if in_target(r[m]) else f"**{c}**")
        lines.append(f"| {r['R']} | {r['n']} | {r['icc']:g} | " + " | ".join(cells) + " |")
    fails = [r for r in grid if not in_target(r["t"])]
    others = []
    for m in methods[1:]:
        miss = [r for r in grid if not in_target(r[m])]
        lo, hi, fpr, _ = worst[m]
        others.append(f"`{m}` misses it in {len(miss)} of {len(grid)} cells (coverage "
                      f"{pct(lo)}–{pct(hi)} %, FPR up to {pct(fpr)} %)")
    t3 = stats.t.ppf(1 - ALPHA / 2, 2) / stats.norm.ppf(1 - ALPHA / 2)
    lines += [
        "",
        "## The default",
        "",
        (f"`t` is inside the target in all {len(grid)} cells" if not fails else
         f"`t` misses the target in {len(fails)} cells ("
         + ", ".join(f"R={r['R']} n={r['n']} ICC={r['icc']:g}" for r in fails) + ")")
        + f" at {studies['t']} studies per cell, with exact p-values and no resampling "
        "floor; it is the default (`[inference] method = \"t\"`). " + "; ".join(others)
        + ". With R = 3 the t reference has 2 degrees of freedom: its 95 % interval is "
        f"{t3:.1f} times as wide as a normal one with the same standard error, so a study "
        "of 3 replicates mostly says *inconclusive* (the verdict table below, and "
        "`replicates_needed` in `hypotheses.csv`). The other methods stay available "
        "(`method = \"bootstrap-t\"`, `\"percentile\"`, `\"mixedlm\"`).",
        "",
        "## The four verdicts of one test (n = 20, ICC 0.5, δ = 0.25, α = 0.05)",
        "",
        "Share of studies with each verdict. New: the default (`t`; supported iff the "
        "one-sided test of θ ≤ δ rejects at α/2, reversed likewise, negligible iff TOST "
        "rejects |θ| ≥ δ). Old: the rule before issue 20 (percentile bootstrap p(θ = 0) < α, "
        f"then θ̂ beyond ±δ) on the first {len(verdicts) and verdicts[0]['_old_n']} studies. "
        "At θ = ±δ no claim is true: every verdict but inconclusive is an error.",
        "",
        "| R | θ | new: supported | reversed | negligible | inconclusive | old: supported | "
        "reversed | inconclusive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        n_, o = v["new"], v["old"]
        lines.append(
            f"| {v['R']} | {v['theta']:+g} | {pct(n_['supported'])} | {pct(n_['reversed'])} | "
            f"{pct(n_['negligible'])} | {pct(n_['inconclusive'])} | {pct(o['supported'])} | "
            f"{pct(o['reversed'])} | {pct(o['inconclusive'])} |")
    lines += [
        "",
        "## Planning formula against simulation",
        "",
        "`hessrank.analysis.planning.replicates_needed`: the smallest R at which a claim "
        "whose true effect lies δ beyond its threshold (supported at θ = 2δ; negligible at "
        "θ = 0) is made with ≥ 80 % probability at Holm's first-step level α/K. Simulated "
        f"share of such claims ({verdicts and verdicts[0]['_plan_n']} studies each) at the R "
        "the formula asks for and one fewer, beside the formula's power.",
        "",
        "| σ_b² | σ_w² | units | δ | K | R needed | R | supported: simulated / formula | "
        "negligible: simulated / formula |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        sb, sw, n, delta, K = p["case"]
        for R in (p["needed"] - 1, p["needed"]):
            g = p[R]
            lines.append(f"| {sb:g} | {sw:g} | {n} | {delta:g} | {K} | {p['needed']} | {R} | "
                         f"{pct(g['supported'])} / {pct(g['formula_supported'])} | "
                         f"{pct(g['negligible'])} / {pct(g['formula_negligible'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="few studies: a smoke test")
    ap.add_argument("--out", default=None, help="results file (default: results/inference.md)")
    args = ap.parse_args(argv)
    studies = FAST if args.fast else STUDIES
    t0 = time.perf_counter()
    grid, seconds = coverage_grid(studies)
    v_n, old_n, plan_n = (400, 100, 400) if args.fast else (4000, 500, 4000)
    verdicts = verdict_rates(v_n, old_n)
    plans = planning_check(plan_n)
    for v in verdicts:
        v["_old_n"], v["_plan_n"] = old_n, plan_n
    text = render(grid, seconds, verdicts, plans, studies, args.fast, time.perf_counter() - t0)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "inference.md"
    out.write_text(text)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
