"""How ``mtopt bench`` measures: interleaved rounds, the clock, the memory probe, the machine.

**Interleaving.** Every round, each contender does one step, in an order shuffled per round with
a fixed seed (``random.Random(seed)``), so that a drift of the machine's load hits every
contender alike; the first ``warmup`` rounds are not timed. All contenders of a round see the
same batch. A contender that raises is reported with its error and left out of later rounds;
the others go on.

**Time.** ``time.perf_counter`` around the whole step, forward included, after a CUDA
synchronisation on GPU. A contender's untimed :meth:`~mtopt.bench.contenders.Contender.observe`
hook runs before each measured step (outside the clock and the memory probe).

**Memory.** On CUDA the peak of ``torch.cuda.max_memory_allocated`` above the allocation before
the step (reset per step); on CPU (Linux) the growth of the peak resident set size during the
step (``/proc/self/clear_refs`` ← 5 resets ``VmHWM``; ``VmRSS`` before, ``VmHWM`` after) —
approximate: the allocator's caching (glibc's heap, memory freed by another contender) hides
part of it.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mtopt.bench.contenders.base import Contender, StepOutcome
from mtopt.bench.options import BenchOptions
from mtopt.bench.results import ContenderResult
from mtopt.bench.workloads import Batch

__all__ = ["MemoryProbe", "machine_info", "run_rounds", "sync"]


class MemoryProbe:
    """Peak memory of one step: CUDA's allocator statistics, or on Linux the growth of the peak
    resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``). Approximate on CPU:
    memory the allocator keeps cached from earlier steps is not counted again."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.available = self.cuda or self._proc_works()
        self._before = 0

    @property
    def description(self) -> str:
        if self.cuda:
            return (
                "CUDA: peak of torch.cuda.max_memory_allocated during the step above the "
                "allocation before it (peak statistics reset per step)"
            )
        if self.available:
            return (
                "CPU: growth of the peak resident set size during the step (VmHWM after the "
                "step − VmRSS before it, VmHWM reset by writing 5 to /proc/self/clear_refs); "
                "approximate: memory the allocator keeps cached from earlier steps, of any "
                "contender, is not counted again"
            )
        return "n/a (needs CUDA or Linux /proc/self/clear_refs)"

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def _proc_works(self) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return self._status_kb("VmHWM") is not None and self._status_kb("VmRSS") is not None

    def start(self) -> None:
        if not self.available:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        self._before = (self._status_kb("VmRSS") or 0) * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def stop(self) -> int | None:
        if not self.available:
            return None
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        peak = self._status_kb("VmHWM")
        return None if peak is None else max(0, peak * 1024 - self._before)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that the clock covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Rounds:
    """The state of one workload's interleaved rounds: the probe and the phase times."""

    def __init__(self, contenders: Sequence[Contender], device: torch.device) -> None:
        self.device = device
        self.probe = MemoryProbe(device)
        self.active = list(contenders)
        self.phases: dict[str, dict[str, list[float]]] = {c.result.label: {} for c in contenders}

    def step(self, contender: Contender, batch: Batch, r: int, measured: bool) -> None:
        """One timed step of ``contender`` in round ``r``; a failure retires it."""
        try:
            if measured:
                contender.observe(batch)
                self.probe.start()
            sync(self.device)
            t0 = time.perf_counter()
            outcome = contender.step(batch)
            sync(self.device)
            elapsed = time.perf_counter() - t0
            peak = self.probe.stop() if measured else None
        except Exception as exc:  # one failing contender must not end the benchmark
            contender.result.error = f"round {r}: {type(exc).__name__}: {exc}"
            self.active.remove(contender)
            return
        if measured:
            self._record(contender.result, outcome, elapsed, peak)

    def _record(
        self, res: ContenderResult, outcome: StepOutcome, elapsed: float, peak: int | None
    ) -> None:
        res.times.append(elapsed)
        res.peak_memory.append(peak)
        for phase, seconds in outcome.times.items():
            self.phases[res.label].setdefault(phase, []).append(seconds)
        if outcome.updates is not None:
            res.groups.append(outcome.updates)
        res.solver_failures += outcome.solver_failed

    def medians(self, contenders: Sequence[Contender]) -> None:
        """Store each contender's median time per phase."""
        for c in contenders:
            phases = self.phases[c.result.label]
            c.result.phases = {k: statistics.median(v) for k, v in phases.items() if v}


def run_rounds(
    contenders: Sequence[Contender],
    batches: Sequence[Batch],
    *,
    warmup: int,
    steps: int,
    seed: int,
    device: torch.device,
    stage_done: Callable[[str], None] | None = None,
) -> list[list[str]]:
    """``warmup`` untimed then ``steps`` measured rounds (module doc), recorded in each
    contender's ``result``; round ``r`` uses ``batches[r % len(batches)]``. Returns the labels of
    each round in the order they stepped; ``stage_done("warm-up" | "measured")`` is called when
    the warm-up and the measured rounds end."""
    order_rng = random.Random(seed)
    state = _Rounds(contenders, device)
    orders: list[list[str]] = []
    rounds = warmup + steps
    for r in range(rounds):
        order = list(state.active)
        order_rng.shuffle(order)
        orders.append([c.result.label for c in order])
        for contender in order:
            state.step(contender, batches[r % len(batches)], r, measured=r >= warmup)
        if stage_done is not None and (r + 1 == warmup or r + 1 == rounds):
            stage_done("warm-up" if r + 1 == warmup else "measured")
    state.medians(contenders)
    return orders


def machine_info(options: BenchOptions) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, device, load."""
    device = options.device
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import torchjd

        info["torchjd"] = getattr(torchjd, "__version__", None) or _dist_version("torchjd")
    except ImportError:
        info["torchjd"] = None
    info["libmtl"] = _dist_version("LibMTL")
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
