"""The README's commands, run verbatim: how long each takes here and what it gives.

Reads the ``hessrank train``, ``hessrank analyze`` and ``hessrank plot`` lines of the first
bash block under README.md's "Command line" heading, the walk-through whose times the README
states (later blocks list more commands and flags, untimed; continuations joined,
``VAR=value`` prefixes kept as environment), and runs them in that order in a scratch
directory, each in a fresh process with this interpreter (``python -m hessrank.cli`` for
``hessrank``), so relative paths such as ``runs/x`` land in the scratch directory. Then
``python -m hessrank.demo --fast`` (and the full demo with
``--demo``). Reported per command: wall clock from process start to exit, exit status, and
what it produced (final test accuracy of the run; rows of the analysis table; figures), with
the machine line and the cores other work kept busy before and after.

    python experiments/benchmarks/bench_readme.py            # writes results/readme.md
    python experiments/benchmarks/bench_readme.py --demo     # also times the full make demo
    python experiments/benchmarks/bench_readme.py --workdir /tmp/r   # keep runs and N.log
    python experiments/benchmarks/bench_readme.py --fast     # each command's --help: seconds
    python experiments/benchmarks/bench_readme.py --render   # only re-render the README block

A full run also renders the README's timings (the walk-through paragraph between
``<!-- readme-timings:start -->`` and ``<!-- readme-timings:end -->``, the demo sentence
between ``<!-- readme-demo:start -->`` and ``<!-- readme-demo:end -->``) from the results it
wrote; tests/test_readme.py
fails when that paragraph is stale.

``hessrank figures`` is not run (its own timing is in the figures' JSON files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import busy_cores, machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = Path(__file__).parent / "results" / "readme.md"
RUN_ORDER = ("train", "analyze", "plot")
START, END = "<!-- readme-timings:start -->", "<!-- readme-timings:end -->"
DEMO_MARKS = ("<!-- readme-demo:start -->", "<!-- readme-demo:end -->")


def timed_rows(results: str) -> tuple[str, dict[str, tuple[float, str]]]:
    """(the machine line, {"train" | "analyze" | "plot" | "demo": (seconds, result)}) of a
    results/readme.md text."""
    lines = results.splitlines()
    machine = next(ln for ln in lines if " — " in ln and "cores busy" in ln)
    rows = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        words = cells[0].strip("`").split()
        key = next((w for w in words if w in RUN_ORDER), None)
        if "hessrank.demo" in words:
            key = "demo_fast" if "--fast" in words else "demo"
        if key is not None:
            rows[key] = (float(cells[1]), cells[3])
    return machine.split(" — ", 1)[1], rows


def timing_paragraph(results: str) -> str:
    """The README's walk-through timings, rendered from results/readme.md (nothing typed)."""
    machine, rows = timed_rows(results)
    (t_train, r_train), (t_an, r_an), (t_plot, r_plot) = (rows[k] for k in RUN_ORDER)
    demo = (f" The full demo (`python -m hessrank.demo`, what `make demo` runs) took "
            f"{rows['demo'][0]:.0f} s." if "demo" in rows else "")
    return (
        f"Run verbatim here ({machine} `python experiments/benchmarks/bench_readme.py --demo` "
        "reruns them, writes `experiments/benchmarks/results/readme.md` and renders this "
        f"paragraph from it): `train` took {t_train:.0f} s ({r_train}); `analyze` took "
        f"{t_an:.0f} s for 5 checkpoints × (the server, 20 clients and 5 random 50-sample "
        f"subsets), {r_an}, reporting its products as they finish (a bar on a terminal, a line "
        f"every 10 s in a log); `plot` took {t_plot:.0f} s ({r_plot}).{demo} Single runs; on a "
        "busier machine expect more.")


def demo_sentence(results: str) -> str:
    """The README's set-up section: what the demo took (rendered like the paragraph)."""
    _, rows = timed_rows(results)
    full = (f"the demo took {rows['demo'][0]:.0f} s here and prints"
            if "demo" in rows else "the demo prints")
    return (f"Once installed, {full} a per-round client-vs-server table and what it shows; "
            "`python -m hessrank.demo --fast` is a smaller version (6 clients, 4 rounds) that "
            f"took {rows['demo_fast'][0]:.0f} s (`experiments/benchmarks/results/readme.md`, "
            "one run each on the machine it names).")


def with_timings(readme: str, results: str) -> str:
    """``readme`` with its timings blocks rendered from a results/readme.md text."""
    for (start, end), body in ((DEMO_MARKS, demo_sentence(results)),
                               ((START, END), timing_paragraph(results))):
        head, rest = readme.split(start, 1)
        readme = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    return readme


