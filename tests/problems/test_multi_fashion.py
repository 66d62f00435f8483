"""Fashion-MNIST sources (IDX, verified system/Debian files, cache) and the two overlay problems."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

import mtopt
from mtopt.problems import fashion_data, multi_fashion
from mtopt.problems.fashion_data import load_fashion_mnist
from mtopt.problems.mnist_data import IDX_FILES, MnistArrays, cache_dir
from mtopt.problems.multi_fashion import (
    NORMALISATION,
    MultiFashion,
    MultiFashionMNIST,
    build_pair_split,
)
from mtopt.problems.multi_mnist import overlay, right_indices

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # saved_right_indices: seed * 1000 + split


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path, data = path.with_name(f"{path.name}.gz"), gzip.compress(data)
    path.write_bytes(data)


def make_idx_dir(
    folder, seed: int, n_train: int = 12, n_test: int = 5, compress: bool = False
) -> MnistArrays:
    """Four tiny IDX files of random images and labels; returns what they hold."""
    rng = np.random.default_rng(seed)
    arrays = MnistArrays(
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 10, n_train).astype(np.int64),
        test_images=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 10, n_test).astype(np.int64),
        source="synthetic",
    )
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        write_idx(folder / stem, getattr(arrays, key), compress)
    return arrays


def synthetic_hashes(folder) -> dict[str, str]:
    """sha256 of each IDX file's content (decompressed where it is gzipped)."""
    return {
        stem: hashlib.sha256(
            (folder / stem).read_bytes()
            if (folder / stem).exists()
            else gzip.decompress((folder / f"{stem}.gz").read_bytes())
        ).hexdigest()
        for stem in IDX_FILES.values()
    }


@pytest.fixture
def small_train(monkeypatch):
    """Splits of the tiny data sets: train = train[0:8], val = train[8:12]."""
    monkeypatch.setattr(multi_fashion, "TRAIN_SIZE", 8)


# ------------------------------------------------------------------------------ data sources


def test_idx_directory_is_read_first(tmp_path):
    arrays = make_idx_dir(tmp_path / "idx", 0)
    loaded = load_fashion_mnist(tmp_path / "idx", tmp_path / "cache", False, tmp_path / "sys")
    np.testing.assert_array_equal(loaded.train_images, arrays.train_images)
    np.testing.assert_array_equal(loaded.test_labels, arrays.test_labels)
    assert "IDX" in loaded.source
    assert not (tmp_path / "cache").exists()


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="mtopt data fetch fashion"):
        load_fashion_mnist(None, tmp_path / "cache", False, tmp_path / "sys")


@pytest.mark.parametrize("compress", [False, True])
def test_system_files_are_verified_then_cached(tmp_path, monkeypatch, compress):
    system = tmp_path / "sys"
    arrays = make_idx_dir(system, 1, compress=compress)
    with pytest.raises(ValueError, match="sha256"):
        load_fashion_mnist(None, tmp_path / "cache", False, system)
    assert not (tmp_path / "cache" / "fashion_mnist.npz").exists()
    monkeypatch.setattr(fashion_data, "IDX_SHA256", synthetic_hashes(system))
    loaded = load_fashion_mnist(None, tmp_path / "cache", False, system)
    np.testing.assert_array_equal(loaded.train_labels, arrays.train_labels)
    shutil.rmtree(system)
    cached = load_fashion_mnist(None, tmp_path / "cache", False, system)
    np.testing.assert_array_equal(cached.test_images, arrays.test_images)
    assert "cached" in cached.source


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_package_is_unpacked_and_verified(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    arrays = make_idx_dir(root / fashion_data.DEB_DATA_DIR, 2)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n"
    )
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    deb = debs / "dataset-fashion-mnist_1.0_all.deb"
    cmd = ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)]
    subprocess.run(cmd, check=True, capture_output=True)
    monkeypatch.setattr(
        fashion_data, "IDX_SHA256", synthetic_hashes(root / fashion_data.DEB_DATA_DIR)
    )
    loaded = load_fashion_mnist(None, tmp_path / "cache", True, tmp_path / "sys")
    np.testing.assert_array_equal(loaded.train_images, arrays.train_images)
    assert "Debian dataset-fashion-mnist_1.0_all.deb" in loaded.source
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["debs", "fashion_mnist.npz", "fashion_mnist.npz.sha256"]  # + its digest


# ------------------------------------------------------------------------------ the problems


def expected_pairs(left: MnistArrays, right: MnistArrays, seed: int, train_size: int):
    sources = {
        "train": (slice(0, train_size), "train"),
        "val": (slice(train_size, None), "train"),
        "test": (slice(None), "test"),
    }
    for split, (rows, part) in sources.items():
        li, ll = getattr(left, f"{part}_images")[rows], getattr(left, f"{part}_labels")[rows]
        ri, rl = getattr(right, f"{part}_images")[rows], getattr(right, f"{part}_labels")[rows]
        idx = right_indices(li.shape[0], seed * 1000 + SPLIT_SEEDS[split])
        yield split, overlay(li, ri[idx]), ll, rl[idx]


