"""PNG figures from run records. matplotlib is imported lazily (extra ``mtopt[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "plots need matplotlib: pip install 'mtopt[plot]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_log(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Steps, number of groups and affinity matrices (steps × K × K) of a selective-group run."""
    steps, counts, affinity = [], [], []
    for epoch in record["history"]:
        log = epoch.get("groups")
        if log:
            steps += log["step"]
            counts += log["num_groups"]
            affinity += log["affinity"]
    if not steps:
        raise ValueError(
            f"run {record.get('key')} has no group log (method {record['config']['method']!r}; "
            "only selective_groups records one)"
        )
    return {
        "step": np.asarray(steps),
        "num_groups": np.asarray(counts),
        "affinity": np.asarray(affinity, dtype=float),
    }


def plot_groups(record: dict[str, Any], path: str | Path) -> Path:
    """Two panels, like Jeong & Yoon's Fig. 2(c, d): the number of task groups per step, and the
    proximal inter-task affinity A[source → target] of every task pair over training."""
    plt = _pyplot()
    log = group_log(record)
    tasks = record["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    left.step(log["step"], log["num_groups"], where="post", color="tab:blue")
    left.set_xlabel("training step")
    left.set_ylabel("number of task groups")
    left.set_yticks(range(1, len(tasks) + 1))
    left.set_title("task groups per batch")
    k = len(tasks)
    for s in range(k):
        for t in range(k):
            style = "-" if s != t else ":"
            right.plot(log["step"], log["affinity"][:, s, t], style, label=f"{tasks[s]}→{tasks[t]}")
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xlabel("training step")
    right.set_ylabel("affinity (EMA of relative loss decrease)")
    right.set_title("proximal inter-task affinity (dotted: self)")
    if k <= 6:
        right.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{record['config']['method']} on {record['config']['problem']}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
