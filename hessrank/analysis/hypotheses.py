"""The hypothesis kinds of a study spec: one registry, one entry per kind.

Each :class:`HypothesisKind` carries everything the pipeline needs of a kind: its
``[[hypotheses]]`` table (a pydantic model: keys, types, defaults, the words of the CLI help
and the JSON schema), the check against the rest of the spec that runs before anything
trains (``check``: the subjects, controls or recorded updates the kind reads must be asked
for), and the units frame it tests (``units``: one value per replicate × round × arm × unit,
see :mod:`hessrank.analysis.inference`). A new kind is one model, two functions and one
entry in :data:`KINDS`.

    client-server   per client: f(srank_client) − f(srank_server), unit = client
    subset-size     draws of size small − draws of size large (or the server), unit = draw
    nested          the same between nested subsets S_small ⊂ S_large, unit = nested chain
    alignment       A_rank − A_full: of recorded client updates (unit = client) or of
                    gradients per layer (unit = layer)
    matched-size    per client: client − mean of its size-matched random subsets
    matched-label   per client: client − mean of its label-matched random subsets (class
                    labels)
    matched-histogram  per client: client − mean of its character-histogram-matched random
                    subsets (next-token data: a sample is a sequence, with no class label)

The matched kinds that match a histogram are checked against the [train] dataset's task
(:class:`SpecContext` ``targets``): matched-label on token sequences, matched-histogram on
class labels and both on regression targets are refused in one line naming the kind that
fits. f is the hypothesis's transform (identity or log). This module imports only pydantic and the
standard library at load time (the CLI help reads it); the unit builders import the
analysis code when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from hessrank.analysis.schema import Table

__all__ = [
    "KINDS",
    "Hypothesis",
    "HypothesisKind",
    "HypothesisTable",
    "SpecContext",
    "kinds_help",
]


@dataclass(frozen=True)
class SpecContext:
    """What a kind's check may ask of the rest of the spec (built by
    :mod:`hessrank.analysis.spec` from the validated tables).

    subset_sizes: sizes of the ``subset:NxD`` subjects of [analyze]; server, clients: whether
    the server / any client is analyzed; row_quantities: the ``quantity`` values the [analyze]
    quantities produce; alignment_ranks: of [analyze] (0 = full); nested_sizes,
    matched_draws: of [controls]; record_updates: of [train]; targets: what a sample's
    target is, by the [train] dataset's task ("labels": one class, "tokens": a sequence of
    token ids, "values": regression targets, "" when unknown).
    """

    subset_sizes: frozenset[int] = frozenset()
    server: bool = False
    clients: bool = False
    row_quantities: frozenset[str] = frozenset()
    alignment_ranks: frozenset[int] = frozenset()
    nested_sizes: frozenset[int] = frozenset()
    matched_draws: int = 0
    record_updates: bool = False
    targets: str = ""


class HypothesisTable(Table):
    """The keys every ``[[hypotheses]]`` table has."""

    name: str = Field(min_length=1, description="unique name, the row label in hypotheses.csv")
    min_effect: float = Field(gt=0, description="δ > 0: the smallest effect that matters, in "
                              "the units of the transformed difference, stated before the run")
    transform: Literal["identity", "log"] = Field(
        "identity", description="applied to each value before the difference (log: a log "
        "ratio)")
    quantity: str = Field("stable-rank", description="the table's quantity the difference is "
                          "taken of (a row quantity of [analyze] quantities)")


class ClientServer(HypothesisTable):
    kind: Literal["client-server"]


class SubsetSize(HypothesisTable):
    kind: Literal["subset-size"]
    small: int = Field(ge=1, description="n of the smaller random subsets (subset:NxD)")
    large: Union[Annotated[int, Field(ge=1)], Literal["server"]] = Field(  # noqa: UP007
        description="n of the larger random subsets, or \"server\" (all training data)")

    @model_validator(mode="after")
    def _sizes_differ(self) -> SubsetSize:
        if self.small == self.large:
            raise ValueError(f"small and large are both {self.small}; compare two sizes")
        return self


class Nested(HypothesisTable):
    kind: Literal["nested"]
    small: int = Field(ge=1, description="n of the smaller nested subset ([controls] "
                       "nested_sizes)")
    large: int = Field(ge=1, description="n of the larger nested subset, containing the "
                       "smaller")

    @model_validator(mode="after")
    def _sizes_differ(self) -> Nested:
        if self.small == self.large:
            raise ValueError(f"small and large are both {self.small}; compare two sizes")
        return self


class Alignment(HypothesisTable):
    kind: Literal["alignment"]
    rank: int = Field(ge=1, description="r of A_r − A_full (alignment of rank-r truncations)")
    source: Literal["gradients", "updates"] | None = Field(
        None, description="updates: the recorded client updates ([train] record_updates), "
        "unit = client; gradients: the gradient alignment rows of [analyze], unit = layer; "
        "default: updates when [train] records them")
    layers: list[str] | None = Field(None, description="weight matrices averaged (recorded "
                                     "updates only; default: all)")
    quantity: str = Field("alignment", description="the table's quantity (gradients only)")

    def from_updates(self, record_updates: bool) -> bool:
        """True when this hypothesis tests recorded updates (``source``, or by default when
        [train] records them)."""
        default = "updates" if record_updates else "gradients"
        return (self.source or default) == "updates"


class MatchedSize(HypothesisTable):
    kind: Literal["matched-size"]


class MatchedLabel(HypothesisTable):
    kind: Literal["matched-label"]


class MatchedHistogram(HypothesisTable):
    kind: Literal["matched-histogram"]


# ---- checks against the rest of the spec ------------------------------------------------------
def _quantity(h: HypothesisTable, ctx: SpecContext) -> str | None:
    if h.quantity not in ctx.row_quantities:
        return (f"quantity {h.quantity!r} is not computed by [analyze] quantities (rows: "
                f"{', '.join(sorted(ctx.row_quantities)) or 'none'})")
    return None


def _check_client_server(h: ClientServer, ctx: SpecContext) -> str | None:
    if not (ctx.server and ctx.clients):
        return "client-server needs the server and clients among [analyze] subjects"
    return _quantity(h, ctx)


def _check_subset_size(h: SubsetSize, ctx: SpecContext) -> str | None:
    missing = [f"subset:{n}xD" for n in (h.small, h.large)
               if n != "server" and n not in ctx.subset_sizes]
    if missing:
        have = ", ".join(f"subset:{n}xD" for n in sorted(ctx.subset_sizes)) or "none"
        return f"[analyze] subjects lack {', '.join(missing)} (subsets analyzed: {have})"
    if h.large == "server" and not ctx.server:
        return "large = \"server\" needs the server among [analyze] subjects"
    return _quantity(h, ctx)


def _controls_quantity(h: HypothesisTable) -> str | None:
    if h.quantity != "stable-rank":
        return f"{h.kind} compares control subjects, which have stable-rank rows only"
    return None


def _check_nested(h: Nested, ctx: SpecContext) -> str | None:
    missing = sorted({h.small, h.large} - ctx.nested_sizes)
    if missing:
        return (f"[controls] nested_sizes lacks {missing} (has "
                f"{sorted(ctx.nested_sizes) or 'none'})")
    return _controls_quantity(h)


def _check_alignment(h: Alignment, ctx: SpecContext) -> str | None:
    if h.from_updates(ctx.record_updates):
        if not ctx.record_updates:
            return "source = \"updates\" needs record_updates = true in [train]"
        return None
    if h.layers is not None:
        return "layers applies to recorded updates only (source = \"updates\")"
    if "alignment" not in ctx.row_quantities:
        return "alignment of gradients needs quantities = \"...,alignment\" in [analyze]"
    if h.rank not in ctx.alignment_ranks or 0 not in ctx.alignment_ranks:
        return (f"[analyze] alignment_ranks must hold {h.rank} and full (has "
                f"{sorted(ctx.alignment_ranks)})")
    return None


# what each matched kind matches, by the targets it needs (controls.matched_kinds draws them)
_MATCHED_TARGETS = {"matched-label": "labels", "matched-histogram": "tokens"}
_TARGET_WORDS = {"labels": "class labels (one per sample)",
                 "tokens": "next-token targets (a sequence of tokens per sample)",
                 "values": "regression targets (no class or token histogram)"}


def _check_matched(h: HypothesisTable, ctx: SpecContext) -> str | None:
    if ctx.matched_draws < 1:
        return f"{h.kind} needs [controls] matched_draws >= 1"
    if not ctx.clients:
        return f"{h.kind} needs clients among [analyze] subjects"
    need = _MATCHED_TARGETS.get(h.kind)
    if need and ctx.targets and ctx.targets != need:
        fits = [k for k, t in _MATCHED_TARGETS.items() if t == ctx.targets]
        way = (f"use kind = \"{fits[0]}\"" if fits
               else "matched-size is the control that applies")
        return (f"{h.kind} matches {_TARGET_WORDS[need]}, but this study's dataset has "
                f"{_TARGET_WORDS[ctx.targets]}: {way}")
    return _controls_quantity(h)


# ---- units frames -----------------------------------------------------------------------------
# The builders import the analysis code when they run: the registry is read by
# `hessrank study --help`, which must not import pandas or scipy.
def _units_client_server(table, h: ClientServer, updates=None):
    from hessrank.analysis import inference as inf  # keeps `hessrank study --help` fast

    return inf.client_server_units(table, h.quantity, h.transform)


def _units_subset(table, h: SubsetSize | Nested, updates=None):
    from hessrank.analysis import inference as inf  # keeps `hessrank study --help` fast

    kind = "subset" if h.kind == "subset-size" else "nested"
    return inf.subset_size_units(table, h.small, h.large, h.quantity, h.transform, kind=kind)


def _units_alignment(table, h: Alignment, updates=None):
    from hessrank.analysis import inference as inf  # keeps `hessrank study --help` fast

    if updates is not None:
        return inf.update_alignment_units(updates, h.rank, h.layers)
    return inf.alignment_units(table, h.rank, h.quantity)


def _units_matched(table, h: HypothesisTable, updates=None):
    """client − mean of its matched control draws, paired by (replicate, round, client)."""
    import pandas as pd  # keeps `hessrank study --help` fast

    from hessrank.analysis import inference as inf  # keeps `hessrank study --help` fast

    t = table[table["quantity"] == "stable-rank"]
    t = t.assign(value=inf.transform_values(t["value"].astype(float), h.transform))
    ctrl = t[t["subject_kind"] == h.kind]
    if ctrl.empty:
        raise ValueError(f"hypothesis {h.name!r} ({h.kind}) found no {h.kind} rows: it needs "
                         "[controls] matched_draws > 0 and targets it can match (class labels "
                         "for matched-label, token sequences for matched-histogram)")
    m = ctrl.groupby(["replicate", "round", "client"])["value"].mean()
    cl = t[t["subject_kind"] == "client"].copy()
    cl["client"] = cl["subject"].str.removeprefix("client").astype(int)
    ref = m.reindex(pd.MultiIndex.from_frame(cl[["replicate", "round", "client"]])).to_numpy()
    out = pd.DataFrame({"replicate": cl["replicate"].to_numpy(), "round": cl["round"].to_numpy(),
                        "arm": "a", "unit": cl["subject"].to_numpy(),
                        "value": cl["value"].to_numpy() - ref})
    return out.dropna(subset=["value"])


# ---- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HypothesisKind:
    """One kind of hypothesis (module doc).

    name: the ``kind`` value.  summary: what the difference is (CLI help, schema).
    model: its ``[[hypotheses]]`` table.  check: (hypothesis, :class:`SpecContext`) → an
    error message or None, run before anything trains.  units: (study table, hypothesis,
    recorded-update pairs or None) → units frame.  reads_updates: whether ``units`` takes the
    recorded-update pairs (then per hypothesis: ``model.from_updates``).
    """

    name: str
    summary: str
    model: type[HypothesisTable]
    check: Callable[[Any, SpecContext], str | None]
    units: Callable[..., Any]
    reads_updates: bool = False

    def keys(self) -> list[str]:
        """The keys of this kind's table beyond the common ones."""
        common = set(HypothesisTable.model_fields) | {"kind"}
        return [k for k in self.model.model_fields if k not in common]


