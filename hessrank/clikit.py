"""Command-line plumbing shared by every ``hessrank`` command: parsers, errors, warnings, numbers.

Imports only the standard library, so a parser can be built (and ``--help`` shown) without
torch. What a user sees:

- ``--help`` shows every flag's default (:class:`HelpFormatter`);
- a bad flag or subcommand is one line with the closest valid spelling and exit status 2
  (:class:`ArgumentParser`);
- an exception escaping a command is one line ``PROG: error: ...`` and a non-zero exit, never
  a traceback unless ``--debug`` (:func:`run_command`);
- a warning is one line ``PROG: warning: ...`` without the source line that raised it
  (:func:`one_line_warnings`, installed by the CLI only, never on library import);
- numbers in summaries are rounded to a few significant digits (:func:`format_number`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

__all__ = [
    "ArgumentParser", "HelpFormatter", "RawDescriptionHelpFormatter", "format_fields",
    "format_number", "one_line", "one_line_warnings", "run_command", "suggest",
]  # fmt: skip

DEBUG_HINT = "rerun with --debug for the traceback"

BAD_INPUT_EXIT = 2
"""Exit status for bad input: a usage error, or a ValueError/KeyError/FileNotFoundError raised
at a command's boundary (the convention of argparse and of the commands' own tests)."""

FAILURE_EXIT = 1
"""Exit status for every other failure (an unwritable or full disk, an unexpected error)."""

INTERRUPT_EXIT = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help, unless the help already names its
    default, the default is unset/``None``, or the flag is a plain switch (``--quiet``);
    a ``--flag/--no-flag`` pair shows which one is the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        negatable = any(s.startswith("--no-") for s in action.option_strings)
        if action.nargs == 0 and isinstance(action.default, bool) and not negatable:
            return text  # a plain switch: off unless given
        if not action.option_strings:  # positionals have no default worth showing
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (a module docstring)."""


