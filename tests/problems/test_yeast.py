"""Yeast: the CSV format, the verified river wheel, the seeded split, train-only scaling, model."""

from __future__ import annotations

import gzip
import hashlib
import zipfile

import numpy as np
import pytest
import torch

import mtopt
from mtopt.problems import yeast
from mtopt.problems.mnist_data import cache_dir
from mtopt.problems.yeast import (
    FEATURE_NAMES,
    LABEL_NAMES,
    Yeast,
    YeastArrays,
    build_splits,
    load_yeast,
    parse_yeast_csv,
    read_river_wheel,
    split_indices,
    split_sizes,
)

HEADER = ",".join(FEATURE_NAMES + LABEL_NAMES)


def synthetic(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with 6 decimals (as in the real file) and random 0/1 labels."""
    rng = np.random.default_rng(seed)
    features = np.round(rng.normal(0.5, 2.0, size=(n, 103)), 6)
    labels = (rng.random((n, 14)) < 0.3).astype(int)
    return features, labels


def csv_text(features: np.ndarray, labels: np.ndarray) -> str:
    rows = [
        ",".join([f"{v:.6f}" for v in f] + [str(v) for v in y])
        for f, y in zip(features, labels, strict=True)
    ]
    return "\n".join([HEADER, *rows]) + "\n"


def arrays(n: int = 40, seed: int = 0) -> YeastArrays:
    return parse_yeast_csv(csv_text(*synthetic(n, seed)), "synthetic")


def test_synthetic_file_gives_shapes_and_label_counts(tmp_path):
    features, labels = synthetic()
    (tmp_path / "yeast.csv.gz").write_bytes(gzip.compress(csv_text(features, labels).encode()))
    loaded = load_yeast(data_dir=tmp_path, cache=tmp_path / "cache", download=False)
    assert loaded.features.shape == (40, 103)
    assert loaded.features.dtype == np.float32
    assert loaded.labels.shape == (40, 14)
    assert loaded.labels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.labels.sum(0), labels.sum(0))
    np.testing.assert_allclose(loaded.features, features, rtol=1e-6, atol=1e-6)


def test_format_errors_are_rejected():
    features, labels = synthetic(5)
    text = csv_text(features, labels)
    with pytest.raises(ValueError, match="header"):
        parse_yeast_csv(text.replace("Class14", "Class15"), "x")
    labels[0, 3] = 2
    with pytest.raises(ValueError, match="0 or 1"):
        parse_yeast_csv(csv_text(features, labels), "x")
    short = text.replace(",0\n", "\n", 1).replace(",1\n", "\n", 1)
    with pytest.raises(ValueError, match=r"^x: not a table of 117 numbers per row"):
        parse_yeast_csv(short, "x")


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="mtopt data fetch yeast"):
        load_yeast(cache=tmp_path / "cache", download=False)


def test_a_folder_given_without_the_file_is_an_error_not_the_cache(tmp_path, monkeypatch):
    """``--data-dir X`` means X: a folder without yeast.csv is not silently replaced by the
    cache. The environment's folder may be shared by data sets, so that one falls through."""
    source, cache, empty = tmp_path / "src", tmp_path / "cache", tmp_path / "empty"
    source.mkdir()
    empty.mkdir()
    (source / "yeast.csv").write_text(csv_text(*synthetic(12)))
    monkeypatch.setattr(yeast, "download_river", lambda root: source / "yeast.csv")
    monkeypatch.setattr(yeast, "read_river_wheel", yeast.read_yeast_file)
    assert load_yeast(cache=cache).features.shape == (12, 103)  # "downloaded", then cached
    assert "cached" in load_yeast(cache=cache).source
    with pytest.raises(FileNotFoundError, match=r"empty does not hold yeast\.csv or yeast\.csv"):
        load_yeast(data_dir=empty, cache=cache)
    monkeypatch.setenv("MTOPT_YEAST_DATA", str(empty))
    assert "cached" in load_yeast(cache=cache).source


def fake_wheel(path, member: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(yeast.RIVER_MEMBER, member)
    return path


def test_wheel_member_is_verified_then_read_and_cached(tmp_path, monkeypatch):
    member = gzip.compress(csv_text(*synthetic(12)).encode())
    wheel = fake_wheel(tmp_path / "w.whl", member)
    with pytest.raises(ValueError, match="sha256"):
        read_river_wheel(wheel)
    monkeypatch.setattr(yeast, "RIVER_MEMBER_SHA256", hashlib.sha256(member).hexdigest())
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    wheel.rename(tmp_path / "cache" / "wheels" / yeast.RIVER_WHEEL)  # no pip call
    loaded = load_yeast(cache=tmp_path / "cache")
    assert loaded.features.shape == (12, 103)
    assert "river" in loaded.source
    assert (tmp_path / "cache" / "yeast.npz").exists()
    cached = load_yeast(cache=tmp_path / "cache", download=False)
    np.testing.assert_array_equal(cached.labels, loaded.labels)
    assert "cached" in cached.source


def test_split_sizes_partition_and_determinism(tmp_path):
    assert split_sizes(2417) == {"train": 1451, "val": 483, "test": 483}
    parts = split_indices(50, 0, tmp_path)
    assert {k: len(v) for k, v in parts.items()} == {"train": 30, "val": 10, "test": 10}
    np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(50))
    assert (tmp_path / "permutation_seed0.txt").exists()
    again = split_indices(50, 0, tmp_path)  # re-read from the saved file
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    no_file = split_indices(50, 0, None)
    assert all(np.array_equal(parts[k], no_file[k]) for k in parts)
    other = split_indices(50, 1, None)
    assert not np.array_equal(parts["test"], other["test"])
    with pytest.raises(ValueError, match="permutation"):
        split_indices(51, 0, tmp_path)


def test_standardisation_uses_train_statistics_only():
    data = arrays(50)
    idx = split_indices(50, 0, None)
    train_raw = data.features[idx["train"]].astype(np.float64)
    mean, std = train_raw.mean(0), train_raw.std(0)
    splits = build_splits(data, 0, None)
    x_train = splits["train"].arrays["x"].numpy()
    np.testing.assert_allclose(x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0), 1.0, atol=1e-5)
    expected_val = (data.features[idx["val"]] - mean) / std
    np.testing.assert_allclose(splits["val"].arrays["x"].numpy(), expected_val, atol=1e-5)
    # scaling val/test rows changes nothing in the train split's features
    scaled = data.features.copy()
    held_out = np.concatenate([idx["val"], idx["test"]])
    scaled[held_out] *= 1000.0
    changed = build_splits(YeastArrays(scaled, data.labels, "scaled"), 0, None)
    np.testing.assert_array_equal(changed["train"].arrays["x"].numpy(), x_train)
    np.testing.assert_array_equal(
        splits["test"].arrays["y"].numpy(), data.labels[idx["test"]].astype(np.float32)
    )


