"""Multi-MNIST construction: canvas positions, max-overlap, resize, splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtopt.problems.multi_mnist import (
    RESIZE_INDEX,
    MultiMNIST,
    build_split,
    overlay,
    right_indices,
    saved_right_indices,
)


def reference_overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Independent construction: explicit canvas, then torch's pixel-centre nearest resize."""
    canvas = np.zeros((left.shape[0], 36, 36), dtype=np.float32)
    canvas[:, 0:28, 0:28] = left
    canvas[:, 6:34, 6:34] = np.maximum(canvas[:, 6:34, 6:34], right)
    resized = F.interpolate(torch.from_numpy(canvas)[:, None], size=(28, 28), mode="nearest-exact")
    return resized[:, 0].numpy().astype(np.uint8)


def test_overlay_matches_an_independent_construction():
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    right = rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(left, right), reference_overlay(left, right))


def test_positions_of_left_and_right_digits():
    left = np.zeros((1, 28, 28), dtype=np.uint8)
    right = np.zeros((1, 28, 28), dtype=np.uint8)
    left[0, 0, 0] = 200  # canvas (0, 0): top-left corner of the output
    right[0, 26, 26] = 100  # canvas (32, 32): source index 32 is sampled by output 25
    out = overlay(left, right)[0]
    assert out[0, 0] == 200
    assert out[25, 25] == 100
    assert np.count_nonzero(out) == 2
    assert list(RESIZE_INDEX[:3]) == [0, 1, 3]
    assert RESIZE_INDEX[-1] == 35


def test_overlap_takes_the_pixelwise_max():
    left = np.full((1, 28, 28), 50, dtype=np.uint8)
    right = np.full((1, 28, 28), 120, dtype=np.uint8)
    left[0, 10, 10] = 250  # canvas (10, 10) lies in both digits' regions
    canvas_out = overlay(left, right)[0]
    assert 10 in RESIZE_INDEX
    i = int(np.nonzero(RESIZE_INDEX == 10)[0][0])
    assert canvas_out[i, i] == 250
    # rows/cols sampled from the overlap region (canvas 6..27) hold max(50, 120) = 120 elsewhere
    inside = [k for k, src in enumerate(RESIZE_INDEX) if 6 <= src <= 27 and src != 10]
    assert np.all(canvas_out[np.ix_(inside, inside)] == 120)
    # the left-only band (canvas rows 0..5) keeps the left digit's value
    top = [k for k, src in enumerate(RESIZE_INDEX) if src < 6]
    assert np.all(canvas_out[np.ix_(top, inside)] == 50)


def test_overlay_rejects_bad_shapes():
    with pytest.raises(ValueError, match="28, 28"):
        overlay(np.zeros((2, 28, 27), np.uint8), np.zeros((2, 28, 27), np.uint8))


def test_right_indices_are_deterministic_and_saved(tmp_path):
    a, b = right_indices(1000, 3), right_indices(1000, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, right_indices(1000, 4))
    assert a.min() >= 0
    assert a.max() < 1000
    saved = saved_right_indices(1000, "val", 0, tmp_path)
    assert (tmp_path / "right_indices_val_seed0.txt").exists()
    np.testing.assert_array_equal(saved, saved_right_indices(1000, "val", 0, tmp_path))
    assert not np.array_equal(saved, saved_right_indices(1000, "test", 0, tmp_path))
    with pytest.raises(ValueError, match="indices"):
        saved_right_indices(999, "val", 0, tmp_path)


def test_build_split_keeps_targets_consistent():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64)
    split = build_split(images, labels, "train", seed=0, folder=None)
    idx = right_indices(64, 0)
    np.testing.assert_array_equal(split.arrays["label_right"].numpy(), labels[idx])
    np.testing.assert_array_equal(split.arrays["img_right"].numpy(), images[idx])
    np.testing.assert_array_equal(split.arrays["x"].numpy(), overlay(images, images[idx]))
    batch = next(split.batches(8))
    assert batch["x"].shape == (8, 1, 28, 28)
    assert batch["x"].dtype == torch.float32
    expected = (images[:8].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(batch["img_left"].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_real_splits_sizes_and_sources(mnist):
    problem = MultiMNIST("cl_cr", mnist=mnist)
    splits = problem.splits()
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 50_000,
        "val": 10_000,
        "test": 10_000,
    }
    np.testing.assert_array_equal(
        splits["val"].arrays["label_left"].numpy(), mnist.train_labels[50_000:]
    )
    np.testing.assert_array_equal(splits["test"].arrays["img_left"].numpy(), mnist.test_images)


@pytest.mark.parametrize("variant", ["cl_cr", "cl_rr", "rl_rr"])
def test_models_have_the_specified_shapes(variant):
    problem = MultiMNIST(variant)
    model = problem.make_model(dropout=0.3)
    z, outputs = model(torch.zeros(5, 1, 28, 28))
    assert z.shape == (5, 50)
    for task in problem.tasks:
        shape = (5, 10) if task.loss_type == "classification" else (5, 28, 28)
        assert outputs[task.name].shape == shape
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert encoder_params == (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 50 + 50)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        MultiMNIST("cl_xx")
