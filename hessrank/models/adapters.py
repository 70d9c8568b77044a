"""LoRA adapters from PEFT on the hf-* language models (Hu et al., 2021): W = W0 + (α/r)·B·A.

:func:`add_lora` freezes every base weight W0 (pretrained or random-init) and puts a trainable
pair A (r × in), B (out × r) on each attention projection (optionally each MLP projection) of a
:class:`~hessrank.models.hf.CausalLM`; A starts Kaiming-uniform, B at zero, so the function is
unchanged. It checks that **every** intended projection got its adapter and that nothing but
the adapters is trainable, and returns the adapter parameter names: the parameters a
federated LoRA run trains and sends, and the ``params`` selection of an adapters-only Hessian.

Adapter state travels apart from the base in PEFT's own layout — keys
``base_model.model.<module>.lora_A.weight`` in ``adapter_model.safetensors`` beside
``adapter_config.json`` — so ``peft.PeftModel.from_pretrained`` reads what :func:`save_adapters`
writes, and :func:`load_adapters` reads what PEFT writes.

Targets ("attention", "mlp", or both joined by "+"):

    ==========  =============================================  ===================================
    family      attention                                      mlp
    ==========  =============================================  ===================================
    hf-gpt2     attn.c_attn (fused q, k, v), attn.c_proj       mlp.c_fc, mlp.c_proj
    hf-llama    self_attn.q_proj, k_proj, v_proj, o_proj       mlp.gate_proj, up_proj, down_proj
    ==========  =============================================  ===================================

Example:
    >>> from hessrank.models import build_model
    >>> _ = torch.manual_seed(0)
    >>> model = build_model("hf-llama", (16,), 97, layers=2, width=32, heads=2)
    >>> names = add_lora(model, rank=4)
    >>> len(names), names[0]
    (16, 'lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight')
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hessrank.models.hf import CausalLM

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "LORA_TARGETS",
    "adapter_names",
    "adapter_state_dict",
    "add_lora",
    "has_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
]

ADAPTER_FILE = "adapter_model.safetensors"
"""PEFT's file of adapter weights."""
ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's file of the adapter configuration."""

LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "hf-gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "hf-llama": {
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    },
}  # fmt: skip
"""Per family, the module-name suffixes adapted by each target group."""

_ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"LoRA adapters need the peft package, which does not import ({err}); install it "
            "with pip install 'hessrank[hf]'"
        ) from None
    return peft


