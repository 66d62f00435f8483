"""The report of ``mtopt bench``: markdown (set-up, one table per workload, a summary across
workloads, the solver tables, the targets), the ratio chart, and the files ``bench.md``,
``bench.json`` and ``bench.png``.

Columns: median, min and max ms over the measured steps; ``× plain``, the ratio of medians to the
plain step of the same run; ``× TorchJD``, an mtopt row over its TorchJD counterpart; for mtopt
rows the median of two phases of ``StepInfo.times`` (``gradients``, the per-task gradients, and
``method``, the method's own computation including a closure method's extra forwards or
updates); the peak memory growth (:class:`~mtopt.bench.measure.MemoryProbe`); notes (the
counterpart, the ratio to LibMTL, the measured updates per step M, unconverged solves, errors).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtopt.bench.contenders.base import LR
from mtopt.bench.labels import TORCHJD_PREFIX, libmtl_counterpart
from mtopt.bench.results import BenchResult, ContenderResult, WorkloadResult
from mtopt.bench.targets import TargetCheck, evaluate_targets, target_summary

__all__ = [
    "markdown_report",
    "markdown_table",
    "plot_ratios",
    "solver_table",
    "summary_table",
    "targets_table",
    "write_outputs",
]


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _notes(w: WorkloadResult, label: str, c: ContenderResult) -> str:
    notes = []
    if c.counterpart is not None:
        notes.append(f"vs {c.counterpart}")
    libmtl = w.ratio_to_libmtl(label)
    if libmtl is not None:
        notes.append(f"{libmtl:.2f}× {libmtl_counterpart(label)}")
    if c.groups:
        notes.append(
            f"M = {c.median_groups:g} group updates per batch ({min(c.groups)}–{max(c.groups)})"
        )
    if c.solver_failures:
        notes.append(f"solver not converged on {c.solver_failures}/{len(c.times)} steps")
    if c.error is not None:
        notes.append(f"FAILED {c.error}")
    return "; ".join(notes)


def markdown_table(w: WorkloadResult) -> str:
    """One workload's table: one row per contender."""
    lines = [
        "| contender | kind | median ms | min ms | max ms | × plain | × TorchJD | "
        "Jacobian ms | method ms | peak Δmem MB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, c in w.contenders.items():
        kind = c.kind if c.kind != "mtopt" else f"mtopt/{c.category}"
        lines.append(
            f"| `{label}` | {kind} | {_ms(c.median)} | {_ms(c.min)} | {_ms(c.max)} | "
            f"{_ratio(w.ratio_to_plain(label))} | {_ratio(w.ratio_to_torchjd(label))} | "
            f"{_ms(c.phases.get('gradients'))} | {_ms(c.phases.get('method'))} | "
            f"{_mb(c.peak)} | {_notes(w, label, c)} |"
        )
    return "\n".join(lines)


def summary_table(result: BenchResult) -> str:
    """Every contender across the workloads: median ms, × plain and × TorchJD per workload."""
    labels: list[str] = []
    for w in result.workloads:
        labels += [label for label in w.contenders if label not in labels]
    head = "| contender |" + "".join(
        f" {w.name} ms | × plain | × TorchJD |" for w in result.workloads
    )
    rule = "|---|" + "---:|---:|---:|" * len(result.workloads)
    lines = [head, rule]
    for label in labels:
        cells = []
        for w in result.workloads:
            c = w.contenders.get(label)
            if c is None or c.median is None:
                cells += ["—" if c is None else "failed", "", ""]
                continue
            cells += [
                _ms(c.median),
                _ratio(w.ratio_to_plain(label)),
                _ratio(w.ratio_to_torchjd(label)),
            ]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(checks: Sequence[TargetCheck]) -> str:
    """The targets as a markdown table."""
    lines = [
        "| target | workload | contender | ratio | limit | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for t in checks:
        ratio = "—" if t.ratio is None else f"{t.ratio:.3f}×"
        verdict = t.verdict + (f" ({t.note})" if t.note else "")
        lines.append(
            f"| {t.target} | {t.workload} | `{t.label}` | {ratio} | {t.limit:.2f}× | {verdict} |"
        )
    return "\n".join(lines)


def solver_table(w: WorkloadResult) -> str:
    """Inner solvers alone, on the Gramians of the method's measured steps."""
    lines = [
        "Inner solver alone, on the Gramians of the method's own measured steps (replayed in "
        "order, alternating):",
        "",
        "| method | reference | solves | ours median ms | reference median ms | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in w.solvers:
        if s.ratio is None:
            lines.append(f"| `{s.method}` | {s.reference} | — | — | — | {s.error} |")
            continue
        lines.append(
            f"| `{s.method}` | {s.reference} | {len(s.ours)} | "
            f"{_ms(statistics.median(s.ours))} | {_ms(statistics.median(s.theirs))} | "
            f"{1 / s.ratio:.1f}× |"
        )
    return "\n".join(lines)


def _setup_lines(result: BenchResult) -> list[str]:
    """The report's header: the command, the machine, the protocol, the memory probe."""
    m, o = result.machine, result.options
    lines = ["# mtopt bench", ""]
    if result.command:
        lines += [f"Command: `{result.command}`", ""]
    lines += [
        f"- torch {m.get('torch')}, TorchJD {m.get('torchjd') or 'not measured'}, Python "
        f"{m.get('python')}, {m.get('platform')}",
        f"- device {o.device}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, "
        f"{m.get('threads')} torch thread(s), {m.get('cpu_count')} CPU(s); load average "
        f"{m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end",
        f"- {o.warmup} warm-up + {o.steps} measured rounds per workload; each round every "
        f"contender steps once, in an order shuffled per round (seed {o.seed}); Adam lr {LR}",
        "- LibMTL: not installed — not measured"
        if not m.get("libmtl")
        else f"- LibMTL {m['libmtl']} (`--no-deps`, torchvision stubbed): its weighting "
        "strategies as rows `libmtl:<Name>`; an mtopt row's notes give its ratio to them",
        f"- memory: {result.memory}",
    ]
    lines += [f"- left out of the default method list: {note}" for note in result.notes]
    return [*lines, ""]


def markdown_report(result: BenchResult) -> str:
    """The whole report: set-up, one table per workload, the targets."""
    lines = _setup_lines(result)
    if len(result.workloads) > 1:
        lines += ["## Summary", "", summary_table(result), ""]
    for w in result.workloads:
        lines += [
            f"## {w.name}",
            "",
            w.description + f" ({w.seconds:.0f} s).",
            "",
            markdown_table(w),
            "",
        ]
        if w.solvers:
            lines += [solver_table(w), ""]
    checks = evaluate_targets(result)
    lines += ["## Targets", "", target_summary(checks) + ".", ""]
    if checks:
        lines += [targets_table(checks), ""]
    return "\n".join(lines)


def _plot_workload(ax: Any, w: WorkloadResult, ticker: Any) -> None:
    """One workload's bars: ours (and plain) with the TorchJD counterpart hatched beside, then
    TorchJD's unpaired aggregators."""
    ours = [lab for lab, c in w.contenders.items() if c.kind in ("plain", "mtopt")]
    paired = {w.contenders[lab].counterpart for lab in ours} - {None}
    alone = [lab for lab, c in w.contenders.items() if c.kind == "torchjd" and lab not in paired]
    xs, names = [], []
    for i, lab in enumerate([*ours, *alone]):
        c = w.contenders[lab]
        ratio = w.ratio_to_plain(lab)
        xs.append(i)
        names.append(lab.removeprefix(TORCHJD_PREFIX) if c.kind == "torchjd" else lab)
        if ratio is None:
            continue
        color = {"plain": "0.5", "mtopt": "C0", "torchjd": "C1"}[c.kind]
        hatch = "//" if c.kind == "torchjd" else None
        theirs = None if c.counterpart is None else w.ratio_to_plain(c.counterpart)
        if theirs is None:
            ax.bar(i, ratio, 0.8, color=color, hatch=hatch)
        else:
            ax.bar(i - 0.2, ratio, 0.4, color=color)
            ax.bar(i + 0.2, theirs, 0.4, color="C1", hatch="//")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("median step / plain step")
    ax.set_title(f"{w.name} (K = {w.num_tasks})", fontsize=10)


def plot_ratios(result: BenchResult, path: Path) -> Path:
    """Bar chart per workload (log scale): median step time over the plain step's, TorchJD's
    counterpart (hatched) next to ours, TorchJD's other aggregators at the end."""
    from mtopt.report.plots import _pyplot

    plt = _pyplot()  # matplotlib with the Agg backend, or a RuntimeError saying how to install it
    from matplotlib import ticker

    n = len(result.workloads)
    fig, axes = plt.subplots(n, 1, figsize=(14, 4.2 * n), squeeze=False)
    for ax, w in zip(axes[:, 0], result.workloads, strict=True):
        _plot_workload(ax, w, ticker)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="C0"),
        plt.Rectangle((0, 0), 1, 1, color="C1", hatch="//"),
        plt.Rectangle((0, 0), 1, 1, color="0.5"),
    ]
    axes[0, 0].legend(handles, ["mtopt", "TorchJD 0.18", "plain"], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: BenchResult, out_dir: Path, plot: bool = True) -> list[Path]:
    """``bench.md``, ``bench.json`` and (with ``plot``) ``bench.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.md", out_dir / "bench.json"]
    written[0].write_text(markdown_report(result))
    written[1].write_text(json.dumps(result.to_dict(), indent=1))
    if plot:
        written.append(plot_ratios(result, out_dir / "bench.png"))
    return written