def test_a_constant_feature_does_not_divide_by_zero():
    data = arrays(20)
    data.features[:, 5] = 3.0
    x = build_splits(data, 0, None)["val"].arrays["x"].numpy()
    assert np.isfinite(x).all()
    assert np.all(x[:, 5] == 0.0)


def test_metrics_are_per_sample_sums():
    task = Yeast().task("y2")
    pred = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.zeros(4, 14)
    y[:, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    batch = {"y": y}
    acc, bce = task.metrics
    assert (acc.name, bce.name) == ("acc", "bce")
    assert bce.lower_is_better
    assert float(acc.batch_sum(pred, batch)) == 2.0
    manual = -sum(
        np.log(1 / (1 + np.exp(-p))) if t else np.log(1 - 1 / (1 + np.exp(-p)))
        for p, t in zip(pred.tolist(), [1, 1, 0, 0], strict=True)
    )
    assert float(bce.batch_sum(pred, batch)) == pytest.approx(manual, rel=1e-6)
    assert float(task.loss(pred, batch)) == pytest.approx(manual / 4, rel=1e-6)


def test_model_shapes_and_task_names():
    problem = Yeast()
    assert problem.task_names == tuple(f"y{i}" for i in range(1, 15))
    model = problem.make_model(["y1", "y14"], dropout=0.2)
    z, outputs = model(torch.zeros(5, 103))
    assert z.shape == (5, 128)
    assert set(outputs) == {"y1", "y14"}
    assert all(o.shape == (5,) for o in outputs.values())
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert encoder_params == 103 * 256 + 256 + 256 * 128 + 128
    with pytest.raises(ValueError, match="no task"):
        problem.make_model(["y15"])


def test_one_training_step_through_the_optimizer():
    torch.manual_seed(0)
    problem = Yeast(data=arrays(40))
    model = problem.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mto = mtopt.MultiTaskOptimizer(optimizer, "unitary", shared=model.encoder.parameters())
    batch = next(problem.splits()["train"].batches(16, shuffle=False))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        z, outputs = model(batch["x"])
        return mtopt.Losses({t.name: t.loss(outputs[t.name], batch) for t in problem.tasks}, z)

    info = mto.step(closure)
    assert set(info.losses) == set(problem.task_names)
    assert all(np.isfinite(v) for v in info.losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.skipif(
    not (cache_dir() / "yeast.npz").exists(), reason="no cached Yeast (mtopt data fetch yeast)"
)
def test_real_yeast_matches_known_facts():
    data = load_yeast(download=False)
    assert data.features.shape == (2417, 103)
    assert data.labels.shape == (2417, 14)
    counts = [762, 1038, 983, 862, 722, 597, 428, 480, 178, 253, 289, 1816, 1799, 34]
    assert data.labels.sum(0).tolist() == counts
    splits = Yeast(data=data).splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1451, "val": 483, "test": 483}
