r"""Comparison metrics of Gama & Grassi's evaluation protocol (``docs/protocol.md``).

Metric tables are nested mappings ``{task: {metric: value}}``; ``lower_is_better`` has the same
shape with booleans.

* :func:`delta_m` — Gama & Grassi's per-task form (higher is better):
  :math:`\Delta_m = \frac{100}{N}\sum_i \frac1{M_i}\sum_j (-1)^{l_{ij}}
  \frac{M_{i,j} - M_{b,i,j}}{M_{b,i,j}}`, with :math:`l_{ij}=1` when lower is better. The
  code divides by :math:`|M_{b,i,j}|`: the same for the positive metrics of every problem we
  ship (accuracies, errors, MAE), and for a negative one it keeps "higher is better".
* :func:`delta_m_flat` — the flat per-metric average of Vandenhende et al. / Nash-MTL, with the
  same sign convention here (higher is better; Nash-MTL's QM9 code reports its negative).
* :func:`mean_rank` — rank methods per metric column (1 = best, ties get the average rank),
  average within a task, then over tasks (lower is better).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

Table = Mapping[str, Mapping[str, float]]
Directions = Mapping[str, Mapping[str, bool]]


def _relative_changes(values: Table, reference: Table, lower_is_better: Directions):
    for task, metrics in lower_is_better.items():
        if task not in values or task not in reference:
            raise KeyError(f"task {task!r} missing from the values or the reference")
        row = []
        for metric, lower in metrics.items():
            base = reference[task][metric]
            if base == 0:
                raise ZeroDivisionError(f"reference {task}/{metric} is 0: Δm is undefined")
            sign = -1.0 if lower else 1.0
            row.append(sign * (values[task][metric] - base) / abs(base))
        yield task, row


def delta_m(values: Table, reference: Table, lower_is_better: Directions) -> float:
    """Per-task Δm in percent (Gama & Grassi's Δ_mtm; higher is better).

    Accuracy 2 % better than the single-task reference on one task, error 10 % worse on the
    other:

    >>> values = {"cl": {"acc": 0.918}, "rr": {"mse": 0.55}}
    >>> reference = {"cl": {"acc": 0.9}, "rr": {"mse": 0.5}}
    >>> lower = {"cl": {"acc": False}, "rr": {"mse": True}}
    >>> round(delta_m(values, reference, lower), 6)
    -4.0
    """
    per_task = [sum(r) / len(r) for _, r in _relative_changes(values, reference, lower_is_better)]
    if not per_task:
        raise ValueError("Δm needs at least one task")
    return 100.0 * sum(per_task) / len(per_task)


def delta_m_flat(values: Table, reference: Table, lower_is_better: Directions) -> float:
    """Flat per-metric Δm in percent (every metric counts once; higher is better)."""
    flat = [c for _, r in _relative_changes(values, reference, lower_is_better) for c in r]
    if not flat:
        raise ValueError("Δm needs at least one metric")
    return 100.0 * sum(flat) / len(flat)


def mean_table(tables: Sequence[Table]) -> dict[str, dict[str, float]]:
    """Element-wise mean of ``{task: {metric: value}}`` tables (a method's seeds).

    >>> mean_table([{"cl": {"acc": 0.75}}, {"cl": {"acc": 0.25}}])
    {'cl': {'acc': 0.5}}
    """
    first = tables[0]
    return {t: {m: statistics.fmean(tab[t][m] for tab in tables) for m in first[t]} for t in first}


def average_ranks(values: list[float], lower_is_better: bool) -> list[float]:
    """Ranks starting at 1 for the best value; ties share the mean of their ranks. A NaN (a
    metric a diverged run could not score) ranks after every number, tied with the other NaNs:
    it is never better than a value, and it does not disturb the order of the others (a NaN key
    would leave ``sorted`` free to misplace every element).

    >>> average_ranks([0.3, 0.1, 0.3], lower_is_better=True)
    [2.5, 1.0, 2.5]
    >>> average_ranks([0.3, float("nan"), 0.1, 0.2], lower_is_better=True)
    [3.0, 4.0, 1.0, 2.0]
    """

    def key(i: int) -> tuple[bool, float]:
        v = values[i]
        return (True, 0.0) if math.isnan(v) else (False, v if lower_is_better else -v)

    order = sorted(range(len(values)), key=key)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and key(order[j + 1]) == key(order[i]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def mean_rank(results: Mapping[str, Table], lower_is_better: Directions) -> dict[str, float]:
    """Mean rank (MR) of each method over the compared set ``{method: table}``.

    >>> results = {
    ...     "unitary": {"cl": {"acc": 0.90}, "rr": {"mse": 0.50}},
    ...     "mgda": {"cl": {"acc": 0.92}, "rr": {"mse": 0.60}},
    ... }
    >>> mean_rank(results, {"cl": {"acc": False}, "rr": {"mse": True}})
    {'unitary': 1.5, 'mgda': 1.5}
    """
    methods = list(results)
    if not methods:
        raise ValueError("mean rank needs at least one method")
    per_task_sums = dict.fromkeys(methods, 0.0)
    for task, metrics in lower_is_better.items():
        task_ranks = dict.fromkeys(methods, 0.0)
        for metric, lower in metrics.items():
            column = [results[m][task][metric] for m in methods]
            for m, r in zip(methods, average_ranks(column, lower), strict=True):
                task_ranks[m] += r / len(metrics)
        for m in methods:
            per_task_sums[m] += task_ranks[m]
    n_tasks = len(lower_is_better)
    return {m: per_task_sums[m] / n_tasks for m in methods}
