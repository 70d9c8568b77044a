"""The parameter space of a model: the selected parameters θ ∈ R^p, flat in a fixed order.

Built once per model and shared by every curvature operator on it, by the dense references and
by gradient-based analyses. It owns

- a *twin* of the model fixed in an explicit mode ("eval" or "train") that shares the model's
  tensors; the caller's model is never touched (its ``training`` flags included). In "train"
  mode BatchNorm stops tracking running statistics (the in-place update is not a function of
  θ and torch.func refuses to differentiate through it);
- θ by name (a detached copy) and the other parameters and buffers held fixed;
- flat ↔ dict conversion: θ flat is the concatenation of the selected tensors in ``names``
  order, a block of k vectors is (p, k), and "rows" (k, p) view as {name: (k, *shape)};
- the plain loss and gradient, finiteness and determinism checks.

Every model evaluation goes through a :class:`~hessrank.data.task.Task` (a plain
``loss_fn(outputs, targets)`` is wrapped by :func:`~hessrank.data.task.as_task`): the task
feeds the inputs (tensor, tuple or dict), takes the outputs' ``logits`` when the model returns
a Hugging Face style object, and refuses a model that returns a scalar (a loss it computed
itself) with one line.

Example:
    >>> model = nn.Sequential(nn.Linear(3, 2)).double()
    >>> space = ParameterSpace(model, params=["0.weight"])
    >>> space.names, space.dim
    (['0.weight'], 6)
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessrank.curvature.attention import SeesAttention, attention_kernel
from hessrank.data.inputs import Inputs, call_model
from hessrank.data.task import Task, as_task
from hessrank.models.adapters import adapter_names

LossFn = Callable[..., Tensor]
"""A plain batch-mean ``loss_fn(outputs, targets)``; every place that takes one also takes a
:class:`~hessrank.data.task.Task`."""
MODES = ("eval", "train")


@dataclass(frozen=True)
class Probe:
    """What one forward pass on a batch tells the route rule: output entries of all leaf
    modules per sample, and whether the model calls ``F.scaled_dot_product_attention``."""

    activations_per_sample: float
    attention: bool


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: str):
    """Temporarily put every submodule in ``mode`` ("eval" or "train"), then restore flags."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def functional_model(model: nn.Module, mode: str) -> nn.Module:
    """The module to evaluate functionally in ``mode`` when no twin can be made: ``model``
    itself in "eval"; in "train" a deep copy whose BatchNorm uses batch statistics only."""
    if mode == "eval":
        return model
    twin = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(twin)
    return twin


def private_twin(model: nn.Module, mode: str) -> nn.Module | None:
    """A structural copy of ``model`` fixed in ``mode`` sharing its parameter and buffer tensors
    (no weights copied), or None when the model cannot be deep-copied."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        twin = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - exotic modules: fall back to the caller's model
        return None
    if mode == "train":
        torch.func.replace_all_batch_norm_modules_(twin)
    twin.train(mode == "train")
    return twin


PARAM_GROUPS: dict[str, str] = {
    "all": "every parameter of the model, trainable or frozen (a LoRA model's base included)",
    "adapters": "the LoRA adapters (PEFT's lora_A / lora_B parameters)",
}
"""Names that ``params`` entries may use for a group of parameters (a parameter of that exact
name wins)."""


def _expand(model: nn.Module, named: dict[str, Tensor], entry: str) -> list[str]:
    """The parameter names one ``params`` entry stands for, in model order."""
    if entry in named:
        return [entry]
    if entry == "all":
        return list(named)
    if entry == "adapters":
        found = list(adapter_names(model))
        if not found:
            raise ValueError("params 'adapters': the model has no LoRA adapters (no lora_A / "
                             "lora_B parameters); name parameters, use 'all', or leave params "
                             "out for every trainable one")  # fmt: skip
        return found
    if any(c in entry for c in "*?["):
        found = [n for n in named if fnmatch.fnmatchcase(n, entry)]
        if not found:
            raise ValueError(f"params pattern {entry!r} matches no parameter; valid names: "
                             f"{', '.join(named)}")  # fmt: skip
        return found
    raise ValueError(f"unknown parameter {entry!r}; valid names: {', '.join(named)} (or "
                     f"{', '.join(PARAM_GROUPS)}, or a pattern such as '*.lora_A.*')")


def select_params(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """Names of the parameters to differentiate: every trainable one (``params`` None), or
    the union of ``params``' entries in their order — each an exact name, a group of
    :data:`PARAM_GROUPS` (``"adapters"``, ``"all"``) or an ``fnmatch`` pattern
    (``"*.attn.*"``), a pattern's matches in model order, each name once."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, t in named.items() if t.requires_grad]
        if not names:
            raise ValueError(
                "the model has no trainable parameters (all have requires_grad=False); "
                "pass params=[...] with the names to differentiate"
            )
        return names
    entries = list(params)
    if not entries:
        raise ValueError("params is empty; pass at least one parameter name or None for all")
    if len(set(entries)) != len(entries):
        raise ValueError(f"params lists a name twice: {entries}")
    names: dict[str, None] = {}
    for entry in entries:
        names.update(dict.fromkeys(_expand(model, named, entry)))
    return list(names)


