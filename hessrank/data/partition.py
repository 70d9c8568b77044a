"""Split a training set among federated clients: iid, Dirichlet label skew, label shards, or
the data's own groups (natural: one client per group, e.g. a Shakespeare role).

Dirichlet: Hsu, Qi & Brown (2019); shards: McMahan et al. (2017); natural: LEAF's
(Caldas et al., 2018). Every training index goes to
exactly one client, and a client with fewer than ``min_size`` samples is an error, never a
silent skip.

Example:
    >>> labels = np.repeat(np.arange(10), 50)
    >>> part = make_partition(labels, 5, "dirichlet", alpha=0.5, seed=0)
    >>> sum(part.sizes())
    500
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from hessrank.data.catalog import PARTITION_SCHEMES

__all__ = ["SCHEMES", "Partition", "make_partition"]

SCHEMES: tuple[str, ...] = PARTITION_SCHEMES
"""Names accepted by :func:`make_partition` (declared in the torch-free
:mod:`hessrank.data.catalog`)."""

MAX_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True, eq=False)
class Partition:
    """Which training indices each client holds.

    Attributes:
        scheme: "iid", "dirichlet", "shards" or "natural".
        num_clients: K, the number of clients.
        seed: the seed the split was drawn with.
        indices: K sorted int64 arrays of indices into the training set; disjoint, and together
            they cover 0..N−1.
        params: the settings used (``num_samples``, ``min_size``, and ``alpha``/``attempts`` for
            dirichlet, ``shards_per_client``/``num_shards`` for shards, ``groups`` — the group
            id of each client — for natural).

    Equality is identity (``eq=False``); compare ``to_json()`` outputs for value equality.
    """

    scheme: str
    num_clients: int
    seed: int
    indices: tuple[np.ndarray, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.indices) != self.num_clients:
            raise ValueError(
                f"partition has {len(self.indices)} index arrays for num_clients="
                f"{self.num_clients}; pass one array per client"
            )

    def sizes(self) -> list[int]:
        """n_c for each client c, in client order."""
        return [int(idx.shape[0]) for idx in self.indices]

    def weights(self) -> np.ndarray:
        """Size weights n_c / N, shape (K,), summing to 1 (the server loss weights)."""
        sizes = np.asarray(self.sizes(), dtype=np.float64)
        return sizes / sizes.sum()

    def label_counts(
        self, labels: np.ndarray | Tensor, num_classes: int | None = None
    ) -> np.ndarray:
        """Per-client class histogram, shape (K, num_classes); row c counts client c's labels."""
        y = _as_numpy(labels).astype(np.int64)
        classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
        return np.stack([np.bincount(y[idx], minlength=classes) for idx in self.indices])

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict; :meth:`from_json` inverts it."""
        return {
            "scheme": self.scheme,
            "num_clients": self.num_clients,
            "seed": self.seed,
            "params": dict(self.params),
            "indices": [idx.tolist() for idx in self.indices],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Partition:
        """Rebuild a partition from :meth:`to_json` output."""
        missing = sorted({"scheme", "num_clients", "seed", "indices"} - set(d))
        if missing:
            raise ValueError(
                f"partition JSON lacks key(s) {', '.join(missing)}; pass the dict written by "
                "Partition.to_json"
            )
        return cls(
            scheme=str(d["scheme"]),
            num_clients=int(d["num_clients"]),
            seed=int(d["seed"]),
            indices=tuple(np.sort(np.asarray(i, dtype=np.int64)) for i in d["indices"]),
            params=dict(d.get("params", {})),
        )


def _as_numpy(labels: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(labels, Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _finish(
    scheme: str, num_clients: int, seed: int, parts: list[np.ndarray], params: dict[str, Any]
) -> Partition:
    indices = tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    return Partition(scheme, num_clients, seed, indices, params)


def _check_sizes(parts: list[np.ndarray], min_size: int, hint: str) -> None:
    sizes = [len(p) for p in parts]
    smallest = int(np.argmin(sizes))
    if sizes[smallest] < min_size:
        raise ValueError(
            f"client {smallest} got only {sizes[smallest]} samples (min_size={min_size}); {hint}"
        )


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_clients))


def _dirichlet_once(
    y: np.ndarray, classes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: for each class k, p_k ~ Dir(α·1_K); client c gets ≈ p_kc of class k's samples."""
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in classes:
        idx = rng.permutation(np.flatnonzero(y == k))
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for c, chunk in enumerate(np.split(idx, cuts)):
            buckets[c].append(chunk)
    return [np.concatenate(b) for b in buckets]