def _require_lm(model: nn.Module) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise TypeError(
            f"PEFT adapters go on an hf-gpt2 / hf-llama model (a CausalLM), got "
            f"{type(model).__name__}; build it with build_model('hf-gpt2', ...)"
        )
    return model


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`CausalLM` carrying PEFT adapters."""
    return isinstance(model, CausalLM) and hasattr(model.lm, "peft_config")


def _suffixes(family: str, targets: str | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(targets, str):
        return tuple(targets)
    groups = LORA_TARGETS[family]
    chosen = targets.split("+")
    unknown = [g for g in chosen if g not in groups]
    if unknown:
        raise ValueError(
            f"unknown LoRA target group {unknown[0]!r}; use 'attention', 'mlp', "
            "'attention+mlp' or a list of module-name suffixes"
        )
    return tuple(s for g in chosen for s in groups[g])


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "attention",
) -> tuple[str, ...]:
    """Wrap ``model.lm`` in a PEFT LoRA model: base frozen, one adapter pair per target.

    Args:
        model: a :class:`CausalLM` without adapters (modified in place: ``model.lm`` becomes a
            ``peft.PeftModelForCausalLM``; draws A from torch's global RNG).
        rank: r, the adapters' rank (>= 1).
        alpha: α; the update is (α/r)·B·A.
        dropout: LoRA dropout on the adapter input (train mode only).
        targets: "attention" (default), "mlp", "attention+mlp", or module-name suffixes such
            as ``["q_proj", "v_proj"]``.
    Returns:
        The adapter parameter names, in ``model.named_parameters()`` order — exactly the
        trainable parameters.
    Raises:
        ValueError: a target matches no module, an intended projection got no adapter, or a
            parameter other than the adapters stays trainable.
    """
    peft = _peft()
    model = _require_lm(model)
    if has_adapters(model):
        raise ValueError("the model already has adapters; build a fresh model to add new ones")
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}; pass e.g. rank=8")
    suffixes = _suffixes(model.family, targets)
    wanted = [name for name, _ in model.lm.named_modules()
              if any(name == s or name.endswith("." + s) for s in suffixes)]  # fmt: skip
    missing = [s for s in suffixes
               if not any(n == s or n.endswith("." + s) for n in wanted)]  # fmt: skip
    if missing:
        raise ValueError(
            f"LoRA target {missing[0]!r} matches no module of the {model.family} model; "
            f"valid groups: {', '.join(LORA_TARGETS[model.family])}"
        )
    config = peft.LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
        target_modules=wanted, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=model.family == "hf-gpt2",  # GPT-2's Conv1D stores W transposed
    )  # fmt: skip
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 name deprecated in v6
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model.lm = peft.get_peft_model(model.lm, config, adapter_name=_ADAPTER)
    adapted = {name.removeprefix("base_model.model.") for name, m in model.lm.named_modules()
               if hasattr(m, "lora_A") and _ADAPTER in m.lora_A}  # fmt: skip
    skipped = [n for n in wanted if n not in adapted]
    if skipped:
        raise ValueError(f"PEFT put no adapter on {skipped[0]!r} ({len(skipped)} skipped)")
    names = adapter_names(model)
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    if trainable != names:
        extra = sorted(set(trainable) - set(names))
        raise ValueError(f"non-adapter parameters stay trainable after add_lora: {extra[:3]}")
    return names


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the LoRA parameters (A and B of every adapted module) in
    ``model.named_parameters()`` order; empty without adapters."""
    return tuple(n for n, _ in model.named_parameters()
                 if ".lora_A." in n or ".lora_B." in n)  # fmt: skip


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors (detached copies) under PEFT's file keys
    (``base_model.model.<module>.lora_A.weight``), nothing of the base."""
    peft = _peft()
    model = _require_adapted(model)
    state = peft.get_peft_model_state_dict(model.lm, adapter_name=_ADAPTER)
    return {k: v.detach().clone() for k, v in state.items()}


def _require_adapted(model: nn.Module) -> CausalLM:
    model = _require_lm(model)
    if not has_adapters(model):
        raise ValueError("the model has no adapters; call add_lora(model, ...) first")
    return model


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors (keys as :func:`adapter_state_dict` writes them) into ``model``.

    Raises:
        ValueError: a key is not an adapter of the model, or an adapter has no key.
    """
    peft = _peft()
    model = _require_adapted(model)
    expected = set(peft.get_peft_model_state_dict(model.lm, adapter_name=_ADAPTER))
    unknown, absent = sorted(set(state) - expected), sorted(expected - set(state))
    if unknown or absent:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no key {absent[0]!r}"
        raise ValueError(
            f"adapter state does not fit the model: {what} ({len(unknown)} unknown, "
            f"{len(absent)} missing); build the model with the same family, targets and rank"
        )
    with torch.no_grad():
        peft.set_peft_model_state_dict(model.lm, state, adapter_name=_ADAPTER)


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's layout) into
    ``directory`` (created), each atomically; the base weights are not written."""
    from safetensors.torch import save_file

    model = _require_adapted(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    config = model.lm.peft_config[_ADAPTER].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    _atomic(out / ADAPTER_FILE, lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    _atomic(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))
    return out


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_adapters(model: nn.Module, directory: str | Path) -> None:
    """Load a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)
    into a model with the same adapters (same targets and rank: checked, one-line error)."""
    from safetensors.torch import load_file

    model = _require_adapted(model)
    folder = Path(directory)
    weights, config_path = folder / ADAPTER_FILE, folder / ADAPTER_CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; pass a directory written by save_adapters or PEFT's "
                "save_pretrained"
            )
    saved = json.loads(config_path.read_text())
    ours = model.lm.peft_config[_ADAPTER]
    for key, mine in (("r", ours.r), ("lora_alpha", ours.lora_alpha),
                      ("target_modules", sorted(ours.target_modules))):  # fmt: skip
        theirs = saved.get(key)
        theirs = sorted(theirs) if isinstance(theirs, list) else theirs
        if theirs != mine:
            raise ValueError(
                f"{config_path} has {key}={theirs!r} but the model's adapters have {mine!r}; "
                "build the model with the adapters the directory was saved from"
            )
    load_adapter_state_dict(model, load_file(str(weights)))


def merge_adapters(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """FedLoRU's accumulation: W0 ← W0 + (α/r)·B·A in every adapted module, then A drawn
    afresh (Kaiming-uniform, a = √5, as PEFT and nn.Linear initialize) from ``generator`` and
    B = 0, so the function is unchanged (up to rounding) and the next adapters start anew."""
    model = _require_adapted(model)
    with torch.no_grad():
        for module in model.lm.modules():
            if not (hasattr(module, "lora_A") and _ADAPTER in module.lora_A):
                continue
            base = module.get_base_layer()
            base.weight.add_(module.get_delta_weight(_ADAPTER).to(base.weight.dtype))
            nn.init.kaiming_uniform_(module.lora_A[_ADAPTER].weight, a=math.sqrt(5),
                                     generator=generator)  # fmt: skip
            nn.init.zeros_(module.lora_B[_ADAPTER].weight)
