"""The algorithm registry: one entry per federated algorithm, and the options each one reads.

An entry (:class:`AlgorithmEntry`) carries everything the pipeline and the command line need:
the one-line help, the option groups it reads (``TrainConfig`` is composed of every group
here, :mod:`hessrank.fl.config`; the CLI shows one help section per group), and where its
server strategy and client procedure live (``"module:Class"``, imported on first use, so that
reading the registry imports neither torch nor pydantic). The round protocol those two
implement is :mod:`hessrank.fl.protocol`.

An option group is a dataclass whose fields are config keys: a type (with its constraints as
``annotated_types`` metadata, which pydantic enforces) and a default with its help line
(:func:`option`), the one text both the CLI and the docs show. The constraint names
(:data:`CONSTRAINT_NAMES`) are resolved when the annotations are read, not imported here:
reading the registry for ``--help`` stays free of them. Cross-field rules go in the group's
``check(self, used)`` method, called on the whole config with ``used`` telling whether its
algorithm reads the group.

Adding an algorithm: a module with its strategy and client (``hessrank/fl/scaffold.py`` is
the worked example, about 170 lines), plus its option group and one entry here: two library
files and a test.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

if TYPE_CHECKING:
    from annotated_types import Ge, Gt, Interval

__all__ = [
    "ALGORITHMS",
    "AdapterOptions",
    "option_group",
    "CONSTRAINT_NAMES",
    "ALGORITHM_NAMES",
    "AlgorithmEntry",
    "FactorOptions",
    "FeDLRTOptions",
    "LoRAOptions",
    "LowRankOptions",
    "MergeOptions",
    "PersonalOptions",
    "ProxOptions",
    "ScaffoldOptions",
    "TierOptions",
    "algorithm_entry",
    "option",
]


CONSTRAINT_NAMES = ("Ge", "Gt", "Interval")
"""The ``annotated_types`` constraints the option annotations use; whoever evaluates the
annotations passes them (or stand-ins) as ``localns`` (:func:`hessrank.fl.config.field_types`)."""


option_group = dataclass(init=False, repr=False, eq=False)
"""The decorator of an option group: a dataclass for its fields only. A group is never
instantiated alone (its fields become TrainConfig's), so no methods are generated: building
them is what ``--help`` pays for reading the registry."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` and its help line (``metadata["help"]``); lists and
    dicts get a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ---- option groups ---------------------------------------------------------------------------
@option_group
class LowRankOptions:
    """Low-rank layers."""

    rank: Annotated[int, Ge(1)] = option(8, "r, rank of the LoRA factors (FeDLRT: initial rank)")
    factorize: list[str] | None = option(
        None, "comma-separated layer names to factorize (default: every Linear/Conv2d but the "
        "first and last)")  # fmt: skip
    factorize_rule: Literal["inner", "conv"] = option(
        "inner", "the layers factorized when --factorize is not given: inner (every "
        "Linear/Conv2d but the first and last) or conv (every Conv2d but the first, every "
        "Linear dense: the FedLoRU authors' code)")  # fmt: skip


@option_group
class LoRAOptions:
    """LoRA factors W0 + (alpha/r) B A."""

    lora_alpha: Annotated[float, Gt(0)] = option(8.0, "alpha; the low-rank update is (alpha/r) B A")
    from_scratch: bool | None = option(
        None, "W0 = 0 with both factors random (the papers' pure rank-r model); "
        "--no-from-scratch: W0 = dense init, B = 0 (default: from scratch)")  # fmt: skip

    def check(self, used: bool) -> None:
        if self.from_scratch is not None and not used:
            raise ValueError(
                f"config key 'from_scratch' applies to {', '.join(users(LoRAOptions))} only, not "
                f"{getattr(self, 'algo', '?')!r}; drop --from-scratch/--no-from-scratch"
            )


@option_group
class AdapterOptions:
    """PEFT adapters on a language model (the papers' LLM regime)."""

    adapters: Literal["peft"] | None = option(
        None, "peft: LoRA adapters from PEFT on the frozen base W0 of an hf-* model (random "
        "init, or pretrained: --model-path DIR); only the adapters are trained, sent, "
        "averaged and merged (default: hessrank's own LoRA layers)")  # fmt: skip
    lora_targets: Literal["attention", "mlp", "attention+mlp"] | None = option(
        None, "projections that get adapters with --adapters peft (default: attention)")

    def check(self, used: bool) -> None:
        algo, model = getattr(self, "algo", "?"), str(getattr(self, "model", ""))
        if not used:
            for key in ("adapters", "lora_targets"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"config key {key!r} applies to {', '.join(users(AdapterOptions))} "
                        f"only, not {algo!r}; drop --{key.replace('_', '-')}"
                    )
            return
        if self.adapters is None:
            if self.lora_targets is not None:
                raise ValueError("config key 'lora_targets' needs adapters='peft'; add "
                                 "--adapters peft or drop --lora-targets")  # fmt: skip
            if model.startswith("hf-"):
                raise ValueError(f"model {model!r} takes LoRA as PEFT adapters on its frozen "
                                 "base; add --adapters peft")  # fmt: skip
            return
        if not model.startswith("hf-"):
            raise ValueError(f"--adapters peft puts PEFT adapters on an hf-* language model, "
                             f"not {model!r}; use --model hf-gpt2 or hf-llama, or drop "
                             "--adapters for hessrank's own LoRA layers")  # fmt: skip
        for key in ("from_scratch", "factorize"):  # False: W0 = the base, B = 0 (as here)
            value = getattr(self, key, None)
            if value not in (None, False):
                raise ValueError(
                    f"config key {key!r} ({value!r}) is for hessrank's own LoRA layers; with "
                    "--adapters peft W0 is the model's base and the adapted projections are "
                    "--lora-targets: drop it"
                )
        # the factor options of hessrank's own LoRA layers: PEFT initializes its adapters
        # itself (A Kaiming-uniform, B = 0), has no low-rank dropout here, and FedLoRU's PEFT
        # merge re-initializes (merge_adapters)
        for key, neutral in (("lora_init", "dense-variance"), ("lowrank_dropout", 0.0),
                             ("merge_mode", "reinit"), ("factorize_rule", "inner")):  # fmt: skip
            value = getattr(self, key, neutral)
            if value != neutral:
                raise ValueError(
                    f"config key {key!r} ({value!r}) is for hessrank's own LoRA layers, not "
                    f"--adapters peft; drop it (or leave it at {neutral!r})"
                )


@option_group
class FactorOptions:
    """LoRA factors' initialization and dropout."""

    lora_init: Literal["dense-variance", "kaiming"] = option(
        "dense-variance", "from-scratch factor scales: dense-variance (A ~ U(+-1/sqrt(fan_in)), "
        "B ~ U(+-sqrt(3r)/alpha): (alpha/r) B A has the dense init's variance) or kaiming (A "
        "and B kaiming-uniform(a=sqrt(5)), B ~ U(+-1/sqrt(r)), factorized layers' bias 0: "
        "the FedLoRU authors' code)")  # fmt: skip
    lowrank_dropout: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.0, "dropout between A and B on the low-rank path during local training, masks "
        "seeded from the round generator (0: off; the FedLoRU authors' code: 0.1)")  # fmt: skip


