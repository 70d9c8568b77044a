"""Typed tables of a TOML file (pydantic v2) and one-line errors naming file, table and key.

:class:`Table` is the base of every table of a study spec (:mod:`hessrank.analysis.spec`,
:mod:`hessrank.analysis.hypotheses`): frozen, strict types (a string is not a number, a
float is not an int), and an unknown key refused with the closest valid one. A
:class:`pydantic.ValidationError` becomes one line with :func:`one_line_error`:

    spec.toml: [[hypotheses]] #2 'small': Input should be a valid integer (got 'x')

Imports only the standard library and pydantic, so the command line can read the spec
format's help from the models without importing torch, numpy or pandas.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = ["Table", "closest", "one_line_error"]


def closest(word: str, candidates: Sequence[str]) -> str:
    """``" (did you mean X?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Table(BaseModel):
    """A TOML table: frozen, strict, unknown keys refused with a suggestion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = list(cls.model_fields)
            for key in data:
                if key not in valid:
                    raise ValueError(f"unknown key {key!r}{closest(key, valid)}; valid keys: "
                                     f"{', '.join(valid)}")
        return data


def _where(loc: tuple, tags: Sequence[str]) -> str:
    """``('hypotheses', 1, 'subset-size', 'small')`` → ``[[hypotheses]] #2 'small'``."""
    if not loc:
        return ""
    head, rest = str(loc[0]), list(loc[1:])
    parts = [f"[[{head}]]" if head == "hypotheses" else f"[{head}]"]
    while rest:
        item = rest.pop(0)
        if isinstance(item, int):
            parts.append(f"#{item + 1}")
        elif item in tags and head == "hypotheses":
            continue  # the discriminator's tag: the kind, not a key
        elif rest and isinstance(rest[0], int):
            parts.append(f"{item}")
        else:
            parts.append(f"{item!r}")
    return " ".join(parts)


def _describe(error: dict[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    kind = error["type"]
    value = error.get("input")
    if kind == "missing":
        return "missing key (required)"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        return (f"unknown kind {ctx.get('tag')!r}{closest(ctx.get('tag', ''), tags)}; valid "
                f"kinds: {', '.join(tags)}")
    if kind == "union_tag_not_found":
        return "missing key 'kind' (required)"
    if kind not in ("value_error", "assertion_error") and isinstance(
            value, (str, int, float, bool)):
        return f"{msg} (got {value!r})"
    return msg


def one_line_error(err: ValidationError, where: str, tags: Sequence[str] = ()) -> str:
    """One line for a validation error: ``FILE: [table] 'key': message`` for its first
    problem, with the number of further problems. ``tags``: discriminator values left out
    of locations (the hypothesis kinds)."""
    errors = err.errors()
    first = errors[0]
    loc = _where(tuple(first["loc"]), tags)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(
        errors) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{_describe(first)}{more}"
