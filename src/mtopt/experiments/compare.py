"""Compare methods on one problem against single-task references (``docs/protocol.md``).

1. Single-task references: one run per task (and seed) with unitary scalarization on that task
   alone; each metric keeps its best validation epoch; values are means over seeds.
2. Each method: one run per seed, selected on validation Δm against the references (a row may
   use another base optimizer than the references: ``mgda_ub@muon``, ``unitary@apt``).
3. Table: mean test metrics per method, test Δm (per-task form, higher is better) mean ± std over
   seeds, and the mean rank (MR) over the compared methods.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mtopt.evaluation.metrics import delta_m, delta_m_flat, mean_rank, mean_table
from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments.database import BUSY, CLAIMED, ClaimLostError, RunDatabase
from mtopt.experiments.train import (
    Callback,
    RunConfig,
    run_key,
    train_run,
)
from mtopt.problems import Problem, get_problem
from mtopt.specs import parse_spec, run_options

logger = logging.getLogger("mtopt")

RunHook = Callable[[str, RunConfig, bool], Callback | None]


@dataclass
class MethodRow:
    label: str
    test: dict[str, dict[str, float]]
    delta_m: float | None
    delta_m_std: float | None
    mean_rank: float | None
    step_seconds: float
    seeds: int
    solver_failures: int = 0
    delta_m_flat: float | None = None


@dataclass
class Comparison:
    problem: str
    directions: dict[str, dict[str, bool]]
    reference: dict[str, dict[str, dict[str, float]]]
    rows: list[MethodRow] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)


def run_or_load(
    store: RunDatabase,
    config: RunConfig,
    problem: Problem,
    references: Any,
    hook: RunHook | None,
    label: str,
) -> dict[str, Any]:
    """The stored record of ``config``, or train it (claimed in the store, so that another
    process on the same store waits for it instead of training it too)."""
    key = run_key(config, references)
    announced = False
    while True:  # once more when this process's claim was taken over while it trained
        cached = store.get(key)
        if cached is not None:
            if hook:
                hook(label, config, True)
            return cached
        status = store.claim(key)
        if status != CLAIMED:
            if status == BUSY:
                if not announced:
                    logger.warning(
                        "%s (seed %d): another process is training this run; waiting for it",
                        label,
                        config.seed,
                    )
                    announced = True
                time.sleep(2.0)
            continue
        callback = hook(label, config, False) if hook else None
        checkpoint = store.checkpoint_path(key)
        try:
            result = train_run(
                config,
                references=references,
                problem=problem,
                callback=callback,
                checkpoint=checkpoint,
                holds=lambda: store.holds(key),
            )
            store.put(result)
        except ClaimLostError as exc:  # the other process finishes it: wait for its record
            logger.warning("%s", exc)
            store.release(key)
            continue
        except BaseException:
            store.release(key)
            raise
        checkpoints.remove(checkpoint)
        return result


def single_task_references(
    problem: Problem,
    base: RunConfig,
    seeds: Sequence[int],
    store: RunDatabase,
    hook: RunHook | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """``({"val": table, "test": table}, median seconds per step)`` from single-task runs."""
    val_tables, test_tables, step_times = {}, {}, []
    for task in problem.task_names:
        vals, tests = [], []
        for seed in seeds:
            config = replace(base, method="unitary", hparams={}, tasks=(task,), seed=seed)
            result = run_or_load(store, config, problem, None, hook, f"single-task {task}")
            vals.append({task: result["val"][task]})
            tests.append({task: result["test"][task]})
            step_times.append(result["step_seconds_median"])
        val_tables.update(mean_table(vals))
        test_tables.update(mean_table(tests))
    return {"val": val_tables, "test": test_tables}, statistics.median(step_times)


def compare(
    problem_name: str,
    method_specs: Sequence[str],
    base: RunConfig,
    seeds: Sequence[int],
    store: RunDatabase,
    hook: RunHook | None = None,
    problem: Problem | None = None,
) -> Comparison:
    parsed = [(spec, *parse_row_spec(spec)) for spec in method_specs]  # fail fast on typos
    problem = problem if problem is not None else get_problem(problem_name)
    base = replace(base, problem=problem_name, tasks=None)
    directions = problem.lower_is_better()
    refs, stl_step = single_task_references(problem, base, seeds, store, hook)
    comparison = Comparison(problem_name, directions, refs, base=base.to_dict())
    comparison.rows.append(
        MethodRow("single-task", refs["test"], 0.0, 0.0, None, stl_step, len(seeds))
    )
    for spec, name, hparams, optimizer in parsed:
        tests, deltas, flats, step_times, failures = [], [], [], [], 0
        for seed in seeds:
            config = replace(base, method=name, hparams=hparams, seed=seed, **optimizer)
            result = run_or_load(store, config, problem, refs, hook, spec)
            tests.append(result["test"])
            deltas.append(delta_m(result["test"], refs["test"], directions))
            flats.append(delta_m_flat(result["test"], refs["test"], directions))
            step_times.append(result["step_seconds_median"])
            failures += result["solver_failures"]
        comparison.rows.append(
            MethodRow(
                label=spec,
                test=mean_table(tests),
                delta_m=statistics.fmean(deltas),
                delta_m_std=statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                mean_rank=None,
                step_seconds=statistics.median(step_times),
                seeds=len(seeds),
                solver_failures=failures,
                delta_m_flat=statistics.fmean(flats),
            )
        )
    methods = {row.label: row.test for row in comparison.rows[1:]}
    if methods:
        ranks = mean_rank(methods, directions)
        for row in comparison.rows[1:]:
            row.mean_rank = ranks[row.label]
    return comparison


def parse_row_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A comparison row (:mod:`mtopt.specs`): ``"mgda_ub@muon"`` → ``("mgda_ub", {},
    {"optimizer": "muon", "apt": False})``; the third item holds the run options the suffixes
    set (base optimizer, gradient engine), empty without suffixes."""
    parsed = parse_spec(spec)
    return parsed.name, dict(parsed.hparams), run_options(parsed)


def format_table(comparison: Comparison) -> str:
    """A markdown table of the comparison."""
    columns = [(t, m, lo) for t, ms in comparison.directions.items() for m, lo in ms.items()]
    header = ["method"] + [f"{t} {m} {'↓' if lo else '↑'}" for t, m, lo in columns]
    flat = any(len(ms) > 1 for ms in comparison.directions.values())
    header += ["Δm % ↑"] + (["Δm flat % ↑"] if flat else []) + ["MR ↓", "ms/step"]
    baseline = next(
        (r.step_seconds for r in comparison.rows if r.label.split(":")[0] == "unitary"), None
    )
    if baseline:
        header.append("× unitary")
    uncertified = any(r.solver_failures for r in comparison.rows)
    if uncertified:
        header.append("uncertified steps")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison.rows:
        cells = [row.label] + [f"{row.test[t][m]:.4f}" for t, m, _ in columns]
        if row.delta_m is None:
            cells.append("—")
        elif row.label == "single-task":
            cells.append("0 (ref.)")
        else:
            cells.append(f"{row.delta_m:+.2f} ± {row.delta_m_std:.2f}")
        if flat:
            cells.append(
                "0 (ref.)"
                if row.label == "single-task"
                else ("—" if row.delta_m_flat is None else f"{row.delta_m_flat:+.2f}")
            )
        cells.append("—" if row.mean_rank is None else f"{row.mean_rank:.2f}")
        cells.append(f"{1000 * row.step_seconds:.0f}")
        if baseline:
            cells.append(f"{row.step_seconds / baseline:.2f}")
        if uncertified:
            cells.append(str(row.solver_failures))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
