"""Markdown and LaTeX tables of a sweep result (``SweepResult.to_dict()``)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from mtopt.evaluation.statistics import sample_std

NOTE = (
    "Test metrics: mean (± std) over the best configuration's runs (a single run: no std). Δm: "
    "Gama & Grassi's per-task relative change against the single-task references, in %, higher "
    "is better; Δm flat: the plain mean over all metrics (Nash-MTL's form) with the same sign "
    "(their code prints its negative). MR: mean rank over the listed methods, lower is better. "
    "s/step: median wall time of one training step."
)


def _columns(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [(t, m, lo) for t, ms in result["directions"].items() for m, lo in ms.items()]


def _hparams(row: dict[str, Any]) -> str:
    items = {**row["shared"], **row["hparams"]}
    if row.get("weights") is not None:
        items["weights"] = "/".join(f"{w:.3f}" for w in row["weights"])
    return ", ".join(f"{k}={_short(v)}" for k, v in items.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "/".join(_short(v) for v in value)
    return str(value)


def mean_sd(mean: float, std: float, runs: int, digits: int = 2, sign: str = "") -> str:
    """``mean ± std``, or the mean alone for one run (whose spread is unknown, not 0)."""
    shown = f"{mean:{sign}.{digits}f}"
    return shown if runs < 2 else f"{shown} ± {std:.{digits}f}"


def rows_for_table(result: dict[str, Any]) -> list[list[str]]:
    """Header plus one line per row (single-task references first), as plain cells."""
    columns = _columns(result)
    header = ["method"] + [f"{t} {m} {'↓' if lo else '↑'}" for t, m, lo in columns]
    header += ["Δm % ↑", "Δm flat % ↑", "MR ↓", "s/step", "best hyperparameters"]
    lines = [header]
    refs = result["references"]["test"]
    # this row's numbers are the sweep's optimizer's references: their keys are the columns'
    # ``task/metric`` (another optimizer's carry its name after them)
    failed = result.get("reference_failed_runs") or {}
    counts = [(f"{t}/{m}", failed.get(f"{t}/{m}", 0)) for t, m, _ in columns]
    lines.append(
        ["single-task" + "".join(f" ({n} run(s) of {k} failed, left out)" for k, n in counts if n)]
        + [f"{refs[t][m]:.4f}" for t, m, _ in columns]
        + ["0 (ref.)", "0 (ref.)", "—", "—", "per metric"]
    )
    for row in result["rows"]:
        values = row["delta_m"]
        runs = len(values)
        std = sample_std(values)
        failed = row.get("failed_runs", 0)
        cells = [row["label"] + (f" ({failed} run(s) failed, left out)" if failed else "")]
        for t, m, _ in columns:
            cells.append(mean_sd(row["test"][t][m], row["test_std"][t][m], runs, 4))
        flat = row.get("delta_m_flat")
        cells += [
            mean_sd(statistics.fmean(values), std, runs, 2, "+"),
            "—" if not flat else f"{statistics.fmean(flat):+.2f}",
            f"{row['mean_rank']:.2f}",
            f"{row['step_seconds']:.3f}",
            _hparams(row),
        ]
        lines.append(cells)
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    lines = rows_for_table(result)
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out) + "\n\n" + NOTE + "\n"


def latex_table(result: dict[str, Any]) -> str:
    lines = rows_for_table(result)

    def tex(cell: str) -> str:
        cell = cell.replace("\\", "\\textbackslash{}")
        for char in "&%$#_{}":
            cell = cell.replace(char, "\\" + char)
        return (
            cell.replace("±", "$\\pm$")
            .replace("↓", "$\\downarrow$")
            .replace("↑", "$\\uparrow$")
            .replace("Δ", "$\\Delta$")
            .replace("—", "--")
        )

    spec = "l" + "r" * (len(lines[0]) - 2) + "l"
    out = [
        "\\begin{tabular}{" + spec + "}",
        "\\toprule",
        " & ".join(tex(c) for c in lines[0]) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(tex(c) for c in cells) + " \\\\" for cells in lines[1:]]
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def format_cost(cost: Mapping[str, Mapping[str, float]]) -> str:
    """One line: how many of the study's runs are stored and the sum of their wall times,
    in all and by phase (``SweepResult.cost``); empty when none is stored. A run's wall time
    is on the threads it had (``threads`` in its record): one core's hours at ``--threads 1``."""
    runs = int(sum(p["runs"] for p in cost.values()))
    if not runs:
        return ""
    hours = sum(p["seconds"] for p in cost.values()) / 3600
    parts = "; ".join(
        f"{label} {int(p['runs'])} in {p['seconds'] / 3600:.1f} h"
        for label, p in cost.items()
        if p["runs"]
    )
    return f"{runs} stored run(s) of this study, {hours:.1f} h of training in all ({parts})"