@option_group
class MergeOptions:
    """FedLoRU's merges."""

    merge_every: Annotated[int, Ge(0)] = option(
        5, "tau: merge (alpha/r) B A into W0 every tau rounds (0: never)")
    merge_mode: Literal["reinit", "accumulate"] = option(
        "reinit", "reinit (the paper, ReLoRA: W0 += (alpha/r) B A, A redrawn, B = 0; function "
        "unchanged) or accumulate (the authors' merge(): W0 += (alpha/r) B A, A and B kept)")


@option_group
class PersonalOptions:
    """pFedLoRU's local (personal) pair A, B; the shared pair is L, U (the authors' rebuttal)."""

    personal_rank: Annotated[int, Ge(1)] = option(4, "personal rank r_p")
    personal_alpha: Annotated[float, Gt(0)] = option(4.0, "personal alpha_p")
    personal_order: Literal["LU-first", "AB-first", "global-first", "personal-first"] = option(
        "LU-first", "local phases: LU-first (the shared pair L, U first, then the local pair "
        "A, B: the rebuttal's order) or AB-first; global-first / personal-first are the "
        "deprecated names of the same two")  # fmt: skip
    personal_steps: Annotated[int, Ge(0)] = option(
        0, "steps on the personal pair (0: half the global phase's steps)")


