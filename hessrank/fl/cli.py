"""``hessrank train`` and ``hessrank sweep``: every config key as a flag, read from its source.

The flags, their types, defaults and help lines are the fields of the option groups of
:class:`~hessrank.fl.config.TrainConfig` (one help section per group); the algorithm, dataset
and model choices with their help come from the registries (:mod:`hessrank.fl.registry`,
:mod:`hessrank.data.catalog`, :mod:`hessrank.models.catalog`). Building the parsers imports
neither torch nor pydantic.

Flags are the field names with dashes (``--local-epochs``); booleans come as
``--flag/--no-flag``; lists are comma-separated (``--client-ranks 8,4,2``); dicts are JSON
(``--model-kwargs '{"hidden": [128, 128]}'``); ``none`` clears an optional field.
``--preset NAME`` (:mod:`hessrank.fl.presets`) sets a named group of keys first, ``--config
FILE.json`` loads a config over it; flags given on the command line override both.

Example:
    hessrank train --algo fedloru --dataset digits --clients 20 --rounds 50 --out runs/x
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from hessrank.clikit import RawDescriptionHelpFormatter, format_fields
from hessrank.data.catalog import DATASET_CATALOG, LIMIT_HELP
from hessrank.fl.config import TrainConfig, config_groups, field_types
from hessrank.fl.presets import PRESETS, preset_values
from hessrank.fl.registry import ALGORITHM_NAMES, ALGORITHMS, option_groups, users
from hessrank.models.catalog import MODEL_CATALOG

__all__ = ["build_config", "register"]


def _choices_text() -> str:
    """The epilog: every algorithm, dataset (with its options) and model (with its options)."""
    lines = ["algorithms (--algo):"]
    lines += [f"  {name:18s} {e.summary}" for name, e in ALGORITHMS.items()]
    lines.append(f"datasets (--dataset; options in --dataset-kwargs, 'limit': {LIMIT_HELP}):")
    for name, d in DATASET_CATALOG.items():
        lines.append(f"  {name:18s} {d.summary}" + (" (--data-root)" if d.needs_root else ""))
        lines += [f"  {'':18s}   {k}: {v}" for k, v in d.options.items()]
    lines.append("models (--model; options in --model-kwargs):")
    for name, m in MODEL_CATALOG.items():
        lines.append(f"  {name:18s} {m.summary}")
        lines += [f"  {'':18s}   {k}: {v}" for k, v in m.options.items()]
    return "\n".join(lines)


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_optional(tp) and len(args) == 1 else tp


def _parser_for(tp: Any):
    """A string → value converter for a field of type ``tp`` (argparse ``type=``); the values
    are validated by :class:`TrainConfig` afterwards."""
    base = _base_type(tp)
    origin = typing.get_origin(base)

    def convert(text: str) -> Any:
        if _is_optional(tp) and text.lower() == "none":
            return None
        if origin is list:
            (item,) = typing.get_args(base)
            return [item(s.strip()) for s in text.split(",") if s.strip()]
        if origin is dict or base is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if origin is Literal:
            return text
        return base(text)

    convert.__name__ = getattr(base, "__name__", str(base))  # argparse names it in errors
    return convert


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _section_title(group: type) -> str:
    title = (group.__doc__ or group.__name__).strip().splitlines()[0].rstrip(".")
    if group in option_groups():
        return f"{title}: options of {', '.join(users(group))}"
    return title


def _choices(tp: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` field (None for other types)."""
    base = _base_type(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _add_field_flags(parser: argparse.ArgumentParser, hints: dict[str, Any]) -> None:
    for group in config_groups():
        section = parser.add_argument_group(_section_title(group))
        for f in dataclasses.fields(group):
            flag = "--" + f.name.replace("_", "-")
            tp = hints[f.name]
            choices = _choices(tp)
            text = f.metadata.get("help", f.name)
            if choices and not all(c in text for c in choices):
                text += f": {', '.join(choices)}"
            if "default" not in text:
                text += f" (default: {_default(f)!r})"
            if _base_type(tp) is bool:
                section.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS, help=text,
                )  # fmt: skip
                continue
            section.add_argument(
                flag, dest=f.name, type=_parser_for(tp), default=argparse.SUPPRESS,
                choices=choices, metavar=f.name.upper(), help=text,
            )  # fmt: skip


