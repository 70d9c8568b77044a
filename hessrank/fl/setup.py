"""From a config to everything a run trains with: data, partition, model, algorithm.

:func:`build_setup` is the one place that turns a :class:`~hessrank.fl.config.TrainConfig`
into a :class:`Setup`; the runner and the Flower ClientApp both call it, so a ClientApp
rebuilds exactly the run's clients and client procedure.

Reproducibility: the dataset and the partition take the config's seed; the model is built
right after ``torch.manual_seed(seed)``, then gets its PEFT adapters (``adapters="peft"``,
:mod:`hessrank.fl.adapters`; A drawn from the same global RNG), then the run's dtype (a dry
forward pass checks it fits the data without moving any RNG); hessrank's own factor
initializations use their own seeded generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.data.datasets import Dataset, load_dataset
from hessrank.data.partition import Partition, make_partition
from hessrank.fl.adapters import add_run_adapters
from hessrank.fl.config import TrainConfig
from hessrank.fl.loop import Federation
from hessrank.fl.protocol import ClientData
from hessrank.models import build_model

__all__ = ["Setup", "build_setup"]

Pair = tuple[Tensor, Tensor]


@dataclass
class Setup:
    """A run's data and algorithm.

    config: the config with the algorithm's notes added (those already there win).
    clients: every client's training data, in the run's dtype and on its device.
    test, train: the test set and the union of the clients' training data (evaluation).
    validation: the server's held-out split (``validation_fraction``), or None.
    holdout: per client, its held-out samples (``client_holdout``), or None.
    """

    config: TrainConfig
    dataset: Dataset
    partition: Partition
    federation: Federation
    clients: list[ClientData]
    test: Pair
    train: Pair
    input_shape: tuple[int, ...]
    num_outputs: int
    validation: Pair | None = None
    holdout: list[Pair] | None = None


def split_data(config: TrainConfig, labels: Tensor) -> Partition:
    """The partition over the samples left after the validation split, in dataset indices,
    with per-client holdouts (``params["validation_indices"]``, ``params["holdout_indices"]``
    when either split is used)."""
    n = int(labels.shape[0])
    pool, val = np.arange(n), np.zeros(0, dtype=np.int64)
    if config.validation_fraction > 0:
        perm = np.random.default_rng([config.seed, 7]).permutation(n)
        k = min(max(1, round(config.validation_fraction * n)), n - config.clients)
        val, pool = np.sort(perm[:k]), np.sort(perm[k:])
    part = make_partition(
        labels[torch.as_tensor(pool)], config.clients, config.partition,
        alpha=config.dirichlet_alpha, shards_per_client=config.shards_per_client,
        min_size=config.min_client_size, seed=config.seed,
    )  # fmt: skip
    if config.validation_fraction == 0 and config.client_holdout == 0:
        return part
    indices, holdout = [pool[idx] for idx in part.indices], []
    for c, idx in enumerate(indices):
        if config.client_holdout > 0:
            perm = np.random.default_rng([config.seed, 11, c]).permutation(idx)
            k = min(round(config.client_holdout * len(idx)), len(idx) - 1)
            holdout.append(np.sort(perm[:k]).tolist())
            indices[c] = np.sort(perm[k:])
    params = {**part.params, "validation_fraction": config.validation_fraction,
              "validation_indices": val.tolist(), "client_holdout": config.client_holdout,
              "holdout_indices": holdout}  # fmt: skip
    return Partition(part.scheme, part.num_clients, part.seed, tuple(indices), params)


def _cast(t: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _misfit(config: TrainConfig, ds: Dataset, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"model {config.model!r} with model_kwargs {config.model_kwargs} does not fit "
        f"dataset {config.dataset!r} (inputs {tuple(ds.input_shape)}, {ds.output_dim} "
        f"outputs): {first}"
    )


def _check_natural(config: TrainConfig, ds: Dataset) -> None:
    """The natural partition needs the dataset's own groups and one client per group."""
    if config.partition != "natural":
        return
    if "train_groups" not in ds.meta:
        raise ValueError(
            f"--partition natural needs a dataset with its own clients (shakespeare's roles, "
            f"hetero-lsq's groups); {config.dataset!r} has none: use iid, dirichlet or shards"
        )
    names = ds.meta.get("clients")
    count = len(names) if names is not None else len(np.unique(ds.meta["train_groups"]))
    if config.clients != count:
        shown = f" ({', '.join(map(str, names[:3]))}, ...)" if names is not None else ""
        roles = (f", or keep {config.clients} roles with --dataset-kwargs "
                 f"'{{\"roles\": {config.clients}}}'" if config.dataset == "shakespeare" else "")
        raise ValueError(
            f"--partition natural gives one client per group and dataset {config.dataset!r} "
            f"has {count}{shown}, not --clients {config.clients}; pass --clients {count}{roles}"
        )


def build_setup(
    config: TrainConfig,
    partition_json: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> Setup:
    """Data, partition, model and algorithm of ``config``, exactly as a run builds them.

    Args:
        partition_json: a saved partition (resume); None: split the data now.
        device: where model and data live (default: the CPU).
    Raises:
        ValueError: the model does not fit the dataset, or the algorithm refuses the config
            (one line each).
    """
    dtype = getattr(torch, config.dtype)
    ds = load_dataset(
        config.dataset, root=config.data_root, seed=config.seed, **config.dataset_kwargs
    )
    if partition_json is not None:
        part = Partition.from_json(partition_json)
    else:
        _check_natural(config, ds)
        part = split_data(config, ds.meta.get("train_groups", ds.train_y))  # hetero-lsq: groups
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, ds.input_shape, ds.output_dim, **config.model_kwargs)
    except (TypeError, RuntimeError, ValueError) as err:
        raise _misfit(config, ds, err) from None
    add_run_adapters(model, config)  # before the dtype: float32 and float64 runs share A
    try:
        model = model.to(dtype=dtype, device=device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a dry forward pass
            ds.task.forward(model.eval(), _cast(ds.train_x[:2], dtype, device))
        model.train()
    except (TypeError, RuntimeError, ValueError) as err:
        raise _misfit(config, ds, err) from None
    federation = Federation.build(model, config, ds.task)
    config.notes = {**federation.notes(), **config.notes}

    def subset(idx: Any) -> Pair:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return _cast(ds.train_x[index], dtype, device), _cast(ds.train_y[index], dtype, device)

    clients = []
    for cid, idx in enumerate(part.indices):
        x, y = subset(idx)
        clients.append(ClientData(cid, x, y))
    val_idx = part.params.get("validation_indices") or []
    holdout_idx = part.params.get("holdout_indices") or []
    split = bool(val_idx) or bool(holdout_idx)
    full = (_cast(ds.train_x, dtype, device), _cast(ds.train_y, dtype, device))
    return Setup(
        config, ds, part, federation, clients,
        test=(_cast(ds.test_x, dtype, device), _cast(ds.test_y, dtype, device)),
        train=subset(np.concatenate(part.indices)) if split else full,
        input_shape=tuple(ds.input_shape), num_outputs=ds.output_dim,
        validation=subset(val_idx) if val_idx else None,
        holdout=[subset(h) for h in holdout_idx] if holdout_idx else None,
    )  # fmt: skip
