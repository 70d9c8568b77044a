"""Command-line entry point: ``hessrank {train,analyze,plot,figures} ...``.

Each subcommand lives next to the code it drives and registers itself through a
``register(subparsers)`` function that sets ``func`` on its parser. Errors raised as
``ValueError``/``FileNotFoundError`` at the boundary are printed as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMAND_MODULES = (
    "hessrank.fl.cli",  # train
    "hessrank.analysis.cli",  # analyze, plot
    "hessrank.figures",  # figures
    "hessrank.analysis.study_cli",  # study
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessrank",
        description="Hessian spectra and stable ranks of client and server losses.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that part of the CLI is not in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if err.args else repr(err)
        print(f"hessrank {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