@pytest.mark.parametrize("family", ["multi_fashion", "multi_fashion_mnist"])
def test_images_and_labels_of_each_variant(tmp_path, small_train, family):
    fashion = make_idx_dir(tmp_path / "fashion", 3)
    mnist = make_idx_dir(tmp_path / "mnist", 4)
    cls = MultiFashion if family == "multi_fashion" else MultiFashionMNIST
    problem = cls("cl_cr", fashion=fashion, mnist=mnist, right_seed=5)
    assert problem.name == f"{family}/cl_cr"
    assert problem.task_names == ("CL", "CR")
    left = fashion if family == "multi_fashion" else mnist
    splits = problem.splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 4, "test": 5}
    for split, x, label_left, label_right in expected_pairs(left, fashion, 5, 8):
        arrays = splits[split].arrays
        np.testing.assert_array_equal(arrays["x"].numpy(), x)
        np.testing.assert_array_equal(arrays["label_left"].numpy(), label_left)
        np.testing.assert_array_equal(arrays["label_right"].numpy(), label_right)


def test_pairs_are_deterministic_and_follow_the_seed(tmp_path, small_train):
    fashion = make_idx_dir(tmp_path / "fashion", 3, n_train=40)
    a = MultiFashion(fashion=fashion).splits()["train"].arrays
    b = MultiFashion(fashion=fashion).splits()["train"].arrays
    c = MultiFashion(fashion=fashion, right_seed=1).splits()["train"].arrays
    assert torch.equal(a["x"], b["x"])
    assert torch.equal(a["label_right"], b["label_right"])
    assert not torch.equal(a["x"], c["x"])


def test_right_indices_are_saved_in_each_problems_cache_folder(tmp_path, small_train, monkeypatch):
    make_idx_dir(tmp_path / "fashion", 3)
    make_idx_dir(tmp_path / "mnist", 4)
    monkeypatch.setenv("MTOPT_CACHE", str(tmp_path / "cache"))
    MultiFashion(data_dir=tmp_path / "fashion").splits()
    MultiFashionMNIST(data_dir=tmp_path / "fashion", mnist_dir=tmp_path / "mnist").splits()
    for family in ("multi_fashion", "multi_fashion_mnist"):
        saved = sorted(p.name for p in (tmp_path / "cache" / family).iterdir())
        names = [f"right_indices_{s}_seed0.txt" for s in ("test", "train", "val")]
        assert saved == sorted(names + [f"{name}.sha256" for name in names])  # + their digests


def test_batches_are_normalised_with_the_problems_constants():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 6)
    mean, std = NORMALISATION["multi_fashion_mnist"]
    split = build_pair_split((images, labels), (images, labels), "val", 0, None, (mean, std))
    batch = next(split.batches(4))
    assert batch["x"].shape == (4, 1, 28, 28)
    assert batch["x"].dtype == torch.float32
    expected = (split.arrays["x"][:4].numpy().astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(batch["x"][:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="right"):
        build_pair_split((images, labels), (images[:5], labels[:5]), "val", 0, None, (mean, std))


def test_unknown_variant_and_task_are_rejected():
    with pytest.raises(ValueError, match="variant"):
        MultiFashionMNIST("cl_rr")
    with pytest.raises(ValueError, match="no task"):
        MultiFashion().make_model(["RR"])


@pytest.mark.parametrize("cls", [MultiFashion, MultiFashionMNIST])
def test_one_training_step_through_the_optimizer(tmp_path, small_train, cls):
    torch.manual_seed(0)
    problem = cls(fashion=make_idx_dir(tmp_path / "f", 3), mnist=make_idx_dir(tmp_path / "m", 4))
    model = problem.make_model(dropout=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mto = mtopt.MultiTaskOptimizer(optimizer, "unitary", shared=model.encoder.parameters())
    batch = next(problem.splits()["train"].batches(8))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        z, outputs = model(batch["x"])
        return mtopt.Losses({t.name: t.loss(outputs[t.name], batch) for t in problem.tasks}, z)

    info = mto.step(closure)
    assert set(info.losses) == {"CL", "CR"}
    assert all(np.isfinite(list(info.losses.values())))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------------------- real data

_REAL = cache_dir() / "fashion_mnist.npz"


@pytest.fixture(scope="module")
def fashion():
    if not _REAL.exists():
        pytest.skip("no cached Fashion-MNIST (mtopt data fetch fashion)")
    return load_fashion_mnist(None, download=False)


def test_real_fashion_matches_known_facts(fashion):
    assert fashion.train_images.shape == (60_000, 28, 28)
    assert fashion.test_images.shape == (10_000, 28, 28)
    assert list(fashion.train_labels[:10]) == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert list(fashion.test_labels[:5]) == [9, 2, 1, 1, 6]
    assert np.bincount(fashion.train_labels).tolist() == [6000] * 10
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10


@pytest.mark.slow
@pytest.mark.parametrize("family", ["multi_fashion", "multi_fashion_mnist"])
def test_normalisation_constants_are_the_train_statistics(fashion, family):
    if family == "multi_fashion_mnist" and not (cache_dir() / "mnist.npz").exists():
        pytest.skip("no cached MNIST")
    cls = MultiFashion if family == "multi_fashion" else MultiFashionMNIST
    mnist = None
    if family == "multi_fashion_mnist":
        from mtopt.problems.mnist_data import load_mnist

        mnist = load_mnist(None, download=False)
    train = cls(fashion=fashion, mnist=mnist).splits()["train"]
    pixels = train.arrays["x"].numpy().astype(np.float64) / 255
    assert len(train) == 50_000
    assert NORMALISATION[family] == pytest.approx((pixels.mean(), pixels.std()), abs=1e-4)
