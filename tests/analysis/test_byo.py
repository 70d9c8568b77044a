"""Bring your own run (issue 22, item 6): checkpoints of another trainer, the user's data
(any pytree inputs), split and loss, analyzed from the CLI; the common checkpoint layouts;
PEFT adapter folders on a base model; modules found in the working directory. (The README's
walk-through, a label-skewed split against an iid one, is run by tests/test_readme.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hessrank.analysis.sources import CheckpointDir, load_state_dict
from hessrank.analysis.trajectory import analyze

FAST = {"matvecs": 10, "progress": False, "threads": 1}

DICT_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Takes its inputs by name: model(image=..., scale=...)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, image, scale):
        return self.fc(image * scale[:, None])


def make():
    return Net().double()


def _pair(g, n, label_shift):
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    s = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    y = (torch.arange(n) + label_shift) % 3
    return {"image": x, "scale": s}, y


def clients():
    g = torch.Generator().manual_seed(0)
    return {"clients": [_pair(g, n, c) for c, n in enumerate((20, 30, 25))],
            "test": _pair(g, 15, 0)}


def loss(outputs, targets):
    return F.cross_entropy(outputs, targets)
'''


def _hessrank() -> str:
    script = Path(sys.executable).parent / "hessrank"
    if not script.is_file():
        pytest.skip("the hessrank console script is not installed next to this python")
    return str(script)


def _env() -> dict[str, str]:
    """No PYTHONPATH: the user's module must be found in the working directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_dict_inputs_from_the_cli_match_the_dense_hessian(tmp_path):
    (tmp_path / "dict_net.py").write_text(DICT_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import dict_net
    finally:
        sys.path.remove(str(tmp_path))
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    model = dict_net.make()
    for r in (0, 3):  # the user's own loop: a few full-batch steps between checkpoints
        torch.save({"model_state_dict": model.state_dict(), "epoch": r}, ckpts / f"ep{r}.pt")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for x, y in dict_net.clients()["clients"]:
            opt.zero_grad()
            dict_net.loss(model(**x), y).backward()
            opt.step()
    argv = [_hessrank(), "analyze", "ckpts", "--model", "dict_net:make", "--data",
            "dict_net:clients", "--loss", "dict_net:loss", "--subjects",
            "server,clients,subset:20x2,test", "--quantities", "stable-rank,top-eig,alignment",
            "--alignment-ranks", "1,full", "--matvecs", "40", "--threads", "1", "--quiet"]
    p = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=280)
    assert p.returncode == 0, p.stderr
    table = pd.read_parquet(ckpts / "analysis" / "results.parquet")
    assert set(table["round"]) == {0, 3}
    sr = table[table["quantity"] == "stable-rank"]
    assert set(sr["subject"]) == {"server", "client0", "client1", "client2", "subset20_0",
                                  "subset20_1", "test"}
    assert sr.loc[sr["subject_kind"] == "client", "subject_size"].unique().tolist() == [20, 30,
                                                                                          25]
    # p = 15 < 40 products: Lanczos is exact; the server's top eigenvalue is the dense one's
    state = torch.load(ckpts / "ep3.pt", weights_only=True)["model_state_dict"]
    model.load_state_dict(state)
    data = dict_net.clients()["clients"]
    xs = {k: torch.cat([x[k] for x, _ in data]) for k in ("image", "scale")}
    ys = torch.cat([y for _, y in data])
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(v):
        params, i = {}, 0
        for n, p0 in model.named_parameters():
            params[n] = v[i:i + p0.numel()].reshape(p0.shape)
            i += p0.numel()
        out = torch.func.functional_call(model, params, (), xs)
        return dict_net.loss(out, ys)

    H = torch.func.hessian(loss_of)(flat)
    lam = torch.linalg.eigvalsh(H)
    top = lam[lam.abs().argmax()].item()
    got = table[(table["quantity"] == "top-eig") & (table["subject"] == "server")
                & (table["round"] == 3) & (table["k"] == 1)]["value"].item()
    assert got == pytest.approx(top, rel=1e-8), (got, top, names)
    assert set(table.loc[table["quantity"] == "alignment", "layer"]) == {"fc.weight"}


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10))


@pytest.mark.parametrize("layout", ["plain", "model_state_dict", "state_dict", "module.",
                                    "model_state_dict+module.", "safetensors"])
