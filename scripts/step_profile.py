"""What a multi-task step launches: torch.profiler over a few steps of `mtopt bench` contenders.

On a GPU a small model's step is bound by the host: the device is busy for a fraction of the
step, and the time goes to launching kernels. This script reports, per contender, the step's
wall time (profiled), the device's busy time (its kernels and copies) and their number, the
launches, the copies and stream synchronisations, how often each named op ran (``--count``),
the aten ops, and the top ops by host time.

    python scripts/step_profile.py --workload mlp11 --out profile.md
    python scripts/step_profile.py --device cpu --contenders upgrad,upgrad#jacobian

Contenders are `mtopt bench` labels: ``plain``, an mtopt method spec (``upgrad``,
``upgrad#gramian``) or ``torchjd:NAME`` (needs TorchJD).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mtopt.bench.contenders import one_contender
from mtopt.bench.workloads import get_workload

DEFAULT = "plain,unitary,upgrad,torchjd:UPGrad,mgda,torchjd:MGDA"
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile_steps(
    label: str, workload: str, device: str, steps: int, warmup: int, counted: tuple[str, ...]
) -> tuple[dict[str, float], str]:
    """Per-step figures of one contender, and its table of the top ops by host time."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    c, batch = one_contender(label, get_workload(workload), dev)
    for _ in range(warmup):
        c.step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            c.step(batch)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    figures = {
        "wall ms": 1e3 * wall,
        # the kernels and copies themselves (CPU ops also carry their kernels' device time)
        "device busy ms": sum(e.self_device_time_total for e in on_device) / steps / 1e3,
        "device events": sum(e.count for e in on_device) / steps,
        "launches": sum(e.count for e in events if e.key in LAUNCHES) / steps,
        "copies": sum(e.count for e in on_device if "Memcpy" in e.key) / steps,
        "stream syncs": sum(e.count for e in events if e.key in SYNCS) / steps,
        "aten ops": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
    }
    for name in counted:
        figures[name] = sum(e.count for e in events if e.key == name) / steps
    table = events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60)
    return figures, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp11")
    parser.add_argument("--contenders", default=DEFAULT)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--count", default="aten::mse_loss_backward", help="ops to count, a,b")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print(
            f"step_profile: --steps must be ≥ 1 and --warmup ≥ 0, got {args.steps}, {args.warmup}"
        )
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("step_profile: no CUDA device (use --device cpu to profile on the CPU)")
        return 2
    counted = tuple(n for n in args.count.split(",") if n)
    head = f"# Step profile ({args.workload}, {args.device}, torch {torch.__version__})"
    summary, tables = [], []
    for label in args.contenders.split(","):
        try:
            figures, table = profile_steps(
                label, args.workload, args.device, args.steps, args.warmup, counted
            )
        except ValueError as err:  # an unknown workload or contender, a bad hyperparameter
            print(f"step_profile: {err}")
            return 2
        cells = ", ".join(
            f"{k} {v:.2f}" if k.endswith(" ms") else f"{k} {v:.0f}" for k, v in figures.items()
        )
        summary.append(f"- `{label}`: {cells} (per step, mean of {args.steps})")
        print(summary[-1], flush=True)
        tables.append(f"## {label}\n\n```\n{table}\n```\n")
    if args.out:
        args.out.write_text("\n\n".join([head, "\n".join(summary), *tables]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