@option_group
class TierOptions:
    """mFedLoRU's client tiers."""

    mfedloru_scheme: Literal["hierarchical", "width"] = option(
        "hierarchical", "hierarchical (the paper: nested rank-r_c updates of the global "
        "factors) or width (client trains the leading r_c components)")  # fmt: skip
    client_ranks: list[Annotated[int, Ge(1)]] | None = option(
        None, "comma-separated rank per client (default: cycle r, r/2, r/4)")


@option_group
class ProxOptions:
    """FedProx's proximal term."""

    prox_mu: Annotated[float, Ge(0)] = option(
        0.01, "mu: local objective L_c + (mu/2)||theta - theta_global||^2")


@option_group
class FeDLRTOptions:
    """FeDLRT's dynamical low-rank round."""

    correction: Literal["full", "simplified", "none"] = option(
        "full", "variance correction")
    trunc_theta: Annotated[float, Interval(ge=0.0, lt=1.0)] = option(
        0.02, "relative truncation threshold (0.1 blocks rank growth)")
    r_min: Annotated[int, Ge(1)] = option(2, "smallest rank")
    r_max: Annotated[int, Ge(1)] = option(64, "largest rank")
    fedlrt_init: Literal["scaled-svd", "svd"] = option(
        "scaled-svd", "scaled-svd (truncated SVD of the dense init, S rescaled to keep its "
        "Frobenius norm) or svd (plain truncated SVD)")  # fmt: skip
    fedlrt_weighting: Literal["uniform", "size"] = option(
        "uniform", "client weights: uniform (the paper's (1/C) sum_c L_c) or size (n_c / N)")
    rank_cap: Literal["none", "fedavg"] = option(
        "none", "none (ranks bounded by r_max only) or fedavg (per layer, also by the largest "
        "rank whose round, the rank doubled by the augmentation, sends no more floats than "
        "FedAvg's 2 m n; the starting rank too)")  # fmt: skip

    def check(self, used: bool) -> None:
        if self.r_max < self.r_min:
            raise ValueError(
                f"config key 'r_max' must be >= r_min, got r_min={self.r_min}, r_max={self.r_max}"
            )


@option_group
class ScaffoldOptions:
    """SCAFFOLD's server step."""

    server_lr: Annotated[float, Gt(0)] = option(
        1.0, "eta_g: global step x <- x + eta_g mean_c (y_c - x) (1: the average)")


