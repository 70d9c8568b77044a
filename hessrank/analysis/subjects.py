"""Subjects of a Hessian analysis: whose loss is differentiated (docs/design.md, analysis).

A *subject* is a data set at the global weights: the server (all training data, the pooled
loss L = Σ_c (n_c/N) L_c), a client c (its partition, L_c), a random subset of n training
samples, or the test set. Specs are strings:

    server            the pooled training loss
    clients           every client;  clients:0,3,5  the listed ones
    subset:NxD        D random subsets of N training samples each (seeded draws)
    test              the test set

Subjects that can share products are grouped, and each group becomes ONE stacked operator:
server and clients together are a :class:`~hessrank.curvature.FederatedOperator` (all
clients' products in one batched call when its deterministic rule finds that the stacked
strategy applies, else one pass per client serving C_c and C; the rule reads shapes and the
memory budget, never timings, and the operator's ``route`` records its choice), the D draws of
a subset size are a stack of D operators.

Inputs may be tensors, tuples or dicts of tensors (:mod:`hessrank.data.inputs`); subsets and
pooled data are cut and joined through those helpers.

Example:
    >>> [s.label for s in parse_subjects("server,clients:0,2,subset:50x3")]
    ['server', 'clients:0,2', 'subset:50x3']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from hessrank.analysis.distributed import shard_pair
from hessrank.curvature import CurvatureOperator, FederatedOperator, LossFn, curvature_class
from hessrank.data.inputs import cat_inputs, index_inputs
from hessrank.linalg.stack import OperatorStack

__all__ = [
    "KINDS",
    "OperatorStack",
    "Subject",
    "SubjectGroup",
    "SubjectSpec",
    "build_operator",
    "draw_subset",
    "parse_subjects",
    "realize",
]

KINDS = ("server", "client", "subset", "test")
"""Values of ``Subject.kind`` (the ``subject_kind`` column of the results table)."""

VALID_FORMS = "server, clients, clients:0,3,5, subset:NxD (e.g. subset:50x5), test"
_SUBSET = re.compile(r"^subset:(\d+)x(\d+)$")

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class SubjectSpec:
    """One parsed subject spec.

    kind: "server", "clients", "subset" or "test".
    clients: for "clients", the selected client ids (None: every client).
    size, draws: for "subset", N samples per draw and D draws.
    """

    kind: str
    clients: tuple[int, ...] | None = None
    size: int = 0
    draws: int = 0

    @property
    def label(self) -> str:
        if self.kind == "clients" and self.clients is not None:
            return "clients:" + ",".join(str(c) for c in self.clients)
        if self.kind == "subset":
            return f"subset:{self.size}x{self.draws}"
        return self.kind


def _split_specs(spec: str) -> list[str]:
    """Split "server,clients:0,3,subset:5x2" at commas that start a new spec."""
    out: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.isdigit() and out and out[-1].startswith("clients:"):
            out[-1] += "," + token  # continuation of a client list
        else:
            out.append(token)
    return out


def _parse_one(token: str) -> SubjectSpec:
    bad = ValueError(f"unknown subject {token!r}; valid forms: {VALID_FORMS}")
    if token in ("server", "test", "clients"):
        return SubjectSpec(kind=token)
    if token.startswith("clients:"):
        ids = [t.strip() for t in token[len("clients:") :].split(",") if t.strip()]
        if not ids or not all(t.isdigit() for t in ids):
            raise bad
        return SubjectSpec(kind="clients", clients=tuple(sorted({int(t) for t in ids})))
    m = _SUBSET.match(token)
    if m:
        size, draws = int(m.group(1)), int(m.group(2))
        if size < 1 or draws < 1:
            raise ValueError(
                f"subject {token!r} needs N >= 1 samples and D >= 1 draws; e.g. subset:50x5"
            )
        return SubjectSpec(kind="subset", size=size, draws=draws)
    raise bad


def parse_subjects(spec: str | Sequence[str]) -> list[SubjectSpec]:
    """Parse subject specs (a comma-separated string or a sequence of strings).

    Client selections are merged ("clients" wins over "clients:…"), duplicates dropped, order
    kept. Raises ValueError naming the bad spec and the valid forms.
    """
    # a sequence is the comma-split string (--subjects server,clients:0,2 arrives as
    # ("server", "clients:0", "2")): joined again, so a client list survives the split
    tokens = _split_specs(spec if isinstance(spec, str) else ",".join(str(s) for s in spec))
    if not tokens:
        raise ValueError(f"no subjects given; valid forms: {VALID_FORMS}")
    specs: list[SubjectSpec] = []
    for token in tokens:
        s = _parse_one(token)
        if s.kind == "clients":
            prev = next((i for i, o in enumerate(specs) if o.kind == "clients"), None)
            if prev is not None:
                old = specs[prev]
                if old.clients is None or s.clients is None:
                    merged = None
                else:
                    merged = tuple(sorted(set(old.clients) | set(s.clients)))
                specs[prev] = SubjectSpec(kind="clients", clients=merged)
                continue
        if s not in specs:
            specs.append(s)
    return specs


@dataclass(frozen=True)
class Subject:
    """A realized subject: a name for the table, its kind, its data and how it was drawn.

    name: "server", "client3", "subset50_2" (third draw of size 50), "test".
    data_seed: for subset draws, the seed of ``numpy.random.default_rng`` that drew the indices
        (``draw_subset`` reproduces them from it); -1 otherwise.
    """

    name: str
    kind: str
    size: int
    data: Pair | None = field(default=None, repr=False, compare=False)
    data_seed: int = -1


@dataclass(frozen=True)
class SubjectGroup:
    """Subjects estimated together on one stacked operator (one unit of work per round).

    label: file-name-safe name of the group ("server+clients", "subset50x5", "test").
    subjects: the subjects reported, in the order of ``index``.
    index: position of each reported subject in the stacked operator.
    federated: build a FederatedOperator over ``client_data`` (server at index K).
    pooled: build one HessianOperator over all client data (server alone).
    """

    label: str
    subjects: tuple[Subject, ...]
    index: tuple[int, ...]
    federated: bool = False
    pooled: bool = False
    client_data: tuple[Pair, ...] = field(default=(), repr=False, compare=False)


def draw_subset(num_train: int, size: int, data_seed: int) -> np.ndarray:
    """Sorted indices of ``size`` distinct training samples drawn with ``data_seed``."""
    rng = np.random.default_rng(int(data_seed))
    return np.sort(rng.choice(num_train, size=size, replace=False))


def subset_seed(seed: int, size: int, draw: int) -> int:
    """The data seed of draw ``draw`` of size ``size`` under analysis seed ``seed``.

    Independent of the round, so every round sees the same subsets (paired comparisons).
    """
    return int(np.random.SeedSequence([int(seed), int(size), int(draw)]).generate_state(1)[0])


def _pool(pairs: Sequence[Pair]) -> Pair:
    return cat_inputs([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def realize(
    specs: Sequence[SubjectSpec],
    *,
    client_data: Sequence[Pair],
    train: Pair | None = None,
    test: Pair | None = None,
    seed: int = 0,
) -> list[SubjectGroup]:
    """Turn parsed specs into groups of subjects with their data.

    Args:
        specs: from :func:`parse_subjects`.
        client_data: (inputs, targets) per client; the server's data is their union.
        train: the training set subsets are drawn from (default: the union of the clients).
        test: the test set (needed by "test").
        seed: seeds the subset draws (see :func:`subset_seed`).
    Returns:
        Groups in a fixed order: server/clients first, then subsets by spec, then test.
    """
    K = len(client_data)
    sizes = [int(y.shape[0]) for _, y in client_data]
    want_server = any(s.kind == "server" for s in specs)
    cspec = next((s for s in specs if s.kind == "clients"), None)
    groups: list[SubjectGroup] = []
    if cspec is not None or want_server:
        if K == 0:
            raise ValueError("the run has no clients: subjects server/clients need client data")
        ids: tuple[int, ...] = ()
        if cspec is not None:
            ids = tuple(range(K)) if cspec.clients is None else cspec.clients
            bad = [c for c in ids if c >= K]
            if bad:
                raise ValueError(
                    f"client ids {bad} do not exist: the run has {K} clients (0..{K - 1})"
                )
        clients = tuple(
            Subject(f"client{c}", "client", sizes[c], data=client_data[c]) for c in ids
        )
        server = Subject("server", "server", sum(sizes))
        label = "clients" if cspec is None else cspec.label.replace(":", "-")
        if want_server and ids:
            groups.append(SubjectGroup(
                label="server+" + label, subjects=(*clients, server), index=(*ids, K),
                federated=True, client_data=tuple(client_data),
            ))
        elif want_server:
            groups.append(SubjectGroup(
                label="server", subjects=(server,), index=(0,), pooled=True,
                client_data=tuple(client_data),
            ))
        else:
            groups.append(SubjectGroup(label=label, subjects=clients,
                                       index=tuple(range(len(ids)))))
    if train is None and K:
        train = _pool(client_data)
    for s in specs:
        if s.kind != "subset":
            continue
        if train is None:
            raise ValueError("subset subjects need training data; none was given")
        n_train = int(train[1].shape[0])
        if s.size > n_train:
            raise ValueError(
                f"subject {s.label!r} asks for {s.size} samples but the training set has "
                f"{n_train}; use N <= {n_train}"
            )
        draws = []
        for d in range(s.draws):
            ds = subset_seed(seed, s.size, d)
            idx = torch.as_tensor(draw_subset(n_train, s.size, ds))
            draws.append(Subject(f"subset{s.size}_{d}", "subset", s.size,
                                 data=(index_inputs(train[0], idx), train[1][idx]),
                                 data_seed=ds))
        groups.append(SubjectGroup(label=f"subset{s.size}x{s.draws}", subjects=tuple(draws),
                                   index=tuple(range(s.draws))))
    if any(s.kind == "test" for s in specs):
        if test is None or int(test[1].shape[0]) == 0:
            raise ValueError("subject 'test' needs a test set; this data has none")
        groups.append(SubjectGroup(
            label="test", subjects=(Subject("test", "test", int(test[1].shape[0]), data=test),),
            index=(0,),
        ))
    return groups


def build_operator(
    group: SubjectGroup, model: nn.Module, loss_fn: LossFn, *, curvature: str = "hessian",
    shard: tuple[int, int] | None = None, **operator_kwargs,
) -> FederatedOperator | CurvatureOperator | OperatorStack:
    """The stacked operator of a group; ``group.index`` says where each subject sits in it.

    ``curvature`` ("hessian", "ggn" or "fisher") picks the matrix; ``operator_kwargs`` go to
    every curvature operator (params, mode, batch_size, process_group, ...). ``shard`` =
    (rank, world): build on this rank's slice of every subject's data
    (:func:`hessrank.analysis.distributed.shard_pair`; the server's slice is the union of the
    clients' slices); pass ``process_group`` with it so products are summed over the ranks.
    """
    def part(pair: Pair, what: str) -> Pair:
        return pair if shard is None else shard_pair(pair, *shard, what=what)

    clients = [part(d, f"client {c}") for c, d in enumerate(group.client_data)]
    if group.federated:
        return FederatedOperator(model, loss_fn, clients, curvature, **operator_kwargs)
    cls = curvature_class(curvature)
    if group.pooled:
        return cls(model, loss_fn, _pool(clients), **operator_kwargs)
    data = [part(s.data, f"subject {s.name}") for s in group.subjects]
    ops = [cls(model, loss_fn, d, **operator_kwargs) for d in data]
    return ops[0] if len(ops) == 1 else OperatorStack(ops)
