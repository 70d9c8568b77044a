"""Hugging Face causal language models (GPT-2, LLaMA) as next-token networks: token ids (n, T)
in, logits (n, T, V) out, ready for :class:`~hessrank.data.task.NextTokenTask`.

A model is a :class:`CausalLM`: the ``transformers`` model under the name ``lm`` (state_dict keys
``lm.transformer.h.0.attn.c_attn.weight``, ...) and a forward that fixes what the curvature
layer needs from it:

- **attention with second derivatives.** torch's default SDPA kernels on CPU have no
  double-backward nor forward-mode derivative (every Hessian route fails deep in torch). The
  toolkit runs ``attention="sdpa"`` inside ``sdpa_kernel(SDPBackend.MATH)`` (a composite of
  matmul and softmax, differentiable to any order) or uses ``"eager"``; any other kernel is
  refused with one line (:data:`ATTENTIONS`).
- **float64 is exact.** LLaMA's RMSNorm computes in float32 whatever the model's dtype (so a
  float64 Hessian was only ~1e-7 exact); it is replaced by :class:`RMSNorm`, the same function
  in max(dtype, float32), and the default ``attention="sdpa"`` keeps softmax in the model's
  dtype (LLaMA's eager attention casts it to float32). LLaMA's rotary cos/sin tables are still
  computed in float32: they are constants of the parameters, so derivatives stay exact.
- **no cache, no padding row.** ``use_cache=False`` (a ``DynamicCache`` breaks the GGN); no
  embedding has a ``padding_idx`` (its reverse-mode gradient drops that row while forward mode
  keeps it, so Hessian and GGN routes would disagree).
- **padding.** With an ``attention_mask`` (1 = token, 0 = padding), position ids count the
  tokens only, so a left-padded sequence has the logits of the same sequence unpadded, and a
  padding query attends to itself (a row with every key masked gives NaN softmax in SDPA, and
  NaN times a zero loss weight is still NaN in every derivative).
- **dropout follows the mode**: ``model.train()`` drops (``dropout`` > 0), ``model.eval()``
  does not. Random-init models default to ``dropout=0``.

``transformers`` is imported only when a model is built (``hessrank --help`` never loads it);
install it with ``pip install 'hessrank[hf]'``. Weights come from a config (random init from
torch's global RNG, so ``torch.manual_seed(s)`` fixes them) or from a local directory
(``model_path``; never a hub download: ``local_files_only=True``).

Example:
    >>> _ = torch.manual_seed(0)
    >>> model = build_hf_model("hf-gpt2", (16,), 97, layers=1, width=32, heads=2)
    >>> model(torch.zeros(3, 16, dtype=torch.long)).shape
    torch.Size([3, 16, 97])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ATTENTIONS",
    "HF_FAMILIES",
    "CausalLM",
    "RMSNorm",
    "build_hf_model",
    "check_attention",
    "family_of",
]

ATTENTIONS: tuple[str, ...] = ("sdpa", "eager")
"""Attention implementations with second derivatives: "sdpa" (run with the math backend) and
"eager". The first is the default."""

_MODEL_TYPES = {"hf-gpt2": "gpt2", "hf-llama": "llama"}


def _transformers():
    """The ``transformers`` package, imported on first use (it takes seconds)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"the hf-* models need the transformers package, which does not import ({err}); "
            "install it with pip install 'hessrank[hf]' (and no torchvision in the environment)"
        ) from None
    return transformers


