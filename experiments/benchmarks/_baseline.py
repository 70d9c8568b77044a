"""Another commit's ``hessrank`` package, importable beside this one as ``hessrank_base``.

``load(commit)`` copies ``hessrank/`` as of ``commit`` (``git show``, nothing checked out) into
a temporary directory under the name ``hessrank_base``, rewrites its absolute imports
(``from hessrank.x``, ``import hessrank``, ``"hessrank.x"`` module strings) to that name, and
imports it. Both versions then run in one process, so before/after timings can be interleaved
round by round (``bench_before_after.py``).

    >>> base = load()                                         # doctest: +SKIP
    >>> base.curvature.HessianOperator                        # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "hessrank_base"
_IMPORTS = re.compile(r"(?<![\w.])hessrank(?=[.\s:'\"]|$)", re.MULTILINE)


def _git(*args: str) -> str:
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True,
                         text=True, check=True).stdout.strip()
    return subprocess.run(["git", *args], cwd=top, capture_output=True, text=True,
                          check=True).stdout


def merge_base(other: str = "main") -> str:
    """The commit this branch left ``other`` at (the code before this branch's changes)."""
    return _git("merge-base", "HEAD", other).strip()


def load(commit: str | None = None, name: str = NAME):
    """The package ``hessrank`` of ``commit`` (default: :func:`merge_base`), imported as
    ``name`` (a fresh copy per call)."""
    commit = commit or merge_base()
    sha = _git("rev-parse", "--short", commit).strip()
    root = Path(tempfile.mkdtemp(prefix=f"hessrank-{sha}-"))
    for path in _git("ls-tree", "-r", "--name-only", commit, "hessrank/").splitlines():
        if not path.endswith(".py"):
            continue
        text = _git("show", f"{commit}:{path}")
        target = root / name / Path(path).relative_to("hessrank")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_IMPORTS.sub(name, text))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    for sub in ("curvature", "linalg", "data", "models"):
        try:
            importlib.import_module(f"{name}.{sub}")
        except ModuleNotFoundError:
            pass
    module.COMMIT = sha
    return module
