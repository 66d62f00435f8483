"""Figures from run records."""

from __future__ import annotations

import numpy as np
import pytest

from mtopt.report.plots import group_log, plot_groups


def record_with_groups() -> dict:
    def epoch(start: int) -> dict:
        steps = list(range(start, start + 3))
        return {
            "groups": {
                "step": steps,
                "num_groups": [2, 1, 2],
                "affinity": [[[s * 0.1, -s * 0.01], [0.0, s * 0.2]] for s in steps],
            }
        }

    return {
        "key": "k",
        "tasks": ["CL", "RR"],
        "config": {"method": "selective_groups", "problem": "multi_mnist/cl_rr"},
        "history": [epoch(0), epoch(3)],
    }


def test_group_log_concatenates_epochs():
    log = group_log(record_with_groups())
    assert log["step"].tolist() == list(range(6))
    assert log["num_groups"].tolist() == [2, 1, 2, 2, 1, 2]
    assert log["affinity"].shape == (6, 2, 2)
    np.testing.assert_allclose(log["affinity"][:, 1, 1], 0.2 * np.arange(6))


def test_plot_groups_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_groups(record_with_groups(), tmp_path / "groups.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = plot_groups(record_with_groups(), tmp_path / "groups")  # no suffix: the file written
    assert bare == tmp_path / "groups.png"
    assert bare.is_file()


def test_runs_without_a_group_log_are_refused():
    record = record_with_groups()
    record["config"]["method"] = "mgda"
    record["history"] = [{}]
    with pytest.raises(ValueError, match="no group log"):
        group_log(record)
