"""Issue 23: ``--preset fedloru-official`` is the FedLoRU authors' local step.

The reference below is written directly in torch after the authors' public code
(haemPark/fedloru_official: ``LoWRank2DConv`` and ``FedLoRUClient.update``): a factorized conv
computes conv(x; W, b) + up(dropout(down(x)))·α/r, the optimizer is ``torch.optim.SGD`` over
``model.parameters()`` with momentum and weight decay, and every step clips the gradients with
``clip_grad_norm_`` before ``optimizer.step()``. Only the dropout masks' seed is hessrank's
(one draw of the round generator after the batches, :func:`hessrank.fl.local.local_sgd`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessrank.cli import main
from hessrank.data.task import ClassificationTask
from hessrank.fl import RunDir, train
from hessrank.fl.cli import build_config, register
from hessrank.fl.config import TrainConfig
from hessrank.fl.layers import factorized_layers, set_submodule
from hessrank.fl.local import batch_indices
from hessrank.fl.loop import Federation, learning_rate
from hessrank.fl.presets import PRESETS, preset_values
from hessrank.fl.protocol import ClientData
from hessrank.fl.rundir import read_checkpoint
from hessrank.models import build_model

ROOT = Path(__file__).resolve().parents[2]
DT = torch.float64


class AuthorsConv(nn.Module):
    """The authors' LoWRank2DConv forward: W frozen, down = k×k conv to r channels, up = 1×1."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.stride, self.padding = base.stride, base.padding
        self.weight = nn.Parameter(torch.zeros_like(base.weight), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros_like(base.bias))
        self.loru_down = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride,
                                   base.padding, bias=False).to(DT)  # fmt: skip
        self.loru_up = nn.Conv2d(r, base.out_channels, 1, bias=False).to(DT)
        self.dropout = nn.Dropout(p=dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return result + self.loru_up(self.dropout(self.loru_down(x))) * self.scaling


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{
        **preset_values("fedloru-official"), "dataset": "digits", "model": "cnn",
        "model_kwargs": {"channels": [3, 4, 5], "hidden": 8}, "dtype": "float64",
        "clients": 1, "rank": 2, "lora_alpha": 4.0, "batch_size": 16, "lr": 0.5, "rounds": 4,
        **kw,
    })  # fmt: skip


