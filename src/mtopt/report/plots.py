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
    if not path.suffix:  # matplotlib would add .png itself: return the file it writes
        path = path.with_suffix(".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_delta_m(result: dict[str, Any], path: str | Path) -> Path:
    """Gama & Grassi's Fig. 1: one box of per-seed test Δm per method, the median of unitary
    scalarization as a horizontal line (higher is better)."""
    plt = _pyplot()
    rows = result["rows"]
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.55 * len(rows) + 2), 5.2), constrained_layout=True)
    ax.boxplot([r["delta_m"] for r in rows], showmeans=True)
    ax.set_xticks(range(1, len(rows) + 1), labels, rotation=60, ha="right")
    unitary = [r for r in rows if r["label"].split(":")[0].split("@")[0] == "unitary"]
    if unitary:
        median = float(np.median(unitary[0]["delta_m"]))
        ax.axhline(median, color="tab:red", linestyle="--", label=f"unitary median {median:+.2f}")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("test Δm vs single-task, % (↑ better)")
    seeds = result["config"]["n_best_runs"]
    ax.set_title(f"{result['problem']}: Δm per method, {seeds} seed(s) each (▲ mean)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ema(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Exponential moving average over the first axis, started at the first value."""
    out = np.empty_like(values, dtype=float)
    for i, v in enumerate(values):
        out[i] = v if i == 0 else beta * out[i - 1] + (1 - beta) * v
    return out


def plot_weights(
    result: dict[str, Any], records: dict[str, dict[str, Any]], path: str | Path
) -> Path | None:
    """Gama & Grassi's Fig. 6: per method with weights, the per-epoch mean task weights
    (normalised to sum 1; solid) and their EMA with β = 0.9 (dashed), from the first run of the
    selected configuration. ``records``: run key → record. ``None`` if no method logs weights."""
    plt = _pyplot()
    panels = []
    for row in result["rows"]:
        name = row["label"].split(":")[0].split("@")[0]
        if name in ("unitary", "fixed") or row["label"].startswith("fixed from"):
            continue
        record = records.get(row["keys"][0])
        if record is None:
            continue
        epochs = [h["mean_weights"] for h in record["history"] if h.get("mean_weights")]
        if not epochs:
            continue
        w = np.asarray(epochs, dtype=float)
        w = w / w.sum(axis=1, keepdims=True)
        panels.append((row["label"], w, record["tasks"]))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, constrained_layout=True
    )
    for ax, (label, w, tasks) in zip(axes.flat, panels, strict=False):
        x = np.arange(1, len(w) + 1)
        smooth = ema(w)
        for k, task in enumerate(tasks):
            (line,) = ax.plot(x, w[:, k], label=task)
            ax.plot(x, smooth[:, k], "--", color=line.get_color())
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("normalised weight")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("task weights per epoch (solid) and their EMA β=0.9 (dashed)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cosine(
    result: dict[str, Any], records: dict[str, dict[str, Any]], path: str | Path
) -> Path | None:
    """Gama & Grassi's Fig. 3a/7: the mean cosine between each task's shared-parameter gradient
    and their mean, per epoch, under unitary scalarization (mean and range over runs)."""
    plt = _pyplot()
    curves = []
    for row in result["rows"]:
        for key in row["keys"]:
            record = records.get(key)
            if record and any("cosine" in h for h in record["history"]):
                curves.append([h.get("cosine", np.nan) for h in record["history"]])
    if not curves:
        return None
    c = np.asarray(curves, dtype=float)
    x = np.arange(1, c.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    ax.plot(x, np.nanmean(c, axis=0), marker="o", label=f"mean over {len(c)} run(s)")
    ax.fill_between(x, np.nanmin(c, axis=0), np.nanmax(c, axis=0), alpha=0.25, label="range")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("mean cos(g_i, mean g)")
    ax.set_ylim(min(0.0, float(np.nanmin(c)) - 0.05), 1.0)
    ax.set_title(f"{result['problem']}: gradient agreement (unitary)", fontsize=10)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curves(
    result: dict[str, Any], records: dict[str, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Per row (label → array ``runs × epochs``): the best validation Δm up to each epoch
    (the protocol's model selection, :doc:`/protocol`), from each run's epoch log. Rows whose runs
    log no Δm (single-task references) are left out; runs of one row are cut to the shortest."""
    curves: dict[str, np.ndarray] = {}
    for row in result["rows"]:
        runs = []
        for key in row["keys"]:
            record = records.get(key)
            if record is None:
                continue
            values = [h.get("score_delta_m") for h in record["history"]]
            if values and all(v is not None for v in values):
                runs.append(np.maximum.accumulate(np.asarray(values, dtype=float)))
        if runs:
            length = min(len(r) for r in runs)
            curves[row["label"]] = np.stack([r[:length] for r in runs])
    return curves


def plot_learning_curves(
    result: dict[str, Any],
    records: dict[str, dict[str, Any]],
    path: str | Path,
    baseline: str | None = None,
) -> Path | None:
    """The curves that justify a study's epoch budget: per method, the best validation Δm up to
    each epoch (mean over runs; left), and its difference to ``baseline``'s (right), which is what
    a comparison reads: once it is flat, more epochs would not change the verdicts. ``None`` if no
    run logs a validation Δm."""
    curves = learning_curves(result, records)
    if not curves:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    from mtopt.report.comparison import baseline_label  # the rule the statistics use

    baseline = baseline_label(list(curves), baseline)
    base = curves.get(baseline) if baseline is not None else None
    for i, (label, c) in enumerate(curves.items()):
        x = np.arange(1, c.shape[1] + 1)
        style = ("-", "--", ":")[i // 10 % 3]  # the colour cycle has 10: a study has more rows
        (line,) = left.plot(x, c.mean(axis=0), style, label=f"{label} ({len(c)} run(s))")
        if base is not None and label != baseline:
            n = min(c.shape[1], base.shape[1])
            diff = c.mean(axis=0)[:n] - base.mean(axis=0)[:n]
            right.plot(x[:n], diff, style, color=line.get_color())
    left.set_xlabel("epoch")
    left.set_ylabel("best validation Δm so far (%)")
    if len(curves) <= 8:
        left.legend(fontsize=7)
    else:  # a whole study: beside the panels, not over the curves
        fig.set_size_inches(14, 4.5)
        fig.legend(loc="outside right upper", fontsize=7)
    right.axhline(0.0, color="0.5", lw=0.8)
    right.set_xlabel("epoch")
    right.set_ylabel(f"difference to {baseline} (points)" if base is not None else "")
    fig.suptitle(f"{result['problem']}: learning curves ({result['name']})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: where the learning-curve table reads the curves, as fractions of the longest run
CURVE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)


def learning_curve_table(
    result: dict[str, Any],
    records: dict[str, dict[str, Any]],
    epochs: tuple[int, ...] | None = None,
) -> str:
    """Markdown: the best validation Δm up to the given epochs (mean over runs), per method;
    by default at 10, 20, 30, 40, 60, 80 and 100 % of the longest run (epochs 10 … 100 of a
    100-epoch run, 40 … 400 of a 400-epoch one)."""
    curves = learning_curves(result, records)
    if not curves:
        return ""
    longest = max(c.shape[1] for c in curves.values())
    if epochs is None:
        epochs = tuple(sorted({max(1, round(f * longest)) for f in CURVE_FRACTIONS}))
    cols = [e for e in epochs if e <= longest] or [longest]
    lines = [
        "| method | " + " | ".join(f"epoch {e}" for e in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, c in curves.items():
        mean = c.mean(axis=0)
        cells = [f"{mean[e - 1]:+.2f}" if e <= len(mean) else "" for e in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_delta_m_ci(comparison: Any, path: str | Path) -> Path:
    """Δm per method with its confidence interval (:mod:`mtopt.report.comparison`), best first;
    the baseline's mean as a dashed line, published values as open markers when given."""
    plt = _pyplot()
    rows = sorted(comparison.rows, key=lambda r: -r.delta_m.mean)
    x = np.arange(len(rows))
    means = np.array([r.delta_m.mean for r in rows])
    lo = np.array([r.delta_m.lo for r in rows])
    hi = np.array([r.delta_m.hi for r in rows])
    errors = np.where(np.isnan(lo), 0.0, np.vstack([means - lo, hi - means]))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * len(rows) + 2), 5.0), constrained_layout=True)
    ax.errorbar(x, means, yerr=errors, fmt="o", capsize=3, label="this study (mean, CI)")
    published = [(i, r.published) for i, r in enumerate(rows) if r.published is not None]
    if published:
        px, py = zip(*published, strict=True)
        ax.plot(px, py, "s", mfc="none", color="tab:green", label=comparison.published_title)
    base = next((r for r in rows if r.label == comparison.baseline), None)
    if base is not None:
        ax.axhline(base.delta_m.mean, color="tab:red", linestyle="--", label=base.label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(x, [r.label for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test Δm vs single-task, % (↑ better)")
    pct = round(100 * comparison.level)
    ax.set_title(f"{comparison.problem}: Δm with {pct} % t intervals over seeds", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
