"""README.md cannot drift from the code.

- Every ```python block runs (in order, sharing one namespace, in a scratch directory), and
  when a ```text block follows it, that block is exactly what it printed.
- The walk-throughs (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` for NAME in
  :data:`WALKTHROUGHS`: bring your own run, a language model) run as a user would: a
  ``# my_run.py`` block is written to that file, the shell commands run with the installed
  ``python`` and ``hessrank`` in a scratch directory (no ``PYTHONPATH``), the last python
  block prints the text block after it.
- Every command in a ```bash block is one the code accepts: ``hessrank ...`` and
  ``python -m hessrank.demo ...`` lines parse with the real parsers (every flag exists, every
  value has the right type), ``make X`` names a Makefile target, ``papermill NB.ipynb ...``
  names a committed notebook and only parameters of its ``parameters`` cell, and writes
  its executed copy to a path git ignores (never an untracked file in the checkout).

After changing an example, regenerate its output block from a real run:

    PYTHONPATH=. python tests/test_readme.py --write
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
WALKTHROUGHS = ("byo", "lm")
"""Names of the walk-throughs run as a user would (:func:`test_bring_your_own_run_walkthrough`,
:func:`test_language_model_walkthrough`)."""


def _span(text: str, name: str = "byo") -> tuple[int, int]:
    begin, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    start = text.find(begin)
    return (start, text.find(end, start)) if start >= 0 else (-1, -1)


def _outside_byo(text: str, found: list) -> list:
    """The blocks outside every walk-through."""
    spans = [_span(text, name) for name in WALKTHROUGHS]
    return [blk for blk in found if not any(a <= blk.start < b for a, b in spans)]


@dataclass(frozen=True)
class Block:
    """A fenced code block of the README: its language, text, where it starts and ends."""

    lang: str
    body: str
    line: int
    start: int
    end: int


def blocks(text: str) -> list[Block]:
    return [Block(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1, m.start(), m.end())
            for m in _FENCE.finditer(text)]  # fmt: skip


def examples(text: str) -> list[tuple[Block, Block | None]]:
    """Each python block with the text block right after it (only blank lines between),
    outside the walk-through (which runs in its own test)."""
    found = _outside_byo(text, blocks(text))
    pairs = []
    for i, block in enumerate(found):
        if block.lang != "python":
            continue
        nxt = found[i + 1] if i + 1 < len(found) else None
        follows = nxt is not None and nxt.lang == "text" and not text[block.end:nxt.start].strip()
        pairs.append((block, nxt if follows else None))
    return pairs


def exec_examples(text: str) -> list[str]:
    """Run the python blocks in order in one namespace; what each printed."""
    namespace: dict = {"__name__": "__readme__"}
    outputs = []
    for block, _ in examples(text):
        buffer = io.StringIO()
        code = compile(block.body, f"README.md:{block.line}", "exec")
        with contextlib.redirect_stdout(buffer):
            exec(code, namespace)
        outputs.append(buffer.getvalue())
    return outputs


def run_examples(workdir: Path) -> list[str]:
    """:func:`exec_examples` on README.md in a fresh interpreter inside ``workdir`` (so that
    seeds, default dtypes and files an example sets or writes stay there)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--run"], cwd=workdir, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, f"a README example failed:\n{done.stderr}"
    return json.loads(done.stdout)


def commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, argv) of every command in the bash blocks: continuations joined, comments and
    ``VAR=value`` prefixes dropped."""
    found = []
    for block in _outside_byo(text, blocks(text)):
        if block.lang not in ("bash", "sh", "console"):
            continue
        logical = block.body.replace("\\\n", " ")
        for offset, line in enumerate(logical.splitlines()):
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv = argv[1:]
            if argv:
                found.append((block.line + 1 + offset, argv))
    return found


def check_command(argv: list[str]) -> str | None:
    """Why ``argv`` would be rejected, or None when it parses."""
    from hessrank import demo
    from hessrank.cli import build_parser

    if argv[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        missing = [t for t in argv[1:] if t not in targets]
        return f"no Makefile target {missing}" if missing else None
    if argv[0] == "papermill":
        return _check_papermill(argv[1:])
    if argv[0] == "hessrank":
        parser, rest = build_parser(), argv[1:]
    elif argv[:3] == ["python", "-m", "hessrank.demo"]:
        parser, rest = demo.build_parser(), argv[3:]
    else:
        return f"the README test does not know how to check {argv[0]!r}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(rest)
        except SystemExit as exit_:
            if exit_.code:
                return err.getvalue().strip()
    return None


def _check_papermill(args: list[str]) -> str | None:
    """Why ``papermill args`` would fail on the checkout: a notebook that is not committed, or a
    ``-p NAME VALUE`` whose NAME the notebook's ``parameters`` cell does not define."""
    notebook = ROOT / args[0]
    if notebook.suffix != ".ipynb" or not notebook.is_file():
        return f"no notebook {args[0]}"
    if len(args) < 2 or not _ignored(args[1]):
        return (f"papermill writes {args[1:2]} into the checkout, where git does not ignore "
                "it; write the executed notebook under runs/")
    cells = json.loads(notebook.read_text())["cells"]
    params = "".join("".join(c["source"]) for c in cells
                     if "parameters" in c.get("metadata", {}).get("tags", []))  # fmt: skip
    defined = set(re.findall(r"^(\w+)\s*=", params, re.M))
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-p", "--parameters")]
    unknown = [n for n in names if n not in defined]
    return f"{args[0]} has no parameter {unknown}" if unknown else None


def _ignored(path: str) -> bool:
    """Whether git ignores ``path`` (relative to the checkout); without git: under runs/."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index",
                               path], capture_output=True)
    except OSError:
        return path.startswith("runs/")
    return done.returncode == 0 if done.returncode in (0, 1) else path.startswith("runs/")


@pytest.mark.slow
def test_python_examples_print_what_the_readme_shows(tmp_path):
    text = README.read_text()
    pairs = examples(text)
    assert pairs, "the README has no python example"
    outputs = run_examples(tmp_path)
    for (block, shown), printed in zip(pairs, outputs):
        if shown is not None:
            assert printed == shown.body, (
                f"README.md:{shown.line} shows other output than the block at line "
                f"{block.line} prints; rerun `PYTHONPATH=. python tests/test_readme.py --write`"
                f"\n--- README\n{shown.body}--- printed\n{printed}"
            )
    assert any(shown is not None for _, shown in pairs), "no example shows its output"


def test_every_command_in_the_readme_parses():
    found = commands(README.read_text())
    assert any(argv[0] == "hessrank" for _, argv in found)
    problems = [f"README.md:{line}: {' '.join(argv)}: {why}"
                for line, argv in found if (why := check_command(argv))]  # fmt: skip
    assert not problems, "\n".join(problems)


def test_the_checker_rejects_what_the_cli_rejects():
    assert check_command(["hessrank", "analyze", "runs/x", "--matvec", "3"])
    assert check_command(["hessrank", "train", "--out", "x", "--rounds", "ten"])
    assert check_command(["make", "no-such-target"])
    assert check_command(["papermill", "notebooks/no_such.ipynb", "out.ipynb"])
    assert check_command(["papermill", "notebooks/05_theory.ipynb", "runs/o.ipynb", "-p", "SIZ",
                          "x"])
    assert check_command(["papermill", "notebooks/05_theory.ipynb", "runs/o.ipynb", "-p",
                          "SIZE", "smoke"]) is None
    # issue 19.6: the README's example wrote out.ipynb, untracked, into the checkout's root
    assert "runs/" in check_command(["papermill", "notebooks/05_theory.ipynb", "out.ipynb"])
    assert check_command(["hessrank", "plot", "runs/x/analysis"]) is None
    assert commands("```bash\nOMP_NUM_THREADS=1 hessrank plot a \\\n  --out b  # c\n```\n") == [
        (2, ["hessrank", "plot", "a", "--out", "b"])
    ]


def byo_walkthrough(text: str, name: str = "byo") -> tuple[str | None, list[str], str, Block]:
    """(my_run.py's source or None, the shell commands, the report snippet, its output
    block) of walk-through ``name``."""
    a, b = _span(text, name)
    found = [blk for blk in blocks(text) if a <= blk.start < b]
    module = next((blk.body for blk in found if blk.lang == "python"
                   and blk.body.startswith("# my_run.py")), None)  # fmt: skip
    shell = next(blk.body for blk in found if blk.lang == "bash")
    cmds = [ln for ln in shell.replace("\\\n", " ").splitlines() if ln.strip()]
    pairs = [(blk, found[i + 1]) for i, blk in enumerate(found[:-1])
             if blk.lang == "python" and found[i + 1].lang == "text"]
    (report, shown), = pairs
    return module, cmds, report.body, shown


def run_byo(workdir: Path, text: str, name: str = "byo") -> str:
    """Run walk-through ``name`` in ``workdir`` as a user would; what the report printed."""
    module, cmds, report, _ = byo_walkthrough(text, name)
    if module is not None:
        (workdir / "my_run.py").write_text(module)
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    for cmd in cmds:
        done = subprocess.run(["bash", "-c", cmd], cwd=workdir, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"README walk-through: {cmd!r} failed:\n{done.stderr}"
    done = subprocess.run([sys.executable, "-c", report], cwd=workdir, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bring_your_own_run_walkthrough(tmp_path):
    """The README's walk-through runs from a user's folder (console script, no PYTHONPATH)
    and prints what the README shows; the label-skewed split's client/server ratio is not the
    iid split's (issue 22.6: the CLI could only re-split built-in data iid, silently)."""
    text = README.read_text()
    printed = run_byo(tmp_path, text)
    shown = byo_walkthrough(text)[3]
    assert printed == shown.body, (
        "README.md's walk-through output is stale; rerun `PYTHONPATH=. python "
        f"tests/test_readme.py --write`\n--- README\n{shown.body}--- printed\n{printed}")
    last = {ln.split(":")[0].strip(): float(ln.split()[-1]) for ln in printed.splitlines()}
    assert abs(last["skewed"] - last["iid"]) > 0.2, last


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_language_model_walkthrough(tmp_path):
    """The README's language-model section (FedLoRU with PEFT adapters on Shakespeare roles,
    then the adapters' curvature) runs from a user's folder and prints what the README shows;
    only adapter floats travel."""
    text = README.read_text()
    printed = run_byo(tmp_path, text, "lm")
    shown = byo_walkthrough(text, "lm")[3]
    assert printed == shown.body, (
        "README.md's language-model output is stale; rerun `PYTHONPATH=. python "
        f"tests/test_readme.py --write`\n--- README\n{shown.body}--- printed\n{printed}")


