"""A whole ``mtopt bench`` run: for each workload, set up the contenders, run the interleaved
rounds, compare the recorded inner solvers alone; then the report (:func:`main`, the CLI's entry
point, prints it and writes the files)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from mtopt.bench.contenders import Contender, build_contenders, default_specs, torchjd_available
from mtopt.bench.measure import MemoryProbe, machine_info, run_rounds
from mtopt.bench.options import BenchOptions, command_line, options_from_args
from mtopt.bench.report import markdown_report, write_outputs
from mtopt.bench.results import BenchResult, SolverResult, WorkloadResult
from mtopt.bench.solvers import compare_solver
from mtopt.bench.targets import evaluate_targets, target_summary
from mtopt.bench.workloads import Workload, get_workload

__all__ = ["main", "method_specs", "run_bench", "run_workload"]


def method_specs(options: BenchOptions, notify: Callable[[str], None] | None = None) -> list[str]:
    """The mtopt specs of a run: ``options.methods``, else :func:`default_specs` (which says
    through ``notify`` which methods it leaves out)."""
    if options.methods is not None:
        return list(options.methods)
    return default_specs(notify)


def _compare_solvers(contenders: Sequence[Contender]) -> list[SolverResult]:
    """Each recorded method's solver alone, once per method (from its first clean row)."""
    out: list[SolverResult] = []
    for contender in contenders:
        samples = contender.solver_samples()
        if samples is None or contender.result.error is not None:
            continue
        if not any(s.method == samples.method for s in out):
            out.append(compare_solver(samples.method, samples.gramians))
    return out


def run_workload(
    workload: Workload,
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
    specs: Sequence[str] | None = None,
) -> WorkloadResult:
    """Every contender on one workload, interleaved round by round
    (:mod:`mtopt.bench.measure`); ``specs``: the mtopt rows (default :func:`method_specs`)."""
    device = torch.device(options.device)
    started = time.perf_counter()
    specs = method_specs(options) if specs is None else specs
    contenders, failed = build_contenders(workload, options, device, specs)
    gen = torch.Generator().manual_seed(options.seed)
    batches = [{k: v.to(device) for k, v in workload.make_batch(gen).items()} for _ in range(2)]
    results = {c.result.label: c.result for c in contenders}
    out = WorkloadResult(
        workload.name, workload.description, workload.num_tasks, results, warmup=options.warmup
    )

    def stage_done(stage: str) -> None:
        if progress is not None:
            elapsed = time.perf_counter() - started
            progress(f"{workload.name}: {stage} rounds done ({elapsed:.0f} s)")

    out.order = run_rounds(
        contenders,
        batches,
        warmup=options.warmup,
        steps=options.steps,
        seed=options.seed,
        device=device,
        stage_done=stage_done,
    )
    for res in failed:
        results[res.label] = res
    out.solvers = _compare_solvers(contenders)
    out.seconds = time.perf_counter() - started
    return out


@contextlib.contextmanager
def _engine_log_quiet() -> Iterator[None]:
    """The engine logs every unconverged inner solve; the bench counts them instead."""
    engine_log = logging.getLogger("mtopt")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        engine_log.setLevel(level)


def run_bench(
    options: BenchOptions,
    progress: Callable[[str], None] | None = None,
    command: str = "",
) -> BenchResult:
    """Measure every workload of ``options``; nothing is written (see :func:`write_outputs`).
    ``progress`` receives one line per stage, and one per method left out of the default
    list."""
    options.validate()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.torchjd and not torchjd_available():
        if progress is not None:
            progress("TorchJD is not installed: its aggregators are not measured")
        options = replace(options, torchjd=False)
    notes: list[str] = []
    specs = method_specs(options, notes.append)
    if progress is not None:
        for note in notes:
            progress(note)
    machine = machine_info(options)
    memory = MemoryProbe(torch.device(options.device)).description
    with _engine_log_quiet():
        results = [
            run_workload(get_workload(name), options, progress, specs) for name in options.workloads
        ]
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return BenchResult(options, results, machine, memory, command, notes)


def main(args: argparse.Namespace) -> int:
    """Run ``mtopt bench`` from parsed options: print the tables and the targets, write the
    files to ``--out-dir``. Returns 0 (missed targets are reported, not failures)."""
    options = options_from_args(args)
    options.validate()
    command = command_line(options)

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    print(
        f"mtopt bench — {', '.join(options.workloads)}: {options.warmup} warm-up + "
        f"{options.steps} measured interleaved rounds, device {options.device}",
        file=sys.stderr,
    )
    result = run_bench(options, progress, command)
    print(markdown_report(result))
    print(f"targets: {target_summary(evaluate_targets(result))} (table above)")
    if not result.machine.get("libmtl"):
        print("LibMTL: not installed — not measured.")
    if options.out_dir is not None:
        for path in write_outputs(result, options.out_dir):
            print(f"wrote {path}")
    return 0
