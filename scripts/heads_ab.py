"""The heads' gradient taken in the per-task passes, against its own backward pass, side by side.

For each contender two optimizers are built on the same workload and batch: one as shipped
(``Σ_k c_k ∇ℓ_k`` for the task-specific parameters from the gradients the per-task passes took,
:class:`mtopt.core.gradients.HeadGrads`), one with its gradient source's head list emptied (the
heads then get a backward pass of ``Σ_k c_k ℓ_k`` of their own, as before). Their steps are
timed in alternating rounds in one process; the report is the median step time of each and
their ratio, and the largest relative difference between the heads' gradients the two wrote at
their first step (``inf`` where one wrote a gradient the other did not). The heads are taken in
the passes only when the closure returns the features (the bench's workloads do).

    python scripts/heads_ab.py --workload mlp11 --contenders upgrad,upgrad#batched,upgrad#gramian
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from mtopt.bench.contenders import one_contender
from mtopt.bench.workloads import get_workload
from mtopt.engine.sources import GramianSource, JacobianSource, RepresentationSource


def unfuse(mto: object) -> None:
    """Empty the head list of the optimizer's parameter-level gradient source(s)."""
    source = getattr(mto, "source", None)
    for part in (source, getattr(source, "jacobian", None), getattr(source, "gramian", None)):
        if isinstance(part, (JacobianSource, GramianSource, RepresentationSource)):
            part.heads = []


def compare(label: str, workload: str, rounds: int, steps: int) -> dict[str, float]:
    """Median ms per step of the two variants, their ratio, and the gradients' difference."""
    runs = {}
    for kind in ("fused", "own backward"):
        contender, batch = one_contender(label, get_workload(workload), torch.device("cpu"))
        mto = getattr(contender, "mto", None)
        if mto is None:
            raise ValueError(f"contender {label!r} is not an mtopt method")
        if kind == "own backward":
            unfuse(mto)
        runs[kind] = (contender, batch, mto, [])
    # one step each from the same start: the gradients they wrote (None: not written)
    grads = []
    for contender, batch, mto, _ in runs.values():
        contender.step(batch)
        grads.append([None if p.grad is None else p.grad.double() for p in mto.task_params])
    diff = 0.0
    for a, b in zip(*grads, strict=True):
        if a is None or b is None:
            diff = diff if a is b else math.inf  # one wrote a gradient, the other did not
            continue
        gap, scale = float((a - b).norm()), float(b.norm())
        diff = max(diff, gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf))
    for _ in range(rounds):
        for contender, batch, _, times in runs.values():
            start = time.perf_counter()
            for _ in range(steps):
                contender.step(batch)
            times.append((time.perf_counter() - start) / steps * 1e3)
    fused = statistics.median(runs["fused"][3])
    own = statistics.median(runs["own backward"][3])
    return {"fused ms": fused, "own backward ms": own, "ratio": fused / own, "grad diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp11")
    parser.add_argument("--contenders", default="upgrad,upgrad#batched,upgrad#gramian")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        print(
            "heads_ab: --rounds, --steps and --threads must be ≥ 1, got "
            f"{args.rounds}, {args.steps}, {args.threads}"
        )
        return 2
    torch.set_num_threads(args.threads)
    print(f"# heads' gradient: per-task passes vs own backward ({args.workload}, CPU)")
    for label in args.contenders.split(","):
        try:
            figures = compare(label, args.workload, args.rounds, args.steps)
        except ValueError as err:  # an unknown workload or contender, a bad hyperparameter
            print(f"heads_ab: {err}")
            return 2
        cells = ", ".join(
            f"{k} {v:.3f}" if k != "grad diff" else f"{k} {v:.1e}" for k, v in figures.items()
        )
        print(f"- `{label}`: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
