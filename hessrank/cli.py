"""Command-line entry point: ``hessrank {train,analyze,plot,figures} ...``.

Each subcommand lives next to the code it drives and registers itself through a
``register(subparsers)`` function that sets ``func`` on its parser. Registration only builds
argparse parsers — the modules named in :data:`SUBCOMMAND_MODULES` import nothing heavy at
module level and ``func`` imports the work — so ``hessrank --help`` and every subcommand's
``--help`` answer without importing torch.

Every parser shows its defaults and answers a bad flag or subcommand with one line naming the
closest valid one (:mod:`hessrank.clikit`). Whatever escapes a command becomes one line
``hessrank CMD: error: ...`` and a non-zero exit (2 for bad input, 1 otherwise, 130 after
Ctrl-C); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hessrank import __version__
from hessrank.allocator import tune_for_autograd
from hessrank.clikit import ArgumentParser, one_line_warnings, run_command

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main"]

SUBCOMMAND_MODULES = (
    "hessrank.fl.cli",  # train
    "hessrank.analysis.cli",  # analyze, plot
    "hessrank.figures",  # figures
    "hessrank.analysis.study_cli",  # study
)
"""Modules with a ``register(subparsers)`` function, imported to build the parser."""


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def build_parser() -> ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = ArgumentParser(
        prog="hessrank",
        description="Hessian spectra and stable ranks of client and server losses.",
        epilog="'hessrank COMMAND --help' documents each command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"hessrank {__version__}")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that part of the CLI is not in this build
                continue
            raise
        module.register(sub)
    for command_parser in sub.choices.values():
        _add_debug(command_parser)  # accepted after the subcommand too
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    prog = f"hessrank {args.command}"
    with one_line_warnings(prog):
        return run_command(prog, args.func, args, debug=getattr(args, "debug", False))


def run() -> None:
    """The ``hessrank`` command (and ``python -m hessrank``): :func:`main` on ``sys.argv`` in a
    process whose allocator is set for autograd's buffers
    (:func:`hessrank.allocator.tune_for_autograd`: bit-identical results, about half the wall
    time of products through a language model's kept graph)."""
    tune_for_autograd()
    sys.exit(main())


if __name__ == "__main__":
    run()