def test_common_checkpoint_layouts_load_the_same_weights(tmp_path, layout):
    torch.manual_seed(1)
    model = _mlp()
    state = model.state_dict()
    if "module." in layout:  # saved from nn.DataParallel(model)
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "safetensors":
        path = tmp_path / "round_2.safetensors"
        save_file(state, str(path))
    else:
        wrapper = layout.split("+")[0]
        saved = state if wrapper in ("plain", "module.") else {wrapper: state, "epoch": 2,
                                                               "optimizer": {"lr": 0.1}}
        path = tmp_path / "round_2.pt"
        torch.save(saved, path)
    got = load_state_dict(path)
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    t = analyze(tmp_path, model_factory=_mlp, dataset="digits", clients=2, subjects="server",
                out=tmp_path / "an", **FAST)
    assert len(t) == 3 and np.isfinite(t["value"]).all()


def test_a_mismatched_checkpoint_names_the_keys(tmp_path):
    """Before: a DataParallel checkpoint was refused with an error cut off before the key
    names ("Error(s) in loading state_dict for Sequential:")."""
    state = {k: v for k, v in _mlp().state_dict().items() if k != "3.bias"}
    state["3.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "round_1.pt")
    src = CheckpointDir(tmp_path, _mlp, "digits", 2)
    with pytest.raises(ValueError, match=r"missing keys \['3.bias'\], unexpected keys "
                                         r"\['3.extra'\]"):
        src.load_model(1)
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "round_1.pt")
    with pytest.raises(ValueError, match="not a state_dict.*'epoch', 'weights'"):
        src.load_model(1)


PEFT_MODULE = '''
import torch
from torch import nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def base():
    torch.manual_seed(7)  # the frozen base W0 every round shares
    return Base()


def clients():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.arange(n) % 3) for n in (12, 18)]
'''


@pytest.mark.slow
def test_peft_adapter_folders_on_a_base_model(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "peft_net.py").write_text(PEFT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("peft_net", None)
    import peft_net

    ckpts = tmp_path / "adapters"
    for r in (1, 2):
        model = peft.get_peft_model(peft_net.base(), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.1 * r)
        model.save_pretrained(str(ckpts / f"round_{r}"))
    src = CheckpointDir(ckpts, "peft_net:base", data="peft_net:clients")
    assert src.rounds() == [1, 2]
    trainable = [n for n, p in src.load_model(2).named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    t = analyze(ckpts, model_factory="peft_net:base", data="peft_net:clients",
                subjects="server,clients", out=tmp_path / "an", **FAST)
    assert sorted(set(t["round"])) == [1, 2] and np.isfinite(t["value"]).all()
    a = t[(t["subject"] == "server") & (t["quantity"] == "stable-rank")]
    assert a["checkpoint"].nunique() == 2


def test_module_of_the_working_directory_is_found_without_pythonpath(tmp_path):
    """Before: `hessrank analyze --model-factory my_nets:make` failed unless PYTHONPATH=."""
    (tmp_path / "wd_net.py").write_text(
        "from torch import nn\n"
        "def make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).state_dict(), ckpts / "r_0.pt")
    argv = [_hessrank(), "analyze", "ckpts", "--model", "wd_net:make", "--dataset", "digits",
            "--clients", "2", "--subjects", "server", "--matvecs", "10", "--threads", "1",
            "--quiet"]
    p = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=280)
    assert p.returncode == 0, p.stderr
    assert (ckpts / "analysis" / "results.csv").is_file()
    shutil.rmtree(ckpts / "analysis")
    bad = [*argv[:4], "no_such_module:make", *argv[5:]]
    p = subprocess.run(bad, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=280)
    assert p.returncode == 2 and "no_such_module" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_user_data_forms():
    """A data function may return a list of pairs, (clients, test), {"clients", "test"}, or
    torch Datasets of (input, target) samples (collated); bad forms are one line."""
    from torch.utils.data import TensorDataset

    from hessrank.analysis.sources import UserData

    x, y = torch.randn(10, 3), torch.arange(10) % 2
    pairs = [(x[:4], y[:4]), (x[4:], y[4:])]
    for got in (pairs, (pairs, (x, y)), {"clients": pairs, "test": (x, y)},
                [TensorDataset(x[:4], y[:4]), TensorDataset(x[4:], y[4:])]):
        data = UserData(lambda got=got: got)
        assert [int(t.shape[0]) for _, t in data.clients] == [4, 6]
        assert torch.equal(data.clients[1][0], x[4:])
    assert UserData(lambda: (pairs, (x, y))).test[1].shape == (10,)
    for bad, needle in ((lambda: [], "non-empty list"), (lambda: [(x, y[:3])], "10 inputs and 3"),
                        (lambda: {"test": (x, y)}, "without 'clients'"),
                        (lambda w: pairs, "takes arguments")):
        with pytest.raises(ValueError, match=needle):
            UserData(bad)