def make_partition(
    labels: np.ndarray | Tensor,
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
    seed: int = 0,
) -> Partition:
    """Split N training samples among ``num_clients`` clients.

    - ``iid``: a seeded permutation cut into K near-equal parts (sizes differ by at most 1).
    - ``dirichlet``: for each class k, proportions p_k ~ Dir(α·1_K) over the clients; client c
      gets ⌊·⌋-rounded p_kc of class k. Smaller α, stronger label skew. Draws repeat from the
      same generator (deterministically) until every client has ``min_size`` samples, at most
      100 times; ``params["attempts"]`` records how many were needed.
    - ``shards``: indices sorted by label (random order within a class), cut into
      K·``shards_per_client`` near-equal shards; each client gets ``shards_per_client`` shards
      at random.
    - ``natural``: ``labels`` are group ids (a Shakespeare role, a hetero-lsq group); client c
      holds every sample of the c-th smallest group id, so K must equal the number of distinct
      groups. Nothing is drawn (``seed`` is only recorded).

    Args:
        labels: shape (N,) integer class labels, or group ids for ``natural``; float or (N, d)
            targets (regression) allow only ``iid``.
        num_clients: K >= 1.
        scheme: one of :data:`SCHEMES`.
        alpha: Dirichlet concentration (> 0), dirichlet only.
        shards_per_client: shards per client (>= 1), shards only.
        min_size: the fewest samples a client may hold (>= 1).
        seed: seeds every draw; same seed, same partition.
    Returns:
        A :class:`Partition` with sorted int64 indices per client.
    """
    y = _as_numpy(labels)
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}"
        )
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}; pass a positive count")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}; empty clients are not allowed")
    if y.ndim == 0:
        raise ValueError("labels must be an array with one entry per sample, got a scalar")
    n = int(y.shape[0])
    if n < num_clients * min_size:
        raise ValueError(
            f"{n} samples cannot give {num_clients} clients at least {min_size} each; "
            f"use at most {n // min_size} clients or a smaller min_size"
        )
    regression = y.ndim > 1 or not np.issubdtype(y.dtype, np.integer)
    if regression and scheme != "iid":
        raise ValueError(
            f"scheme {scheme!r} needs integer class labels of shape (N,), got dtype {y.dtype} "
            f"and shape {y.shape}; use scheme='iid' for regression targets"
        )
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {"num_samples": n, "min_size": min_size}

    if scheme == "natural":
        groups = np.unique(y)
        if len(groups) != num_clients:
            raise ValueError(
                f"the natural partition gives one client per group and the labels hold "
                f"{len(groups)} groups, not num_clients={num_clients}; pass num_clients="
                f"{len(groups)} (or choose the groups in the dataset, e.g. shakespeare's roles=)"
            )
        parts = [np.flatnonzero(y == g) for g in groups]
        _check_sizes(parts, min_size, "use a dataset option that drops small groups or a "
                     "smaller min_size")  # fmt: skip
        params["groups"] = [int(g) for g in groups]
        return _finish(scheme, num_clients, seed, parts, params)

    if scheme == "iid":
        parts = _iid(n, num_clients, rng)
        return _finish(scheme, num_clients, seed, parts, params)

    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}; pass e.g. alpha=0.5")
        classes = np.unique(y)
        for attempt in range(1, MAX_DIRICHLET_ATTEMPTS + 1):
            parts = _dirichlet_once(y, classes, num_clients, float(alpha), rng)
            if min(len(p) for p in parts) >= min_size:
                params.update(alpha=float(alpha), attempts=attempt)
                return _finish(scheme, num_clients, seed, parts, params)
        sizes = [len(p) for p in parts]
        smallest = int(np.argmin(sizes))
        raise ValueError(
            f"dirichlet partition failed after {MAX_DIRICHLET_ATTEMPTS} draws with alpha={alpha}: "
            f"client {smallest} got only {sizes[smallest]} samples (min_size={min_size}); use a "
            "larger alpha, fewer clients or a smaller min_size"
        )

    # shards
    if shards_per_client < 1:
        raise ValueError(
            f"shards_per_client must be >= 1, got {shards_per_client}; pass a positive count"
        )
    num_shards = num_clients * shards_per_client
    if n < num_shards:
        raise ValueError(
            f"{n} samples cannot be cut into {num_shards} shards ({num_clients} clients x "
            f"{shards_per_client}); use fewer clients or fewer shards_per_client"
        )
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    parts = [np.concatenate([shards[s] for s in row]) for row in owner]
    _check_sizes(
        parts, min_size, "use fewer clients, fewer shards_per_client or a smaller min_size"
    )
    params.update(shards_per_client=shards_per_client, num_shards=num_shards)
    return _finish(scheme, num_clients, seed, parts, params)