def readme_commands(text: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment prefix, argv) of every ``hessrank train/analyze/plot`` line of the first
    bash block under the "Command line" heading, in order."""
    found = []
    section = text.split("\n## Command line", 1)[-1]
    for block in re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)[:1]:
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            env = {}
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                key, value = argv.pop(0).split("=", 1)
                env[key] = value
            if len(argv) > 1 and argv[0] == "hessrank" and argv[1] in RUN_ORDER:
                found.append((env, argv))
    return found


def run(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> tuple[float, int, str]:
    """Wall seconds, exit status and the last output lines of ``argv`` run in ``cwd``; the
    whole output goes to ``log``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write_text(done.stdout + done.stderr)
    tail = (done.stdout + done.stderr).replace("\r", "\n").strip().splitlines()[-3:]
    return seconds, done.returncode, " / ".join(tail)


def what_it_gave(argv: list[str], cwd: Path) -> str:
    command = argv[1]
    if command == "train":
        out = cwd / argv[argv.index("--out") + 1]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        return (f"round {last['round']}: test accuracy {last['test_accuracy']:.3f}, train loss "
                f"{last['train_loss']:.3f}")
    if command == "analyze":
        out = cwd / argv[2] / "analysis"
        rows = (out / "results.csv").read_text().count("\n") - 1
        return f"{rows} table rows"
    if command == "plot":
        figures = sorted(p.name for p in (cwd / argv[2] / "figures").glob("*.png"))
        return f"{len(figures)} PNG figures"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="also time the full demo (minutes)")
    ap.add_argument("--fast", action="store_true",
                    help="smoke test: run each command's --help only (checks that it parses) "
                         "and write nothing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true",
                    help="run nothing: render the README's timings paragraph from --out")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="run there and keep it, with each command's output in N.log "
                         "(default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    if args.render:
        README.write_text(with_timings(README.read_text(), args.out.read_text()))
        print(f"rendered the timings paragraph of {README} from {args.out}")
        return 0
    busy_before = busy_cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_readme_") as tmp:
        cwd = Path(tmp) if args.workdir is None else args.workdir.resolve()
        cwd.mkdir(parents=True, exist_ok=True)
        jobs = [(env, [sys.executable, "-m", "hessrank.cli", *cmd[1:]], cmd)
                for env, cmd in readme_commands(README.read_text())]  # fmt: skip
        demos = [["--fast"], []] if args.demo else [["--fast"]]
        for flags in demos:
            out = "demo_fast" if flags else "demo_out"
            cmd = ["python", "-m", "hessrank.demo", *flags, "--out", out]
            jobs.append(({}, [sys.executable, *cmd[1:]], cmd))
        if args.fast:
            for env, real, shown in jobs:
                seconds, rc, _ = run([*real, "--help"], env, cwd, cwd / "help.log")
                print(f"== {' '.join(shown)} --help: exit {rc}, {seconds:.1f} s", flush=True)
                rows.append([shown, seconds, rc, ""])
            return 0 if all(r[2] == 0 for r in rows) else 1
        for i, (env, real, shown) in enumerate(jobs, start=1):
            print(f"== {' '.join(shown)}", flush=True)
            seconds, rc, tail = run(real, env, cwd, cwd / f"{i}.log")
            gave = what_it_gave(shown, cwd) if rc == 0 and shown[0] == "hessrank" else tail
            if shown[0] == "python" and rc == 0:
                gave = tail.split(" / ")[-1]
            prefix = " ".join(f"{k}={v}" for k, v in env.items())
            rows.append([f"`{(prefix + ' ') if prefix else ''}{' '.join(shown)}`",
                         f"{seconds:.1f}", rc, gave])  # fmt: skip
            print(f"   {seconds:.1f} s, exit {rc}: {gave}", flush=True)
    busy_after = busy_cores()
    stamp = datetime.date.today().isoformat()
    text = (
        "# The README's commands, run verbatim\n\n"
        f"{stamp} — {machine_line(threads=1)}; other work kept {busy_before:.1f} cores busy "
        f"before and {busy_after:.1f} after.\n"
        "Produced by `python experiments/benchmarks/bench_readme.py"
        f"{' --demo' if args.demo else ''}` (a scratch directory as the working directory; "
        "each command a fresh process; wall clock from start to exit; one run each).\n\n"
        + markdown_table(["command", "seconds", "exit", "result"], rows) + "\n"
    )
    args.out.write_text(text)
    print(text)
    ok = all(r[2] == 0 for r in rows)
    if ok and args.out == RESULTS:
        README.write_text(with_timings(README.read_text(), text))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
