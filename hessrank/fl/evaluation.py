"""What a run logs about its model each evaluated round, all through the dataset's task.

Every metric comes from :meth:`hessrank.data.task.Task.evaluate` (or the task's own
``forward``/``correct`` for the label-reweighted accuracy): nothing here calls a model or
takes an argmax itself. Columns of a metrics row (docs/design.md): ``train_loss`` (the union
of the clients' training data), ``test_loss``, ``test_accuracy`` (None for regression),
``val_loss``/``val_accuracy`` with a validation split, per-client holdout metrics with
``client_holdout``, and for personalized algorithms the mean over clients of their own
model's score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessrank.data.task import ClassificationTask
from hessrank.fl.setup import Setup

__all__ = ["evaluate", "label_weighted_accuracy"]

_EVAL_BATCH = 2048


@torch.no_grad()
def label_weighted_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, client_targets: Tensor, num_classes: int
) -> float:
    """Accuracy on (x, y) reweighted to a client's label distribution:
    Σ_k p_c(k)·acc(k), with acc(k) the accuracy on test samples of class k and p_c the label
    histogram of the client's training data — the client's own test distribution under label
    skew, estimated from the shared test set."""
    model.eval()
    task = ClassificationTask()
    out = torch.cat([task.forward(model, x[i : i + _EVAL_BATCH])
                     for i in range(0, len(x), _EVAL_BATCH)])  # fmt: skip
    hits = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(
        0, y, task.correct(out, y)
    )
    per_class = hits / torch.bincount(y, minlength=num_classes).clamp(min=1).to(torch.float64)
    hist = torch.bincount(client_targets, minlength=num_classes).to(torch.float64)
    return float((per_class * hist).sum() / hist.sum())


def evaluate(setup: Setup) -> dict[str, Any]:
    """The evaluation columns of a metrics row for the run's current state."""
    fed = setup.federation
    model = fed.strategy.effective_model()
    task = setup.dataset.task
    tr = task.evaluate(model, *setup.train)
    te = task.evaluate(model, *setup.test)
    row: dict[str, Any] = {
        "train_loss": tr["loss"],
        "test_loss": te["loss"],
        "test_accuracy": te.get("accuracy"),
    }
    if setup.validation is not None:
        va = task.evaluate(model, *setup.validation)
        row.update({"val_loss": va["loss"], "val_accuracy": va.get("accuracy")})
    if setup.holdout is not None:
        row.update(_holdout(setup, model))
    if fed.strategy.personalized:
        row.update(_personal(setup))
    return row


def _client_model(setup: Setup, client_id: int) -> nn.Module:
    fed = setup.federation
    return fed.strategy.client_model(client_id, fed.states.get(client_id))


def _personal(setup: Setup) -> dict[str, float]:
    """Personalized evaluation (pFedLoRU): client c's own model, mean over clients of
    :func:`label_weighted_accuracy` (classification) or of the test loss (regression)."""
    ds = setup.dataset
    x, y = setup.test
    scores = []
    classification = isinstance(ds.task, ClassificationTask)
    for client in setup.clients:
        model = _client_model(setup, client.client_id)
        if classification:
            scores.append(label_weighted_accuracy(model, x, y, client.targets, ds.num_classes))
        else:
            scores.append(ds.task.evaluate(model, x, y)["loss"])
    key = "personal_test_accuracy" if classification else "personal_test_loss"
    return {key: float(np.mean(scores))}


def _holdout(setup: Setup, global_model: nn.Module) -> dict[str, Any]:
    """Per-client evaluation on each client's own held-out samples (``client_holdout``): the
    client's own model for personalized algorithms, the global model otherwise. Logs the
    per-client values and their unweighted mean over clients."""
    task = setup.dataset.task
    key = task.metric
    personal = setup.federation.strategy.personalized
    per_client = {}
    for client, (x, y) in zip(setup.clients, setup.holdout or []):
        if x.shape[0] == 0:
            continue
        model = _client_model(setup, client.client_id) if personal else global_model
        per_client[str(client.client_id)] = task.evaluate(model, x, y)[key]
    mean = float(np.mean(list(per_client.values()))) if per_client else None
    return {f"client_holdout_{key}": per_client, f"holdout_{key}_mean": mean}
