"""Tasks: how a batch is fed to a model, its loss, its metrics, how samples are counted.

A task is the one place that knows what a model's outputs mean. The trainer, the evaluation,
the checkpoint reader and the curvature operators all go through it, so none of them calls
``model(x)`` or ``argmax`` itself, and a new kind of data (a language model's next token)
is one new task, not a change in every layer.

For samples i = 1..n of a batch with per-sample losses ℓ_i, every task's loss is the batch
**mean** L = (1/n) Σ_i ℓ_i, so that the server's loss is the size-weighted mean of the
clients' (L = Σ_c (n_c/N) L_c, docs/design.md) whatever the batching:

    classification  ℓ_i = −log softmax(z_i)[y_i]            z_i ∈ R^C, y_i ∈ {0..C−1}
    regression      ℓ_i = ½ ‖f_i − y_i‖²                     f_i, y_i ∈ R^d
    next-token      ℓ_i = (1/|T_i|) Σ_{t ∈ T_i} −log softmax(z_{i,t})[y_{i,t}]
                    z_i ∈ R^{T×V}, T_i the positions whose target is not ``ignore_index``

A next-token *sample* is a sequence, so a client's size is its number of sequences; with
sequences of equal length (the Shakespeare windows) L is also the mean over tokens.

Outputs: a tensor, or a Hugging Face ``ModelOutput`` / mapping whose ``logits`` are used. A
model that returns a scalar computed its own loss from labels passed in its inputs; its
curvature in the outputs is undefined, so :meth:`Task.forward` refuses it (one line).

Example:
    >>> task = ClassificationTask()
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> sorted(task.evaluate(model, x, y))
    ['accuracy', 'loss']
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.data.inputs import Inputs, batch_size_of, call_model, slice_inputs

__all__ = [
    "TASKS",
    "ClassificationTask",
    "LossTask",
    "NextTokenTask",
    "RegressionTask",
    "Task",
    "as_task",
    "model_outputs",
    "task_by_name",
]

EVAL_BATCH = 2048
"""Samples per forward pass in :meth:`Task.evaluate` (memory, not results: sums are exact)."""


def model_outputs(out: Any) -> Tensor:
    """The output tensor of a model's return value: a tensor as is, else its ``logits``.

    Raises:
        ValueError: the model returned a scalar (a loss it computed from labels in its
            inputs) or nothing a task can use.
    """
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif not isinstance(out, Tensor) and hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the model returned {type(out).__name__}, not a tensor of outputs or an object "
            "with .logits; wrap it so that it returns its outputs"
        )
    if out.ndim == 0:
        raise ValueError(
            "the model returned a scalar: it computed its own loss (labels passed in its "
            "inputs?); pass the labels as targets, not inputs, so the task's loss is used"
        )
    return out


class Task(ABC):
    """How a model is fed, scored and counted for one kind of data (module docstring).

    Subclasses implement :meth:`sample_losses`, :meth:`metric_sums` and
    :meth:`draw_targets`; every other method follows from them.
    """

    name: ClassVar[str] = ""
    """Registry name ("classification", "regression", "next-token")."""
    metric: ClassVar[str] = "loss"
    """The headline metric :meth:`evaluate` returns (``accuracy``, ``loss``, ...)."""

    # ---- feeding ---------------------------------------------------------------------------
    def forward(self, model: Callable, inputs: Inputs) -> Tensor:
        """The model's outputs on ``inputs`` (``model(x)``, ``model(*x)``, ``model(**x)``)."""
        return model_outputs(call_model(model, inputs))

    def num_samples(self, inputs: Inputs, targets: Tensor) -> int:
        """Number of samples (the size that weighs a batch or a client)."""
        n = batch_size_of(inputs)
        if int(targets.shape[0]) != n:
            raise ValueError(f"{n} inputs but {int(targets.shape[0])} targets; they must match")
        return n

    # ---- loss ------------------------------------------------------------------------------
    @abstractmethod
    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """ℓ_i for every sample of the batch, shape (n,)."""

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The batch-mean loss (1/n) Σ_i ℓ_i (a scalar)."""
        return self.sample_losses(outputs, targets).mean()

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """A task is also a plain ``loss_fn(outputs, targets)``."""
        return self.loss(outputs, targets)

    # ---- metrics ---------------------------------------------------------------------------
    @abstractmethod
    def metric_sums(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Additive per-batch statistics (sums over samples or tokens) that
        :meth:`summarize` turns into metrics; ``loss_sum`` = Σ_i ℓ_i is always one."""

    def summarize(self, sums: Mapping[str, float], num_samples: int) -> dict[str, float]:
        """Metrics from the summed statistics of :meth:`metric_sums` over ``num_samples``."""
        return {"loss": sums["loss_sum"] / num_samples}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, inputs: Inputs, targets: Tensor, batch_size: int = EVAL_BATCH
    ) -> dict[str, float]:
        """Metrics of ``model`` in eval mode over all of (inputs, targets), in chunks of
        ``batch_size`` (the loss is the full-batch mean: chunks are summed, not averaged)."""
        model.eval()
        n = self.num_samples(inputs, targets)
        if n == 0:
            raise ValueError("cannot evaluate on no samples")
        totals: dict[str, float] = {}
        for i in range(0, n, batch_size):
            xb, yb = slice_inputs(inputs, i, i + batch_size), targets[i : i + batch_size]
            for key, value in self.metric_sums(self.forward(model, xb), yb).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return self.summarize(totals, n)

    # ---- Monte-Carlo Fisher ----------------------------------------------------------------
    @abstractmethod
    def draw_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs`` (the labels
        of the Monte-Carlo Fisher, for which E_y[∇ℓ ∇ℓᵀ] is the GGN), shaped and typed like
        ``targets``; ``generator`` is a CPU generator."""


class ClassificationTask(Task):
    """Cross-entropy with classes on output dimension 1 (``F.cross_entropy``'s convention:
    (n, C), or (n, C, d1, ...) with targets (n, d1, ...) and ℓ_i the mean over positions);
    metric: accuracy."""

    name = "classification"
    metric = "accuracy"

    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = F.cross_entropy(outputs, targets, reduction="none")
        return losses.reshape(targets.shape[0], -1).mean(-1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """(1/n) Σ_i −log softmax(z_i)[y_i], as ``F.cross_entropy`` computes it."""
        return F.cross_entropy(outputs, targets)

    def predictions(self, outputs: Tensor) -> Tensor:
        """The most likely class of every sample (and position)."""
        return outputs.argmax(dim=1)

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """1.0 where the most likely class is the target, else 0.0 (the shape of targets)."""
        return (self.predictions(outputs) == targets).to(torch.float64)

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        n = targets.shape[0]
        hits = self.correct(outputs, targets).reshape(n, -1).mean(-1)
        return {"loss_sum": float(self.loss(outputs, targets)) * n, "correct": float(hits.sum())}

    def summarize(self, sums: Mapping[str, float], num_samples: int) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / num_samples, "accuracy": sums["correct"] / num_samples}

    def draw_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        logits = outputs.detach().movedim(1, -1)
        probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
        draw = torch.multinomial(probs.cpu(), 1, generator=generator)
        return draw.reshape(logits.shape[:-1]).to(targets.dtype).to(targets.device)


class RegressionTask(Task):
    """Half squared error ½‖f − y‖² summed over outputs, mean over samples; metric: loss.

    For a linear model f(x) = W x with E[x xᵀ] = I its Hessian in W is exactly the identity.
    """

    name = "regression"
    metric = "loss"

    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).reshape(targets.shape[0], -1).sum(-1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).sum(dim=-1).mean()

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        return {"loss_sum": float(self.loss(outputs, targets)) * targets.shape[0]}

    def draw_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """y = f + ε, ε ~ N(0, I): the Gaussian whose negative log-likelihood is ½‖f − y‖²."""
        eps = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
        return (outputs.detach() + eps.to(outputs.dtype).to(outputs.device)).to(targets.dtype)


class NextTokenTask(Task):
    """Next-token prediction: outputs (n, T, V) logits, targets (n, T) token ids, positions
    whose target is ``ignore_index`` do not count. ℓ_i is sequence i's mean token loss
    (module docstring). Metrics: ``loss`` (mean of ℓ_i), ``token_loss`` (mean over counted
    tokens), ``perplexity`` = exp(token_loss), ``token_accuracy``."""

    name = "next-token"
    metric = "token_accuracy"

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return f"NextTokenTask(ignore_index={self.ignore_index})"

    def _token_losses(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if outputs.ndim != 3 or targets.ndim != 2 or outputs.shape[:2] != targets.shape:
            raise ValueError(
                f"next-token outputs must be (n, T, V) and targets (n, T); got "
                f"{tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        mask = targets != self.ignore_index
        losses = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1),
                                 ignore_index=self.ignore_index, reduction="none")  # fmt: skip
        return losses.reshape(targets.shape), mask

    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses, mask = self._token_losses(outputs, targets)
        counts = mask.sum(-1)
        # checked outside vmap only (the curvature operators vmap this loss over units of
        # rows already checked, and vmap refuses data-dependent control flow)
        if not torch._C._functorch.is_batchedtensor(counts) and bool((counts == 0).any()):
            raise ValueError("a sequence has no target token (all ignore_index); drop it")
        return (losses * mask).sum(-1) / counts.to(losses.dtype)

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        losses, mask = self._token_losses(outputs, targets)
        hits = (outputs.argmax(-1) == targets) & mask
        return {"loss_sum": float(self.sample_losses(outputs, targets).sum()),
                "token_loss_sum": float((losses * mask).sum()), "tokens": float(mask.sum()),
                "token_correct": float(hits.sum())}  # fmt: skip

    def summarize(self, sums: Mapping[str, float], num_samples: int) -> dict[str, float]:
        token_loss = sums["token_loss_sum"] / sums["tokens"]
        return {"loss": sums["loss_sum"] / num_samples, "token_loss": token_loss,
                "perplexity": math.exp(min(token_loss, 700.0)),
                "token_accuracy": sums["token_correct"] / sums["tokens"]}  # fmt: skip

    def draw_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """A token per counted position from softmax(z_{i,t}); ignored positions keep
        ``ignore_index`` (so the drawn loss counts the same positions)."""
        probs = torch.softmax(outputs.detach().double(), -1).reshape(-1, outputs.shape[-1])
        draw = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(targets.shape)
        draw = draw.to(targets.dtype).to(targets.device)
        return torch.where(targets == self.ignore_index, targets, draw)


class LossTask(Task):
    """A task from a plain ``loss_fn(outputs, targets)`` returning the batch-mean loss (a
    user's own loss): feeding, counting and the loss metric; no per-sample losses beyond
    what the mean implies, and no Monte-Carlo labels."""

    name = "loss"
    metric = "loss"

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def __repr__(self) -> str:
        return f"LossTask({getattr(self.loss_fn, '__name__', self.loss_fn)!r})"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs, targets)

    def sample_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """ℓ_i = loss_fn on sample i alone (n calls; for metrics and checks, not hot paths)."""
        return torch.stack([self.loss_fn(outputs[i : i + 1], targets[i : i + 1])
                            for i in range(targets.shape[0])])  # fmt: skip

    def metric_sums(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        return {"loss_sum": float(self.loss_fn(outputs, targets)) * targets.shape[0]}

    def draw_targets(self, outputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        raise ValueError(
            "the Monte-Carlo Fisher needs a task that knows its predictive distribution "
            "(classification, regression, next-token); a plain loss function does not: use "
            "the empirical Fisher (kind='empirical') or pass a task"
        )


TASKS: dict[str, Callable[[], Task]] = {
    ClassificationTask.name: ClassificationTask,
    RegressionTask.name: RegressionTask,
    NextTokenTask.name: NextTokenTask,
}
"""The registry of built-in tasks: name → constructor."""


def task_by_name(name: str) -> Task:
    """The built-in task registered under ``name`` (:data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


def as_task(task_or_loss: Task | Callable[[Tensor, Tensor], Tensor]) -> Task:
    """A task as is; a plain ``loss_fn(outputs, targets)`` wrapped in :class:`LossTask`."""
    if isinstance(task_or_loss, Task):
        return task_or_loss
    if task_or_loss is F.cross_entropy:
        return ClassificationTask()
    return LossTask(task_or_loss)