def _add_model_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path", metavar="DIR", default=None,
        help="local folder with a pretrained hf-* model (config.json and weights; never a "
        "download): its weights are W0; sets model_kwargs' model_path",
    )  # fmt: skip


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The config of ``--preset`` (if given), then ``--config`` (if given: its keys override
    the preset's), with every explicitly given flag applied last."""
    base: dict[str, Any] = {}
    if getattr(args, "preset", None):
        base = preset_values(args.preset)
    if getattr(args, "config", None):
        path = Path(args.config)
        TrainConfig.from_json_file(path)  # one-line errors for a bad file
        base.update(json.loads(path.read_text()))
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            base[f.name] = getattr(args, f.name)
    if getattr(args, "model_path", None):
        base["model_kwargs"] = {**base.get("model_kwargs", {}), "model_path": args.model_path}
    return TrainConfig.from_dict(base)


def _command_line(args: argparse.Namespace) -> list[str]:
    """``hessrank train`` with the flags as parsed (explicit config flags, then the run flags),
    so the provenance names the command however ``main`` was called."""
    argv = ["hessrank", "train", "--out", str(args.out)]
    if getattr(args, "preset", None):
        argv += ["--preset", str(args.preset)]
    if getattr(args, "config", None):
        argv += ["--config", str(args.config)]
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, (list, tuple)):
                argv += [flag, ",".join(map(str, value))]
            elif isinstance(value, dict):
                argv += [flag, json.dumps(value)]
            else:
                argv += [flag, str(value)]
    if getattr(args, "model_path", None):
        argv += ["--model-path", str(args.model_path)]
    argv += ["--resume" if args.resume else "--no-resume", "--device", str(args.device)]
    argv += ["--engine", str(args.engine)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv + (["--quiet"] if args.quiet else [])


def _run(args: argparse.Namespace) -> int:
    config = build_config(args)  # every flag is validated before torch is even imported
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from hessrank.fl.runner import train  # here: keeps `hessrank --help` free of torch

    # OSErrors (read-only --out, disk full, a file in the way) propagate: the top-level guard
    # (hessrank.clikit.run_command) prints them as one line with a hint, exit status 1
    run = train(
        config, args.out, resume=args.resume, progress=not args.quiet, device=args.device,
        threads=args.threads, command=_command_line(args), engine=args.engine,
    )  # fmt: skip
    table = run.metrics()  # a damaged or lost history is one line (ValueError)
    last = table.iloc[-1].to_dict() if len(table) else {}
    score = "test_accuracy" if last.get("test_accuracy") is not None else "test_loss"  # LM
    summary = format_fields({k: last.get(k) for k in ("round", "train_loss", score)})
    print(f"{run.path}: {len(run.rounds())} checkpoints, {summary}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sweep(args: argparse.Namespace) -> int:
    """Train every (algorithm, lr, seed) and pick each algorithm's best lr on the mean
    validation score over the seeds."""
    import math

    for flag, plural in (("algo", "--algos"), ("lr", "--lrs"), ("seed", "--seeds")):
        if hasattr(args, flag):
            raise ValueError(f"hessrank sweep takes {plural}, not --{flag}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    unknown = [a for a in args.algos if a not in ALGORITHM_NAMES]
    if unknown or not args.algos:
        raise ValueError(f"--algos: unknown {unknown}; choose from {', '.join(ALGORITHM_NAMES)}")
    if not args.lrs or not all(math.isfinite(lr) and lr > 0 for lr in args.lrs):
        raise ValueError(f"--lrs must be positive finite numbers, got {args.lrs}")
    if not hasattr(args, "validation_fraction"):
        args.validation_fraction = 0.2
    configs = {}
    for algo in args.algos:  # validate every config before training any
        for lr in args.lrs:
            for seed in args.seeds:
                args.algo, args.lr, args.seed = algo, lr, seed
                configs[algo, lr, seed] = build_config(args)
    if next(iter(configs.values())).validation_fraction <= 0:
        raise ValueError("hessrank sweep needs --validation-fraction > 0 to pick learning rates")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from hessrank.fl.sweep import sweep  # here: keeps `hessrank --help` free of torch

    summary = sweep(configs, Path(args.out), progress=not args.quiet, threads=args.threads)
    print(summary.to_string(index=False))
    if len(args.seeds) < 3:
        print(f"note: {len(args.seeds)} seed(s); a spread needs at least 3 (--seeds 0,1,2)")
    return 0


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    lines = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
             for name, values in PRESETS.items()]  # fmt: skip
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default=None,
        help="apply a named set of config keys first (--config and flags override it); "
        + "; ".join(lines) + " (docs/deviations.md)",
    )  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` and ``sweep`` subcommands to the top-level CLI."""
    epilog, hints = _choices_text(), field_types(constraints=False)
    sweep = subparsers.add_parser(
        "sweep",
        help="pick each algorithm's learning rate on a validation split, over seeds",
        description="Train every algorithm of --algos at every learning rate of --lrs with "
        "every seed of --seeds (one run directory each under --out), score the last round on "
        "the validation split (--validation-fraction, default 0.2: val_accuracy, or val_loss "
        "for regression), pick each algorithm's lr by the mean score over the seeds (an lr "
        "that diverges on any seed is never picked) and write OUT/sweep.csv (per seed), "
        "OUT/summary.csv (per lr: mean, std, min, max over seeds) and OUT/best.json "
        "(algorithm -> best lr). Other flags as for hessrank train.",
        epilog=epilog, formatter_class=RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    sweep.add_argument("--out", required=True, help="folder for the runs and the summary")
    sweep.add_argument("--algos", type=_names, required=True, help="e.g. fedavg,fedloru,fedlrt")
    sweep.add_argument("--lrs", type=_floats, required=True, help="e.g. 0.03,0.1,0.3,1")
    sweep.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                       help="seeds per (algorithm, lr), e.g. 0,1,2,3,4 (default: 0,1,2)")
    sweep.add_argument("--config", metavar="FILE.json", help="load a TrainConfig JSON first")
    _add_preset_flag(sweep)
    sweep.add_argument("--quiet", action="store_true", help="no progress output")
    sweep.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads for every run (default: torch's own); recorded in "
                            "each run's provenance.json")  # fmt: skip
    _add_model_path(sweep)
    _add_field_flags(sweep, hints)
    sweep.set_defaults(func=_sweep)
    parser = subparsers.add_parser(
        "train",
        help="federated training that writes a run directory",
        description="Federated training (algorithms below) writing config.json, "
        "partition.json, metrics.jsonl and checkpoints to --out.",
        epilog=epilog, formatter_class=RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="run directory to write (or resume)")
    parser.add_argument("--config", metavar="FILE.json", help="load a TrainConfig JSON first")
    _add_preset_flag(parser)
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue a run of the same config from its last checkpoint; --no-resume "
        "restarts it from scratch",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--device", default="cpu", help="where to train: cpu, cuda or cuda:N (not part of the "
        "config; recorded in provenance.json)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="torch threads for training (default: torch's own); recorded in provenance.json "
        "because the weights' last bits depend on it",
    )  # fmt: skip
    parser.add_argument(
        "--engine", default="builtin", choices=("builtin", "flower"),
        help="builtin: clients run in this process; flower: every client task runs in a "
        "Flower ClientApp under Flower's simulation engine (needs flwr[simulation]; same "
        "run directory and weights; see docs/flower.md)",
    )  # fmt: skip
    _add_model_path(parser)
    _add_field_flags(parser, hints)
    parser.set_defaults(func=_run)
    return parser
