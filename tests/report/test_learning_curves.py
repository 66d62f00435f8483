"""The learning curves a study's epoch budget is chosen from (mtopt.report.plots)."""

from __future__ import annotations

import numpy as np
import pytest

from mtopt.report.comparison import baseline_label
from mtopt.report.plots import learning_curve_table, learning_curves, plot_learning_curves


def _record(scores):
    return {"history": [{"epoch": i, "score_delta_m": s} for i, s in enumerate(scores)]}


def _result():
    rows = [
        {"label": "unitary", "keys": ["u1", "u2"]},
        {"label": "cagrad", "keys": ["c1"]},
        {"label": "CL", "keys": ["ref"]},  # a single-task reference: no Δm in its log
    ]
    return {"name": "t", "problem": "p", "rows": rows}


def _records():
    return {
        "u1": _record([-30.0, -20.0, -25.0, -10.0]),
        "u2": _record([-40.0, -22.0, -21.0]),
        "c1": _record([-5.0, -7.0, -1.0, -2.0]),
        "ref": {"history": [{"epoch": 0, "score_delta_m": None}]},
    }


def test_curves_are_the_best_so_far_cut_to_the_shortest_run():
    curves = learning_curves(_result(), _records())
    assert set(curves) == {"unitary", "cagrad"}
    np.testing.assert_array_equal(curves["unitary"], [[-30, -20, -20], [-40, -22, -21]])
    np.testing.assert_array_equal(curves["cagrad"], [[-5, -5, -1, -1]])
    for c in curves.values():  # never decreasing: model selection keeps the best epoch
        assert (np.diff(c, axis=1) >= 0).all()


def test_table_reads_the_mean_at_each_epoch_it_has():
    table = learning_curve_table(_result(), _records(), epochs=(1, 3, 4))
    lines = table.splitlines()
    assert lines[0] == "| method | epoch 1 | epoch 3 | epoch 4 |"
    assert lines[2] == "| unitary | -35.00 | -20.50 |  |"
    assert lines[3] == "| cagrad | -5.00 | -1.00 | -1.00 |"


def test_the_default_columns_follow_the_length_of_the_runs():
    """Epochs 10 … 100 of a 100-epoch study, 40 … 400 of a 400-epoch one, each once for short
    runs (the paper's 100 epochs were the only length the table read before)."""
    for length, expected in [
        (100, [10, 20, 30, 40, 60, 80, 100]),
        (400, [40, 80, 120, 160, 240, 320, 400]),
        (60, [6, 12, 18, 24, 36, 48, 60]),
        (4, [1, 2, 3, 4]),
    ]:
        records = {"u1": _record(list(np.linspace(-50.0, -10.0, length)))}
        result = {"name": "t", "problem": "p", "rows": [{"label": "unitary", "keys": ["u1"]}]}
        header = learning_curve_table(result, records).splitlines()[0]
        assert header == "| method | " + " | ".join(f"epoch {e}" for e in expected) + " |"


def test_nothing_to_plot_without_a_delta_m(tmp_path):
    result = {"name": "t", "problem": "p", "rows": [{"label": "CL", "keys": ["ref"]}]}
    assert plot_learning_curves(result, _records(), tmp_path / "x.png") is None
    assert learning_curve_table(result, _records()) == ""


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_learning_curves(_result(), _records(), tmp_path / "c.png", baseline="unitary")
    assert path is not None
    assert path.stat().st_size > 1000


def test_the_baseline_is_found_as_the_report_finds_it():
    """``--baseline unitary`` names the row ``unitary:reduction=mean`` (the studies' unitary rows
    carry that option): the right panel, the difference to the baseline, was empty before."""
    labels = ["unitary:reduction=mean", "famo", "nash_mtl"]
    assert baseline_label(labels, "unitary") == "unitary:reduction=mean"
    assert baseline_label(labels, "famo") == "famo"
    assert baseline_label(labels, "cagrad") is None
    assert baseline_label(labels, None) is None
