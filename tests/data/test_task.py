"""Tasks: per-sample losses, batch means, chunked metrics, Monte-Carlo targets, refusals."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessrank.data.task import (
    ClassificationTask,
    LossTask,
    NextTokenTask,
    RegressionTask,
    as_task,
    model_outputs,
    task_by_name,
)


def test_classification_matches_cross_entropy_and_counts_hits():
    task = ClassificationTask()
    z, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    assert torch.equal(task.loss(z, y), F.cross_entropy(z, y))  # same bits as before tasks
    torch.testing.assert_close(task.sample_losses(z, y).mean(), F.cross_entropy(z, y),
                               rtol=1e-14, atol=0)  # fmt: skip
    sums = task.metric_sums(z, y)
    assert sums["correct"] == float((z.argmax(1) == y).sum())


def test_regression_is_half_squared_error():
    task = RegressionTask()
    f, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = 0.5 * ((f - y) ** 2).sum(1)
    torch.testing.assert_close(task.sample_losses(f, y), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(task.loss(f, y), expected.mean(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("task", [ClassificationTask(), RegressionTask()])
def test_evaluate_is_exact_over_chunks(task):
    """The chunked evaluation is the full-batch mean (chunks summed, not averaged)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(23, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (23,)) if task.name == "classification" else torch.randn(
        23, 4, dtype=torch.float64)
    whole = task.evaluate(model, x, y, batch_size=100)
    chunked = task.evaluate(model, x, y, batch_size=5)
    assert whole.keys() == chunked.keys() and task.metric in whole
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)
    assert whole["loss"] == pytest.approx(float(task.loss(model(x), y)), rel=1e-12)


def test_next_token_sequence_mean_and_ignored_positions():
    task = NextTokenTask()
    torch.manual_seed(1)
    z = torch.randn(3, 5, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (3, 5))
    y[1, 3:] = -100  # sequence 1 has 3 counted tokens
    per_token = F.cross_entropy(z.reshape(-1, 11), y.reshape(-1), ignore_index=-100,
                                reduction="none").reshape(3, 5)  # fmt: skip
    expected = torch.stack([per_token[0].mean(), per_token[1, :3].mean(), per_token[2].mean()])
    torch.testing.assert_close(task.sample_losses(z, y), expected, rtol=1e-14, atol=0)
    metrics = task.summarize(task.metric_sums(z, y), 3)
    assert metrics["token_loss"] == pytest.approx(float(per_token[y != -100].mean()), rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["token_loss"]), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(n, T, V\)"):
        task.loss(z[:, :, 0], y)


def test_next_token_refuses_a_sequence_without_targets():
    y = torch.full((2, 4), -100)
    y[0, 0] = 1
    with pytest.raises(ValueError, match="no target token"):
        NextTokenTask().loss(torch.randn(2, 4, 3), y)


def test_classification_draws_follow_the_softmax():
    torch.manual_seed(2)
    z = torch.tensor([[2.0, 0.0, -1.0]]).repeat(20000, 1)
    y = torch.zeros(20000, dtype=torch.long)
    draw = ClassificationTask().draw_targets(z, y, torch.Generator().manual_seed(0))
    freq = torch.bincount(draw, minlength=3).double() / 20000
    p = torch.softmax(z[0].double(), 0)
    # binomial SE at n = 20000 is at most 0.0036; 5 SE
    torch.testing.assert_close(freq, p, atol=0.018, rtol=0)
    assert draw.dtype == y.dtype and draw.shape == y.shape


def test_next_token_draws_keep_ignored_positions():
    y = torch.tensor([[1, 2, -100], [0, -100, -100]])
    draw = NextTokenTask().draw_targets(torch.randn(2, 3, 4), y, torch.Generator().manual_seed(0))
    assert torch.equal(draw == -100, y == -100) and int(draw.max()) < 4


def test_regression_draws_are_unit_gaussian_around_the_outputs():
    f = torch.zeros(50000, 2, dtype=torch.float64)
    draw = RegressionTask().draw_targets(f, f, torch.Generator().manual_seed(0))
    assert abs(float(draw.mean())) < 0.02 and abs(float(draw.var()) - 1) < 0.03


def test_model_outputs_takes_logits_and_refuses_a_computed_loss():
    z = torch.randn(2, 3)
    assert model_outputs(z) is z
    assert model_outputs(OrderedDict(logits=z, loss=torch.tensor(1.0))) is z

    class Out:  # a Hugging Face ModelOutput exposes .logits
        logits = z

    assert model_outputs(Out()) is z
    with pytest.raises(ValueError, match="computed its own loss"):
        model_outputs(torch.tensor(0.3))
    with pytest.raises(ValueError, match="not a tensor"):
        model_outputs([z])


def test_forward_feeds_structured_inputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    class Named(nn.Module):
        def forward(self, input_ids, scale):
            return input_ids * scale

    task = RegressionTask()
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(task.forward(Two(), (a, b)), a + b)
    assert torch.equal(task.forward(Named(), {"input_ids": a, "scale": b}), a * b)


def test_loss_task_wraps_a_plain_loss_and_refuses_monte_carlo():
    def l1(outputs, targets):
        return (outputs - targets).abs().sum(-1).mean()

    task = as_task(l1)
    assert isinstance(task, LossTask)
    f, y = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(task(f, y), l1(f, y))
    torch.testing.assert_close(task.sample_losses(f, y).mean(), l1(f, y))
    with pytest.raises(ValueError, match="empirical"):
        task.draw_targets(f, y, torch.Generator())
    assert isinstance(as_task(F.cross_entropy), ClassificationTask)
    assert as_task(task) is task


def test_registry_names():
    assert task_by_name("next-token").name == "next-token"
    with pytest.raises(ValueError, match="classification, regression, next-token"):
        task_by_name("segmentation")
