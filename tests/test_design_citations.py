"""Citations of the design document resolve.

The code, tests, experiments, notebooks and docs cite the design document of this repository
as ``docs/design.md §N`` (or ``§N of docs/design.md``). Every file under hessrank/, tests/,
experiments/, notebooks/, docs/ and README.md must name it exactly so (under docs/ a relative
``design.md`` link is fine too), and every section it cites (§N, §N.M) must be a numbered
heading of docs/design.md (``## N. Title``, ``### N.M Title``). docs/design.md's own §
references are held to its headings as well. This file itself is not scanned: its test of
the checker spells wrong citations on purpose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SELF = Path(__file__).resolve()
SCANNED = ("hessrank", "tests", "experiments", "notebooks", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".txt", ".rst", ".cfg", ".yaml", ".yml"}

HEADING = re.compile(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]", re.MULTILINE)
"""A numbered heading: ``## 3. Operators`` → 3, ``### 3.2 Route planning`` → 3.2."""
FILE_NAME = re.compile(r"[\w./-]*design\.md", re.IGNORECASE)
"""Any spelling of the design document's file name, with the path before it."""
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
SECTIONS_AFTER = re.compile(
    r"docs/design\.md,?\s*(§\d+(?:\.\d+)*(?:\s*(?:,|and|&)\s*§\d+(?:\.\d+)*)*)")
"""``docs/design.md §1, §4`` (the cited sections follow the name)."""
SECTION_BEFORE = re.compile(r"§(\d+(?:\.\d+)*)(?:'s)?\s+of\s+docs/design\.md")
"""``§6 of docs/design.md``."""


def headings(text: str) -> set[str]:
    """The section numbers of a document's numbered headings."""
    return set(HEADING.findall(text))


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def bad_names(text: str, in_docs: bool = False) -> list[tuple[int, str]]:
    """(line, name) of every mention of the design document not spelled ``docs/design.md``
    (a relative ``design.md`` is allowed in a file under docs/)."""
    found = []
    for m in FILE_NAME.finditer(text):
        name = m.group(0)
        if name.endswith("docs/design.md") or (in_docs and name in ("design.md", "./design.md")):
            continue
        found.append((_line(text, m.start()), name))
    return found


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line, section) of every section cited with the file name next to it."""
    cited = []
    for m in SECTIONS_AFTER.finditer(text):
        cited += [(_line(text, m.start()), s) for s in SECTION.findall(m.group(1))]
    cited += [(_line(text, m.start()), m.group(1)) for m in SECTION_BEFORE.finditer(text)]
    return cited


def _text(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources (outputs are generated)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".ipynb":
        return raw
    cells = json.loads(raw).get("cells", [])
    return "\n".join(
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells
    )


def scanned_files() -> list[Path]:
    """The text files the citations are checked in (this file excluded, see above)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
            continue
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(ROOT).parts
            if f.is_file() and f.suffix in TEXT_SUFFIXES and f != SELF and not any(
                    p.startswith(".") or p == "__pycache__" for p in rel):  # fmt: skip
                files.append(f)
    return files


def test_checker_finds_bad_citations():
    """The checks below can fail: wrong spellings and missing sections are found."""
    design_text = "## 1. One\n\n### 1.2 Sub\n\n## 3. Three\n"
    assert headings(design_text) == {"1", "1.2", "3"}
    old = "DESIGN" + ".md"  # apart, so that a sed over tests/ replacing the name leaves it
    text = f'"""See {old} §3 and docs/{old}.\n\nAlso docs/design.md §1, §2 and §1.2.\n"""'
    assert [n for _, n in bad_names(text)] == [old, f"docs/{old}"]
    assert [s for _, s in cited_sections(text)] == ["1", "2", "1.2"]
    wrapped = "(§4 of\n    docs/design.md) and docs/design.md\n§3.1"
    assert sorted(s for _, s in cited_sections(wrapped)) == ["3.1", "4"]
    assert bad_names("[link](design.md)", in_docs=True) == []
    assert bad_names("[link](design.md)") == [(1, "design.md")]


def test_design_document_has_the_cited_sections():
    text = DESIGN.read_text(encoding="utf-8")
    sections = headings(text)
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections, sorted(sections)
    missing = sorted({s for s in SECTION.findall(text) if s not in sections})
    assert not missing, f"docs/design.md refers to §{', §'.join(missing)}, which it has no " \
                        "heading for"


def test_every_citation_resolves():
    sections = headings(DESIGN.read_text(encoding="utf-8"))
    problems = []
    for path in scanned_files():
        text = _text(path)
        rel = path.relative_to(ROOT).as_posix()
        in_docs = rel.startswith("docs/")
        for line, name in bad_names(text, in_docs=in_docs):
            problems.append(f"{rel}:{line}: cites {name!r}; cite it as docs/design.md")
        for line, section in cited_sections(text):
            if section not in sections:
                problems.append(f"{rel}:{line}: cites docs/design.md §{section}, which has no "
                                f"such heading (sections: {', '.join(sorted(sections))})")
    assert not problems, "\n".join(problems)