# ---- entries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AlgorithmEntry:
    """One algorithm: its help, its option groups and its implementation.

    strategy / client: ``"module:Class"`` of its :class:`~hessrank.fl.protocol.Strategy` and
    :class:`~hessrank.fl.protocol.Client`. ``variant`` (optional): the name of a config key
    whose value picks one of ``variants`` (value → (strategy, client)) instead.
    """

    name: str
    summary: str
    strategy: str = ""
    client: str = ""
    options: tuple[type, ...] = ()
    variant: str | None = None
    variants: Mapping[str | None, tuple[str, str]] = field(default_factory=dict)

    def classes(self, config: Any) -> tuple[type, type]:
        """(Strategy class, Client class) for ``config`` (imports the module)."""
        strategy, client = self.strategy, self.client
        if self.variant is not None:
            strategy, client = self.variants[getattr(config, self.variant)]
        return _resolve(strategy), _resolve(client)

    def phases(self, config: Any) -> tuple[str, ...]:
        """The message phases of one round (the strategy's ``phases``)."""
        return self.classes(config)[0].phases


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_LORA = (LowRankOptions, LoRAOptions, FactorOptions)
_M = "hessrank.fl."
ALGORITHMS: dict[str, AlgorithmEntry] = {
    e.name: e
    for e in (
        AlgorithmEntry("fedavg", "FedAvg (McMahan et al., 2017)",
                       _M + "fedavg:FedAvg", _M + "fedavg:LocalSGD"),
        AlgorithmEntry("fedprox", "FedProx: FedAvg with a proximal local term (Li et al., 2020)",
                       _M + "fedavg:FedAvg", _M + "fedprox:ProxLocalSGD", (ProxOptions,)),
        AlgorithmEntry("fedlora", "LoRA factors trained federatedly, W0 frozen",
                       options=(*_LORA, AdapterOptions), variant="adapters",
                       variants={None: (_M + "fedlora:FedLoRA", _M + "fedlora:LoRALocalSGD"),
                                 "peft": (_M + "peft_lora:PeftFedLoRA", _M + "fedavg:LocalSGD")}),
        AlgorithmEntry("fedloru", "FedLoRU: FedLoRA plus merges (Park et al., 2024)",
                       options=(*_LORA, MergeOptions, AdapterOptions), variant="adapters",
                       variants={None: (_M + "fedloru:FedLoRU", _M + "fedlora:LoRALocalSGD"),
                                 "peft": (_M + "peft_lora:PeftFedLoRU", _M + "fedavg:LocalSGD")}),
        AlgorithmEntry("pfedloru", "pFedLoRU: FedLoRU plus a personal pair per client",
                       _M + "fedloru:PFedLoRU", _M + "fedloru:PersonalClient",
                       (*_LORA, MergeOptions, PersonalOptions)),
        AlgorithmEntry("mfedloru", "mFedLoRU: FedLoRU with client ranks r_c <= r",
                       options=(*_LORA, MergeOptions, TierOptions), variant="mfedloru_scheme",
                       variants={
                           "hierarchical": (_M + "mfedloru:HierarchicalMFedLoRU",
                                            _M + "mfedloru:NestedClient"),
                           "width": (_M + "mfedloru:WidthMFedLoRU", _M + "mfedloru:WidthClient"),
                       }),
        AlgorithmEntry("fedlrt", "FeDLRT: federated dynamical low-rank training "
                       "(Schotthöfer & Laiu, 2024)",
                       _M + "fedlrt:FeDLRT", _M + "fedlrt:FeDLRTClient",
                       (LowRankOptions, FeDLRTOptions)),
        AlgorithmEntry("scaffold", "SCAFFOLD: control variates, option II (Karimireddy et "
                       "al., 2020)", _M + "scaffold:Scaffold", _M + "scaffold:ScaffoldClient",
                       (ScaffoldOptions,)),
    )
}  # fmt: skip
"""Algorithm name → entry: the one algorithm registry."""

ALGORITHM_NAMES: tuple[str, ...] = tuple(ALGORITHMS)


def option_groups() -> tuple[type, ...]:
    """Every option group of the registry, once each, in order of first use."""
    seen: dict[type, None] = {}
    for entry in ALGORITHMS.values():
        seen.update(dict.fromkeys(entry.options))
    return tuple(seen)


def users(group: type) -> list[str]:
    """The algorithms that read ``group``."""
    return [name for name, e in ALGORITHMS.items() if group in e.options]


def algorithm_entry(name: str) -> AlgorithmEntry:
    """The entry of ``name``; ValueError naming the valid ones if there is none."""
    if name not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHM_NAMES)}"
        )
    return ALGORITHMS[name]