KINDS: Mapping[str, HypothesisKind] = {k.name: k for k in (
    HypothesisKind("client-server", "per client f(client) − f(server); unit = client",
                   ClientServer, _check_client_server, _units_client_server),
    HypothesisKind("subset-size", "draws of size small − draws of size large (or the server);"
                   " unit = draw", SubsetSize, _check_subset_size, _units_subset),
    HypothesisKind("nested", "nested subsets S_small ⊂ S_large ([controls] nested_sizes); "
                   "unit = nested chain", Nested, _check_nested, _units_subset),
    HypothesisKind("alignment", "A_rank − A_full: recorded client updates (unit = client) or "
                   "gradients per layer (unit = layer)", Alignment, _check_alignment,
                   _units_alignment, reads_updates=True),
    HypothesisKind("matched-size", "client − mean of its size-matched random subsets "
                   "([controls] matched_draws); > 0: more than sample size explains",
                   MatchedSize, _check_matched, _units_matched),
    HypothesisKind("matched-label", "client − mean of its label-matched random subsets; > 0: "
                   "more than size and label histogram explain", MatchedLabel, _check_matched,
                   _units_matched),
    HypothesisKind("matched-histogram", "next-token data: client − mean of its random subsets "
                   "of as many sequences with a matched token histogram; > 0: more than size "
                   "and character histogram explain", MatchedHistogram, _check_matched,
                   _units_matched),
)}
"""Every hypothesis kind, by name."""

Hypothesis = Annotated[Union[tuple(k.model for k in KINDS.values())],  # noqa: UP007
                       Field(discriminator="kind")]
"""One ``[[hypotheses]]`` table of any kind (pydantic discriminated union on ``kind``)."""


def kinds_help() -> str:
    """The kinds and their keys, for ``hessrank study --help``."""
    lines = []
    width = max(len(name) for name in KINDS)
    for k in KINDS.values():
        keys = k.keys()
        lines.append(f"  {k.name:{width}s} {k.summary}" + (f" [keys: {', '.join(keys)}]"
                                                             if keys else ""))
    return "\n".join(lines)
