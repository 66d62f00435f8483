"""Print the stress suite's per-method table (issue 13's "Done when").

For every gradient and representation method: on the 42 adversarial Jacobians of
``tests/_stress.py`` (K ∈ {2, 3, 5, 11, 32, 64} × 7 kinds), how many solves were not certified
and the worst certificate residual; then, per model dtype (float16, bfloat16, float32,
float64), over one step of a K-task model for several seeds and K, the non-certified steps and
the worst relative deviation between the update the optimizer received and the update the
method reported.

    OMP_NUM_THREADS=1 python scripts/stress_table.py [--seeds 4] [--out table.md]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch

from _stress import (
    DTYPES,
    PARAM_METHODS,
    REP_METHODS,
    engine_outcome,
    method_outcome,
    rounding_tolerance,
    stress_cases,
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="engine steps per (K, dtype)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    cases = list(stress_cases())
    header = ["method", "Jacobians: not certified", "worst residual"]
    for dtype in DTYPES:
        header += [f"{dtype}: not certified", f"{dtype}: worst ‖applied − reported‖ (rel.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rep, methods in ((False, PARAM_METHODS), (True, REP_METHODS)):
        for label, name, hparams in methods:
            failed, worst, errors, solver = 0, 0.0, 0, False
            for _, G in cases:
                out = method_outcome(name, hparams, G, rep=rep)
                errors += out.error is not None or not out.finite
                solver = solver or out.converged is not None
                if out.converged is False:
                    failed += 1
                if out.residual is not None and out.converged:
                    worst = max(worst, out.residual)
            row = [
                label,
                f"{failed}/{len(cases)}" + (f" ({errors} errors)" if errors else ""),
                _fmt(worst) if solver else "no solver",
            ]
            for dtype in DTYPES:
                bad = steps = 0
                deviation = 0.0
                for k in (3, 5, 11):
                    for seed in range(args.seeds):
                        out = engine_outcome(name, hparams, dtype, k=k, seed=seed)
                        steps += 1
                        if out.error is not None or not out.finite:
                            bad += 1
                            continue
                        bad += out.converged is False
                        deviation = max(deviation, out.deviation or 0.0)
                flag = "" if deviation <= rounding_tolerance(dtype) else " (!)"
                row += [f"{bad}/{steps}", _fmt(deviation) + flag]
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    print(
        f"\nResiduals: each solver's own certificate (relative units, see its docstring). "
        f"Deviation: ‖applied − reported‖ / Σ|w_k|‖g_k‖ (for an explicit direction, / its "
        f"norm). Allowed: 2 eps(dtype) + 16 eps(float32 or float64). "
        f"{time.perf_counter() - started:.0f} s."
    )
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