@pytest.mark.parametrize("epochs", [1, 2])
def test_first_round_of_the_preset_is_the_authors_step(epochs):
    cfg = _config(local_epochs=epochs)
    torch.manual_seed(0)
    dense = build_model("cnn", (1, 8, 8), 10, **cfg.model_kwargs).to(DT)
    fed = Federation.build(copy.deepcopy(dense), cfg, ClassificationTask())
    server = fed.strategy.model
    layers = factorized_layers(server)
    assert list(layers) == ["conv2", "conv3"]  # conv-only, the stem and every Linear dense
    for layer in layers.values():  # the authors' init: W0 = 0, bias 0, kaiming-uniform A, B
        assert not layer.weight0.any() and not layer.bias.any()
        assert float(layer.A.detach().abs().max()) <= 1 / math.sqrt(layer.fan_in)
        assert float(layer.B.detach().abs().max()) <= 1 / math.sqrt(layer.rank)
    g = torch.Generator().manual_seed(4)
    data = ClientData(0, torch.randn(40, 1, 8, 8, generator=g, dtype=DT),
                      torch.randint(0, 10, (40,), generator=g))  # fmt: skip

    # the reference: the dense model with the authors' modules, loaded with the round-0 state
    ref = copy.deepcopy(dense)
    state = {k: v.clone() for k, v in server.state_dict().items()}
    for name, layer in layers.items():
        module = AuthorsConv(dense.get_submodule(name), layer.rank, layer.alpha, 0.1)
        with torch.no_grad():
            module.weight.copy_(layer.weight0)
            module.bias.copy_(layer.bias)
            module.loru_down.weight.copy_(layer.A)
            module.loru_up.weight.copy_(layer.B)
        set_submodule(ref, name, module)
    ref.load_state_dict({k: v for k, v in state.items() if k in ref.state_dict()}, strict=False)

    rng = torch.Generator().manual_seed(11)
    ref_rng = torch.Generator()
    ref_rng.set_state(rng.get_state())
    lr = learning_rate(cfg, 1)
    assert lr == cfg.lr  # the authors' cosine schedule also starts at the maximum
    fed.round(1, [data], lr=lr, rng=rng)

    batches = batch_indices(40, 16, epochs=epochs, steps=0, generator=ref_rng)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ref_rng)))
    optimizer = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    ref.train()
    for idx in batches:
        loss = nn.CrossEntropyLoss()(ref(data.inputs[idx]), data.targets[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        optimizer.step()

    got = fed.strategy.model.state_dict()
    expected = ref.state_dict()
    for name in layers:
        pairs = {"weight0": "weight", "A": "loru_down.weight", "B": "loru_up.weight",
                 "bias": "bias"}  # fmt: skip
        for ours, theirs in pairs.items():
            torch.testing.assert_close(got[f"{name}.{ours}"], expected[f"{name}.{theirs}"],
                                       rtol=1e-10, atol=1e-13)  # fmt: skip
    for key in ("conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "out.weight", "out.bias"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-13)
    moved = (got["conv2.A"] - state["conv2.A"]).abs().max()
    assert moved > 1e-4  # the step did something


def test_preset_without_dropout_differs_from_with_it():
    """The masks matter: the same round with lowrank_dropout 0 gives other factors."""
    out = {}
    for p in (0.1, 0.0):
        cfg = _config(lowrank_dropout=p)
        torch.manual_seed(0)
        model = build_model("cnn", (1, 8, 8), 10, **cfg.model_kwargs).to(DT)
        fed = Federation.build(model, cfg, ClassificationTask())
        g = torch.Generator().manual_seed(4)
        data = ClientData(0, torch.randn(40, 1, 8, 8, generator=g, dtype=DT),
                          torch.randint(0, 10, (40,), generator=g))  # fmt: skip
        fed.round(1, [data], lr=0.5, rng=torch.Generator().manual_seed(11))
        out[p] = fed.strategy.model.state_dict()["conv2.A"].clone()
    assert not torch.equal(out[0.1], out[0.0])


def test_config_file_is_the_preset():
    path = ROOT / "experiments" / "configs" / "fedloru_official.json"
    assert json.loads(path.read_text()) == dict(PRESETS["fedloru-official"])


def test_preset_from_the_cli_then_config_then_flags(tmp_path):
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--preset", "fedloru-official", "--model", "cnn",
            "--model-kwargs", '{"channels": [3, 4, 5], "hidden": 8}', "--rounds", "2",
            "--clients", "2", "--partition", "iid", "--local-steps", "2", "--rank", "2",
            "--lora-alpha", "2", "--momentum", "0.5", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    cfg = RunDir(out).config
    assert cfg.momentum == 0.5  # the flag wins over the preset
    assert (cfg.algo, cfg.lora_init, cfg.max_grad_norm) == ("fedloru", "kaiming", 0.1)
    assert (cfg.lowrank_dropout, cfg.merge_mode, cfg.factorize_rule) == (0.1, "accumulate", "conv")
    provenance = json.loads((out / "provenance.json").read_text())
    assert "--preset" in json.dumps(provenance)


def test_a_config_file_overrides_the_preset_and_keeps_its_other_keys(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"momentum": 0.0, "max_grad_norm": 1.0, "model": "cnn"}))
    args = parser.parse_args(["train", "--out", str(tmp_path / "r"), "--preset",
                              "fedloru-official", "--config", str(path), "--lr", "0.3"])
    cfg = build_config(args)
    assert (cfg.momentum, cfg.max_grad_norm, cfg.model, cfg.lr) == (0.0, 1.0, "cnn", 0.3)
    assert (cfg.weight_decay, cfg.lowrank_dropout, cfg.lora_init) == (1e-4, 0.1, "kaiming")


def test_unknown_preset_and_a_dense_model_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["train", "--out", str(tmp_path / "a"), "--preset", "nope"])
    assert exit_.value.code != 0 and "invalid choice: 'nope'" in capsys.readouterr().err
    code = main(["train", "--out", str(tmp_path / "b"), "--preset", "fedloru-official",
                 "--rounds", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and "factorize_rule 'conv' finds none in model 'mlp'" in err
    assert "\n" not in err


def test_preset_run_killed_and_resumed_has_the_same_weights(tmp_path):
    """Dropout masks, momentum, the cosine schedule and accumulate merges all resume exactly."""
    cfg = {**preset_values("fedloru-official"), "model": "cnn",
           "model_kwargs": {"channels": [3, 4, 5], "hidden": 8}, "clients": 3,
           "partition": "iid", "client_fraction": 0.67, "rounds": 4, "local_steps": 3,
           "rank": 2, "lora_alpha": 2.0, "lr": 0.2, "merge_every": 2, "save_every": 2}
    whole = train(cfg, tmp_path / "whole", progress=False)

    def kill(t, _):
        if t == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callback=kill)
    resumed = train(cfg, tmp_path / "cut", progress=False)
    a = read_checkpoint(whole.checkpoint_path(4))[0]
    b = read_checkpoint(resumed.checkpoint_path(4))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics()["extra"].iloc[2]["merged"] == 1.0  # round 2 merged (accumulate)