def suggest(word: str, candidates: Sequence[str]) -> str:
    """``" (did you mean X?)"`` for the closest candidate by :func:`difflib.get_close_matches`,
    or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


_INVALID_CHOICE = re.compile(
    r"invalid choice: '?(?P<value>[^'()]*)'? \(choose from (?P<choices>.*)\)"
)


class ArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line with a suggestion.

    Defaults: :class:`HelpFormatter`, and ``allow_abbrev=False`` (a prefix of a flag is not
    silently taken for the flag). Pass as ``parser_class`` to ``add_subparsers`` so every
    subcommand gets the same behaviour.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.subcommands: argparse._SubParsersAction | None = None

    def add_subparsers(self, **kwargs: Any) -> argparse._SubParsersAction:
        """As argparse's, with this class as the default ``parser_class``; the action is kept
        as :attr:`subcommands` so that errors can be reported by the subcommand's parser."""
        kwargs.setdefault("parser_class", type(self))
        self.subcommands = super().add_subparsers(**kwargs)
        return self.subcommands

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but an unknown argument is reported by the parser of the subcommand
        it was given to, with the closest valid flag (:meth:`reject_extras`)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self
            if self.subcommands is not None:
                name = getattr(parsed, self.subcommands.dest or "", None)
                owner = self.subcommands.choices.get(name, self)
            owner.reject_extras(extras)
        return parsed

    def format_help(self) -> str:
        for action in self._actions:  # an option without help text still shows its default
            if (action.help is None and action.option_strings and action.nargs != 0
                    and action.default not in (None, argparse.SUPPRESS)):
                action.help = "(default: %(default)s)"
        return super().format_help()

    def option_strings(self) -> list[str]:
        """Every ``--flag`` this parser accepts (for suggestions)."""
        return [s for a in self._actions for s in a.option_strings]

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = [c.strip().strip("'\"") for c in match["choices"].split(",")]
            hint = suggest(match["value"], choices)
            if hint:  # the close match replaces the list of every choice
                message = f"{message[:match.start()]}invalid choice: {match['value']!r}{hint}"
        self.exit(BAD_INPUT_EXIT, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")

    def reject_extras(self, extras: Sequence[str]) -> NoReturn:
        """Fail on arguments no parser recognized, naming the closest valid flag for each."""
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
        if flags:
            valid = self.option_strings()
            named = ", ".join(f + suggest(f, valid) for f in flags)
            self.error(f"unrecognized argument{'s' if len(flags) > 1 else ''} {named}")
        self.error(f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}")


def one_line(text: str) -> str:
    """The first non-empty line of ``text``; a marker says when lines were dropped."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else f"{lines[0]} [...]"


def _os_message(err: OSError) -> str:
    """``strerror: path`` plus what to do, for the errors a user's environment causes."""
    if err.strerror is None:
        return one_line(str(err))
    where = "" if err.filename is None else f": {err.filename}"
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    hint = {
        errno.EACCES: "choose a location you can write to",
        errno.EPERM: "choose a location you can write to",
        errno.EROFS: "the file system is read-only; choose another location",
        errno.ENOSPC: "free some space or choose another location",
        errno.EFBIG: "a file hit the file-size limit (ulimit -f); raise it or write elsewhere",
        errno.EEXIST: "something already exists there; choose another location",
        errno.EDQUOT: "the disk quota is exhausted; free some space",
        errno.EISDIR: "a directory is in the way of a file of that name",
        errno.ENOTDIR: "a file is in the way of a directory of that name",
    }.get(err.errno or 0)
    return f"{err.strerror}{where}" + (f" ({hint})" if hint else "")


def describe(err: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for an exception that escaped a command."""
    if isinstance(err, (ValueError, KeyError, FileNotFoundError)):
        text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        if isinstance(err, FileNotFoundError) and err.strerror is not None:
            text = _os_message(err)
        return BAD_INPUT_EXIT, one_line(text) or type(err).__name__
    if isinstance(err, OSError):
        return FAILURE_EXIT, _os_message(err)
    text = one_line(str(err))
    name = type(err).__name__
    return FAILURE_EXIT, f"{name}: {text} ({DEBUG_HINT})" if text else f"{name} ({DEBUG_HINT})"


def run_command(prog: str, func: Callable[..., Any], *args: Any, debug: bool = False) -> int:
    """Run ``func(*args)`` and turn whatever escapes it into an exit status.

    Without ``debug`` no traceback reaches the user: an exception becomes one line
    ``PROG: error: ...`` on stderr (see :func:`describe`), Ctrl-C exits 130, a closed pipe
    (``hessrank ... | head``) exits quietly. With ``debug`` exceptions propagate unchanged.

    Returns:
        ``func``'s return value as an int (``None`` → 0), or the error's exit status.
    """
    if debug:
        return int(func(*args) or 0)
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPT_EXIT
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # stdout's reader went away: say nothing more
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - closed with the process
        return FAILURE_EXIT
    except Exception as err:  # the guard: whatever it is, one line and an exit status
        status, message = describe(err)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """While active, a warning prints as ``PROG: warning: MESSAGE`` on one line, without the
    file, line number and source line of the code that raised it; the category is named
    unless it is the generic ``UserWarning``. Only the format changes (``warnings.formatwarning``),
    so filters and ``warnings.catch_warnings(record=True)`` work as before; restored on exit."""

    def format_warning(message: Warning | str, category: type[Warning], filename: str,
                       lineno: int, line: str | None = None) -> str:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"{prog}: warning: {kind}{one_line(str(message))}\n"

    previous = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


def format_number(x: Any, digits: int = 4) -> str:
    """A number for people: ``digits`` significant digits, integers as they are.

    >>> format_number(2.2690107822418213), format_number(0.96666), format_number(12)
    ('2.269', '0.9667', '12')
    >>> format_number(1234.5678), format_number(None), format_number(float("nan"))
    ('1235', 'n/a', 'nan')
    """
    if x is None:
        return "n/a"
    if isinstance(x, (bool, str)):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    try:
        value = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(value):
        return str(value)
    if 10 ** (digits - 1) <= abs(value) < 1e15:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def format_fields(values: Mapping[str, Any], digits: int = 4) -> str:
    """``"key value, key value"`` with each number through :func:`format_number`; ``_`` in
    keys becomes a space.

    >>> format_fields({"round": 50, "train_loss": 0.123456, "test_accuracy": 0.9611})
    'round 50, train loss 0.1235, test accuracy 0.9611'
    """
    return ", ".join(f"{k.replace('_', ' ')} {format_number(v, digits)}" for k, v in values.items())