def _write(path: Path) -> int:
    """Replace every python example's output block with what it prints now."""
    import tempfile

    text = path.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        outputs = run_examples(Path(tmp))
    for (_, shown), printed in reversed(list(zip(examples(text), outputs))):
        if shown is not None:
            body_start = text.index("\n", shown.start) + 1
            text = text[:body_start] + printed + text[shown.end - 3:]
    for name in WALKTHROUGHS:
        if _span(text, name)[0] < 0:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            printed = run_byo(Path(tmp), text, name)
        shown = byo_walkthrough(text, name)[3]
        body_start = text.index("\n", shown.start) + 1
        text = text[:body_start] + printed + text[shown.end - 3:]
    path.write_text(text)
    print(f"rewrote the output blocks of {path}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--run"]:  # the child of run_examples: outputs as JSON on stdout
        print(json.dumps(exec_examples(README.read_text())))
    elif sys.argv[1:] == ["--write"]:
        sys.exit(_write(README))
    else:
        sys.exit(__doc__)


def test_timings_paragraph_is_rendered_from_the_results():
    """The README's walk-through timings come from experiments/benchmarks/results/readme.md
    (bench_readme.py renders them), never typed by hand."""
    import importlib.util

    path = ROOT / "experiments" / "benchmarks" / "bench_readme.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_readme", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    readme = mod.README.read_text()
    assert readme == mod.with_timings(readme, mod.RESULTS.read_text()), (
        "README.md's timings paragraph is stale: run python "
        "experiments/benchmarks/bench_readme.py --render")
