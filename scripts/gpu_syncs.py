"""Where a multi-task step waits for the GPU: host synchronisations per step, by source line.

A CUDA step is fast when the host queues kernels ahead of the device; each `.item()`, `float()`,
`bool()` of a device tensor, device-to-host copy or data-dependent shape makes the host wait for
everything queued so far. torch's sync debug mode reports each one; this script counts them over
a few steps of each method on one of `mtopt bench`'s workloads and names the innermost line of
mtopt (or of the method's solver) that asked for it.

    python scripts/gpu_syncs.py --workload mlp11 --methods unitary,upgrad,mgda --out syncs.md

Needs a CUDA device. The counts depend on the method's path only (not on timing), so one step
after the warm-up is representative; the script runs ``--steps`` of them and reports the mean.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import mtopt
from mtopt.bench.contenders import one_contender
from mtopt.bench.workloads import get_workload

DEFAULT_METHODS = "unitary,famo,mgda,mgda_ub,upgrad,upgrad#gramian,cagrad,nash_mtl,pcgrad"


#: the folder that holds the mtopt package: frames under it are named from ``mtopt/`` on
_PACKAGE_ROOT = str(Path(mtopt.__file__).parent.parent)


def _short(frame: traceback.FrameSummary) -> str:
    name = frame.filename
    if name.startswith(_PACKAGE_ROOT + "/"):
        name = name[len(_PACKAGE_ROOT) + 1 :]
    elif "site-packages/" in name:
        name = name.rsplit("site-packages/", 1)[1]
    return f"{name}:{frame.lineno}"


def _origin(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame, and the innermost line of mtopt's sources that led to it."""
    while len(stack) > 1 and stack[-1].filename.endswith("warnings.py"):
        stack = stack[:-1]  # the warnings machinery that called record()
    ours = [f for f in stack if f.filename.startswith(_PACKAGE_ROOT + "/mtopt/")]
    inner = stack[-1]
    if not ours or ours[-1] is inner:
        return f"{_short(inner)} ({inner.line})"
    return f"{_short(inner)} via {_short(ours[-1])} ({ours[-1].line})"


def count_syncs(
    spec: str, workload: str, steps: int, warmup: int, device: str = "cuda"
) -> tuple[float, float, dict[str, int]]:
    """(syncs per step, milliseconds per step, {origin: count over the steps}) of one spec."""
    contender, batch = one_contender(spec, get_workload(workload), torch.device(device))
    for _ in range(warmup):
        contender.step(batch)
    torch.cuda.synchronize()
    origins: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        switching_back = any(f.name == "set_sync_debug_mode" for f in stack)
        if "synchroniz" in str(message) and not switching_back:
            origins[_origin(stack)] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                contender.step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        contender.step(batch)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / steps
    return sum(origins.values()) / steps, ms, dict(origins)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp11")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print(f"gpu_syncs: --steps must be ≥ 1 and --warmup ≥ 0, got {args.steps}, {args.warmup}")
        return 2
    if not torch.cuda.is_available():
        print("gpu_syncs: no CUDA device (this script counts host synchronisations on a GPU)")
        return 2
    lines = [
        f"# Host synchronisations per step ({args.workload}, {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}; mean of {args.steps} steps after {args.warmup})",
        "",
        "| method | syncs / step | ms / step | where (count over the steps) |",
        "|---|---:|---:|---|",
    ]
    for spec in args.methods.split(","):
        try:
            per_step, ms, origins = count_syncs(spec, args.workload, args.steps, args.warmup)
        except ValueError as err:  # an unknown workload or method, a bad hyperparameter
            print(f"gpu_syncs: {err}")
            return 2
        where = "<br>".join(f"{n} × `{o}`" for o, n in sorted(origins.items(), key=lambda x: -x[1]))
        lines.append(f"| {spec} | {per_step:.1f} | {ms:.2f} | {where} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