class RMSNorm(nn.Module):
    """y = w ⊙ x / √(mean(x²) + ε) over the last dimension, computed in max(dtype(x), float32).

    The function of LLaMA's RMSNorm (which always computes in float32 and casts back) for
    float32/bf16/fp16 inputs, and exact in float64. The parameter is ``weight``, like LLaMA's.
    """

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class CausalLM(nn.Module):
    """A ``transformers`` causal LM seen as ``logits = model(input_ids, attention_mask=None)``.

    Args:
        lm: the ``transformers`` model (``GPT2LMHeadModel``, ``LlamaForCausalLM``, or a PEFT
            model wrapping one, see :mod:`hessrank.models.adapters`).
        attention: "sdpa" (run under the math backend) or "eager" (:data:`ATTENTIONS`).
        family: the registry name it was built under ("hf-gpt2", "hf-llama").
    """

    def __init__(self, lm: nn.Module, attention: str, family: str) -> None:
        super().__init__()
        _check_attention_name(attention)
        self.lm = lm
        self.attention = attention
        self.family = family

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (n, T) int64, attention_mask (n, T) of 0/1 or None → logits (n, T, V).

        With a mask, position ids are the running count of tokens (cumsum − 1, 0 on padding)
        and each padding query may attend to itself (module docstring); the logits at padding
        positions are meaningless (give those targets ``ignore_index``).
        """
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            kwargs["position_ids"] = (keep.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["attention_mask"] = _causal_mask(keep, self.attention, self._dtype())
        with _kernel_context(self.attention):
            out = self.lm(**kwargs)
        return out.logits

    def _dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def config(self):
        """The ``transformers`` config of the model."""
        return self.lm.config


def _causal_mask(keep: Tensor, attention: str, dtype: torch.dtype) -> Tensor:
    """(n, 1, T, T) mask: query i sees key j ≤ i when j is a token, and always itself (so no
    row is fully masked); boolean for SDPA, additive (0 or the dtype's lowest value) for eager
    attention, which adds it to the scores."""
    t = keep.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    allowed = ((causal & keep[:, None, :]) | eye)[:, None]
    if attention == "sdpa":
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=keep.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def _kernel_context(attention: str):
    if attention == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


def _check_attention_name(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(
            f"attention {attention!r} has no second derivatives in torch (Hessian, GGN and "
            f"Fisher products fail); use attention='sdpa' (run with the math backend) or 'eager'"
        )


def check_attention(model: nn.Module) -> None:
    """Raise ValueError (one line) when a ``transformers`` model inside ``model`` uses an
    attention kernel without second derivatives.

    A :class:`CausalLM` is always fine. A bare ``transformers`` model is fine with "eager";
    with "sdpa" only when its products run inside ``sdpa_kernel(SDPBackend.MATH)``, which this
    check cannot see, so it is refused with the way out; any other kernel is refused.
    """
    if isinstance(model, CausalLM):
        return
    for name, module in model.named_modules():
        # transformers has no public reader of the kernel a config chose; this property is
        # the one its own docs read
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(impl, str) and impl != "eager":
            where = f"module {name!r}" if name else "the model"
            raise ValueError(
                f"{where} uses attention {impl!r}, whose default kernels have no second "
                "derivatives; build it with attn_implementation='eager', or run inside "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) with 'sdpa', or use "
                "hessrank's hf-gpt2 / hf-llama models"
            )


def family_of(model: nn.Module) -> str | None:
    """The registry name of an HF family model ("hf-gpt2", "hf-llama"), None otherwise."""
    return model.family if isinstance(model, CausalLM) else None


# --------------------------------------------------------------------------------------------
# building


def _finish(lm: nn.Module, attention: str, family: str) -> CausalLM:
    """Shared last steps: no cache, no padding_idx, dtype-following RMSNorm, eval-safe."""
    lm.config.use_cache = False
    for module in lm.modules():
        if isinstance(module, nn.Embedding):
            module.padding_idx = None
    if family == "hf-llama":
        _replace_rmsnorms(lm)
    return CausalLM(lm, attention, family)


def _replace_rmsnorms(lm: nn.Module) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    targets = [(name, m) for name, m in lm.named_modules() if isinstance(m, LlamaRMSNorm)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, RMSNorm(module.weight, module.variance_epsilon))


def _from_path(family: str, model_path: str | Path, attention: str, overrides: dict) -> nn.Module:
    transformers = _transformers()
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model_path {str(path)!r} has no config.json; pass a local directory written by "
            "save_pretrained (models are never downloaded)"
        )
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != _MODEL_TYPES[family]:
        raise ValueError(
            f"model_path {str(path)!r} holds a {config.model_type!r} model, not "
            f"{_MODEL_TYPES[family]!r}; use the matching family or another directory"
        )
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=attention, dtype=torch.float32,
        **overrides,
    )


def _hf_gpt2(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    layers: int = 2,
    width: int = 128,
    heads: int = 4,
    ffn_width: int | None = None,
    max_positions: int | None = None,
    dropout: float | None = None,
    tie_embeddings: bool = True,
    attention: str = "sdpa",
    model_path: str | None = None,
    config: dict | None = None,
) -> CausalLM:
    """GPT-2 (``GPT2LMHeadModel``): ``layers`` blocks of width ``width`` with ``heads`` heads,
    MLP width ``ffn_width`` (4·width), learned positions up to ``max_positions`` (the dataset's
    sequence length), vocabulary ``num_outputs``, tied input/output embeddings. ``dropout``
    sets residual, embedding and attention dropout (0 by default). ``config`` adds raw
    ``GPT2Config`` fields. With ``model_path``, the weights and architecture come from there."""
    if model_path is not None:
        overrides = {} if dropout is None else {
            "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
        return _from_path("hf-gpt2", model_path, attention, {**overrides, **(config or {})})
    transformers = _transformers()
    p = 0.0 if dropout is None else float(dropout)
    cfg = transformers.GPT2Config(
        vocab_size=num_outputs, n_positions=max_positions or int(input_shape[0]),
        n_embd=width, n_layer=layers, n_head=heads, n_inner=ffn_width,
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, tie_word_embeddings=tie_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
        **{**(config or {}), "attn_implementation": attention},
    )
    return transformers.GPT2LMHeadModel(cfg)


def _hf_llama(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    layers: int = 2,
    width: int = 128,
    heads: int = 4,
    kv_heads: int | None = None,
    ffn_width: int | None = None,
    max_positions: int | None = None,
    dropout: float | None = None,
    tie_embeddings: bool = False,
    attention: str = "sdpa",
    model_path: str | None = None,
    config: dict | None = None,
) -> CausalLM:
    """LLaMA (``LlamaForCausalLM``): ``layers`` decoder layers of width ``width`` with ``heads``
    query heads and ``kv_heads`` key/value heads (= heads), SwiGLU MLP width ``ffn_width``
    (2·width), RMSNorm, rotary positions up to ``max_positions`` (the sequence length),
    vocabulary ``num_outputs``, untied embeddings. ``dropout`` is the attention dropout (0 by
    default). ``config`` adds raw ``LlamaConfig`` fields. With ``model_path``, the weights and
    architecture come from there."""
    if model_path is not None:
        overrides = {} if dropout is None else {"attention_dropout": dropout}
        return _from_path("hf-llama", model_path, attention, {**overrides, **(config or {})})
    transformers = _transformers()
    cfg = transformers.LlamaConfig(
        vocab_size=num_outputs, hidden_size=width, intermediate_size=ffn_width or 2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions or int(input_shape[0]),
        attention_dropout=0.0 if dropout is None else float(dropout),
        tie_word_embeddings=tie_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, use_cache=False,
        **{**(config or {}), "attn_implementation": attention},
    )
    return transformers.LlamaForCausalLM(cfg)


_ARCHITECTURE = ("layers", "width", "heads", "kv_heads", "ffn_width", "max_positions",
                 "tie_embeddings")  # fmt: skip

HF_FAMILIES: dict[str, Callable[..., nn.Module]] = {"hf-gpt2": _hf_gpt2, "hf-llama": _hf_llama}
"""Registry of the Hugging Face families: name → builder(input_shape, num_outputs, **options)."""


def hf_options(name: str) -> list[str]:
    """The keyword options of family ``name``."""
    params = inspect.signature(HF_FAMILIES[name]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_hf_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any
) -> CausalLM:
    """Build family ``name`` ("hf-gpt2" or "hf-llama") for sequences of length
    ``input_shape[0]`` over a vocabulary of ``num_outputs`` tokens (float32, training mode).

    Options (see each family): ``layers=2, width=128, heads=4, ffn_width, max_positions,
    dropout, tie_embeddings, attention="sdpa"|"eager", model_path, config``; hf-llama also
    ``kv_heads``. With ``model_path`` the architecture options are refused (they come from the
    directory) and the model's vocabulary must hold ``num_outputs`` tokens.
    """
    if name not in HF_FAMILIES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(HF_FAMILIES)}")
    if len(input_shape) != 1:
        raise ValueError(
            f"model {name!r} needs token-id inputs of shape (T,), got {tuple(input_shape)}; "
            "use a text dataset such as 'shakespeare'"
        )
    attention = kwargs.get("attention", "sdpa")
    _check_attention_name(attention)
    if kwargs.get("model_path") is not None:
        given = sorted(set(kwargs) & set(_ARCHITECTURE))
        if given:
            raise ValueError(
                f"model {name!r} with model_path takes its architecture from the directory; "
                f"drop option(s) {', '.join(given)}"
            )
    lm = HF_FAMILIES[name](tuple(int(s) for s in input_shape), int(num_outputs), **kwargs)
    vocab = int(lm.config.vocab_size)
    if vocab < num_outputs:
        raise ValueError(
            f"model {name!r} has a vocabulary of {vocab} tokens but the data has {num_outputs}; "
            "use a model whose vocabulary holds the dataset's"
        )
    return _finish(lm, attention, name).train()
