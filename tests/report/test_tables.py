"""The sweep result's markdown and LaTeX tables: means with their spread, and none for one run."""

from __future__ import annotations

from mtopt.report.tables import format_cost, latex_table, markdown_table, rows_for_table


def _row(label: str, delta_m: list[float]) -> dict:
    return {
        "label": label,
        "test": {"A": {"acc": 0.9}},
        "test_std": {"A": {"acc": 0.01 if len(delta_m) > 1 else 0.0}},
        "delta_m": delta_m,
        "delta_m_flat": delta_m,
        "mean_rank": 1.0,
        "step_seconds": 0.01,
        "shared": {"lr": 0.001},
        "hparams": {},
    }


def test_one_run_shows_no_spread_and_several_show_theirs():
    result = {
        "directions": {"A": {"acc": False}},
        "references": {"test": {"A": {"acc": 0.95}}},
        "rows": [_row("three", [-1.0, -2.0, -3.0]), _row("one", [-4.0])],
    }
    header, refs, three, one = rows_for_table(result)
    assert header[1] == "A acc ↑"
    assert refs[0] == "single-task"
    assert three[1:3] == ["0.9000 ± 0.0100", "-2.00 ± 1.00"]
    assert one[1:3] == ["0.9000", "-4.00"]  # its spread is unknown, not 0
    assert "| one | 0.9000 | -4.00 |" in markdown_table(result)
    assert "$-2.00 \\pm 1.00$" not in latex_table(result)  # ± only, not the whole cell
    assert "-2.00 $\\pm$ 1.00" in latex_table(result)


def test_the_single_task_row_names_its_own_references_failed_runs_only():
    result = {
        "directions": {"A": {"acc": False}, "B": {"mse": True}},
        "references": {"test": {"A": {"acc": 0.95}, "B": {"mse": 0.1}}},
        "rows": [],
        # B/mse's failure is among Muon's references, whose numbers this row does not show
        "reference_failed_runs": {"A/acc": 1, "B/mse (muon)": 2},
    }
    _, refs = rows_for_table(result)
    assert refs[0] == "single-task (1 run(s) of A/acc failed, left out)"
    del result["reference_failed_runs"]  # a result written before the field existed
    assert rows_for_table(result)[1][0] == "single-task"


def test_the_cost_line_sums_the_phases_and_names_each():
    assert format_cost({}) == ""
    assert format_cost({"grids": {"runs": 0, "seconds": 0.0}}) == ""
    cost = {
        "single-task grid": {"runs": 4, "seconds": 3600.0},
        "grids": {"runs": 2, "seconds": 5400.0},
        "fixed": {"runs": 0, "seconds": 0.0},  # nothing stored yet: not named
    }
    assert format_cost(cost) == (
        "6 stored run(s) of this study, 2.5 h of training in all "
        "(single-task grid 4 in 1.0 h; grids 2 in 1.5 h)"
    )