def check_finite_params(model: nn.Module) -> None:
    """Raise naming the first parameter or buffer with NaN/inf entries."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                raise ValueError(
                    f"{kind} {name!r} has NaN or inf entries; the curvature is undefined there "
                    "(check the checkpoint or the training run that produced it)"
                )


class OnParameterSpace:
    """What an operator on a :class:`ParameterSpace` (``self.space``) reads from it: the
    names, dtype and device of θ."""

    space: ParameterSpace

    @property
    def param_names(self) -> list[str]:
        return self.space.names

    @property
    def dtype(self) -> torch.dtype:
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        return self.space.device


class ParameterSpace:
    """θ (the selected parameters of ``model``), a twin fixed in ``mode``, flat ↔ dict.

    Args:
        model: the network; never modified.
        params: names to differentiate (default: all trainable), in flat order.
        mode: "eval" (default) or "train".
    """

    def __init__(self, model: nn.Module, params: Sequence[str] | None = None,
                 mode: str = "eval") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise ValueError(f"the model is wrapped in {type(model).__name__}; pass the module "
                             "it wraps (model.module): curvature products are functional and "
                             "parallelize by process_group, not by the wrapper")
        self.names = select_params(model, params)
        check_finite_params(model)
        twin = private_twin(model, mode)
        self.model = twin if twin is not None else functional_model(model, mode)
        self.mode = mode
        self._needs_mode = twin is None
        named = dict(self.model.named_parameters())
        self.params = {n: named[n].detach().clone() for n in self.names}
        fixed = {n: t.detach() for n, t in named.items() if n not in self.params}
        fixed.update({n: b.detach() for n, b in self.model.named_buffers()})
        self.fixed = fixed
        self.shapes = [self.params[n].shape for n in self.names]
        self.numels = [int(math.prod(s)) for s in self.shapes]
        self.offsets = [0, *itertools.accumulate(self.numels)]
        ref = self.params[self.names[0]]
        self.dtype, self.device = ref.dtype, ref.device

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    @property
    def element_size(self) -> int:
        """Bytes per entry of θ's dtype."""
        return torch.finfo(self.dtype).bits // 8

    def mode_context(self):
        """Mode switching, needed only when no private twin could be made."""
        if self._needs_mode:
            return module_mode(self.model, self.mode)
        return contextlib.nullcontext()

    def product_context(self, kernel: str | None = None):
        """Where products run: :meth:`mode_context` and, for a model with scaled-dot-product
        attention, the route's attention ``kernel`` (None: no kernel is forced)."""
        if kernel is None:
            return self.mode_context()
        stack = contextlib.ExitStack()
        stack.enter_context(self.mode_context())
        stack.enter_context(attention_kernel(kernel))
        return stack

    def has_conv(self) -> bool:
        return any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())

    # ---- flat <-> dict ----------------------------------------------------------------------
    def rows(self, V: Tensor) -> Tensor:
        """(p, k) block → (k, p) contiguous rows in θ's dtype and device."""
        return V.to(dtype=self.dtype, device=self.device).T.contiguous()

    def tangents(self, R: Tensor) -> dict[str, Tensor]:
        """(..., p) rows → {name: (..., *shape)} views (no copies when R is contiguous)."""
        lead, o = R.shape[:-1], self.offsets
        return {n: R[..., o[i]:o[i + 1]].reshape(*lead, *s)
                for i, (n, s) in enumerate(zip(self.names, self.shapes))}

    def flat_rows(self, tangents: dict[str, Tensor], lead: int = 1) -> Tensor:
        """{name: (*lead, *shape)} → (*lead, p) (``lead`` leading dimensions kept)."""
        first = tangents[self.names[0]]
        shape = first.shape[:lead]
        return torch.cat([tangents[n].reshape(*shape, -1) for n in self.names], dim=-1)

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """{name: shape} → (p,), in ``names`` order."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """(p,) → {name: shape}; (p, k) → {name: (k, *shape)}."""
        if v.ndim == 1:
            return self.tangents(v)
        return self.tangents(self.rows(v))

    def vector(self) -> Tensor:
        """θ flat."""
        return self.flatten(self.params)

    # ---- loss and gradient ------------------------------------------------------------------
    def forward(self, params: dict[str, Tensor], x: Inputs):
        """The twin's return value at ``params`` (the other tensors fixed) on inputs of any
        structure (no task: what the model returns, as is)."""
        tensors = (params, self.fixed)
        return call_model(lambda *a, **k: functional_call(self.model, tensors, a, k), x)

    def outputs(self, task: Task | LossFn, params: dict[str, Tensor], x: Inputs) -> Tensor:
        """The model's outputs at ``params`` as ``task`` reads them (:meth:`Task.forward`)."""
        tensors = (params, self.fixed)
        return as_task(task).forward(
            lambda *a, **k: functional_call(self.model, tensors, a, k), x)

    def loss(self, task: Task | LossFn, params: dict[str, Tensor], x: Inputs, y: Tensor
             ) -> Tensor:
        """The task's batch-mean loss at ``params``."""
        task = as_task(task)
        return task(self.outputs(task, params, x), y)

    def gradient(self, task: Task | LossFn, x: Inputs, y: Tensor) -> Tensor:
        """∇ loss flat (p,) by one plain reverse pass (nothing kept)."""
        leaves = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
        with torch.enable_grad(), self.mode_context():
            loss = self.loss(task, leaves, x, y)
            gs = torch.autograd.grad(loss, [leaves[n] for n in self.names])
        return torch.cat([t.reshape(-1) for t in gs])

    def check_losses(self, task: Task | LossFn, batches) -> float:
        """The size-weighted mean loss over ``batches``; raises on a non-scalar or non-finite
        batch loss, naming the batch."""
        return self.checked_losses(task, batches)[0]

    def checked_losses(self, task: Task | LossFn, batches) -> tuple[float, Probe]:
        """:meth:`check_losses` and, from the same forward pass on batch 0, the
        :class:`Probe` the route rule reads."""
        task = as_task(task)
        total, probe = 0.0, None
        with torch.no_grad(), self.mode_context():
            for b, w in enumerate(batches.weights):
                x, y = batches.inputs[b], batches.targets[b]
                if b == 0:
                    val, probe = self._probe_loss(task, x, y)
                else:
                    val = self.loss(task, self.params, x, y)
                if not isinstance(val, Tensor) or val.ndim != 0:
                    shape = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
                    raise ValueError(f"loss_fn must return a scalar batch mean, got shape "
                                     f"{shape}; use reduction='mean'")
                if not torch.isfinite(val):
                    raise ValueError(
                        f"the loss is not finite (the loss is {val.item()} on batch {b}; weights "
                        "are finite): check the inputs/targets of that batch and the model's "
                        "numerics"
                    )
                total += w * float(val)
        return total, probe

    def _probe_loss(self, task: Task, x: Inputs, y: Tensor) -> tuple[Tensor, Probe]:
        """The loss on (x, y) with leaf-module output entries counted and attention watched."""
        numel = 0

        def hook(_m, _i, out):
            nonlocal numel
            if isinstance(out, Tensor):
                numel += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with SeesAttention() as seen:
                val = self.loss(task, self.params, x, y)
        finally:
            for h in handles:
                h.remove()
        return val, Probe(numel / max(int(y.shape[0]), 1), seen.called)

    def check_determinism(self, task: Task | LossFn, x: Inputs, y: Tensor) -> None:
        """Two gradients on the same batch must agree; raise explaining what breaks it."""
        try:
            g1 = self.gradient(task, x, y)
            g2 = self.gradient(task, x, y)
        except RuntimeError as err:
            raise ValueError(
                f"the model cannot be differentiated functionally in mode={self.mode!r}: {err}"
            ) from err
        tol = 1e-10 if self.dtype == torch.float64 else 1e-5
        diff = float((g1 - g2).norm() / g1.norm().clamp_min(torch.finfo(self.dtype).tiny))
        if diff > tol:
            raise ValueError(
                f"the loss is not deterministic: two gradients on the same batch differ by "
                f"{diff:.2e} (relative). A random layer (dropout) is active in mode={self.mode!r} "
                "or the model draws random numbers; use mode='eval' or check_determinism=False"
            )

    def activations_per_sample(self, task: Task | LossFn, x: Inputs, y: Tensor) -> float:
        """Output entries of all leaf modules per sample, from one forward pass on (x, y)."""
        with torch.no_grad(), self.mode_context():
            return self._probe_loss(as_task(task), x, y)[1].activations_per_sample
