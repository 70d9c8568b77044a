"""Named presets of trainer settings: ``hessrank train --preset NAME`` (torch-free).

A preset is a set of config keys applied before ``--config`` and the flags (both override
it), so a preset never hides a choice: the run's ``config.json`` holds every value.

``fedloru-official`` is the local training and factorization of the FedLoRU authors' public
code (haemPark/fedloru_official; read to learn, nothing copied): Conv2d layers factorized
(stem and every Linear dense), W0 = 0 with both factors Kaiming-uniform (a = √5) and the
factorized layers' bias 0, SGD with momentum 0.9 and weight decay 1e-4, gradient-norm
clipping at 0.1, a cosine schedule over the rounds, dropout 0.1 between A and B, and their
``merge()`` (W0 += (α/r)·B·A, A and B kept). Data, model, rank, α and lr stay the caller's
choice; docs/deviations.md tables what still differs (their cosine floor, xavier dense init,
…). ``experiments/configs/fedloru_official.json`` holds the same keys for ``--config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "preset_values"]

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "fedloru-official": MappingProxyType({
        "algo": "fedloru",
        "factorize_rule": "conv",
        "from_scratch": True,
        "lora_init": "kaiming",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "max_grad_norm": 0.1,
        "lr_schedule": "cosine",
        "lowrank_dropout": 0.1,
        "merge_mode": "accumulate",
    }),
})  # fmt: skip
"""Preset name → the config keys it sets (read-only)."""


def preset_values(name: str) -> dict[str, Any]:
    """The config keys of preset ``name`` as a fresh dict.

    Raises:
        ValueError: unknown name (one line listing the presets).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
