"""Run the careless-user cases of the hardening issue against a code version and tabulate them.

Each case is a command line (or a few lines of Python) run in a fresh temporary folder with a
tiny budget; the table gives its exit status, how many lines it wrote to stderr, whether a
Python traceback appeared, files written outside the run dir, and the first error line. Pick
the code version with PYTHONPATH (the same script serves before and after)::

    git worktree add /tmp/old ec6e60b
    PYTHONPATH=/tmp/old/src python scripts/hardening_cases.py --out before.md
    PYTHONPATH=src python scripts/hardening_cases.py --out after.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["--epochs", "1", "--train-subset", "64", "--eval-subset", "64", "--quiet"]
NO_TABLE = 'methods = ["unitary"]\nproblem = "multi_mnist/cl_rr"\n'
GOOD_SWEEP = """problem = "multi_mnist/cl_rr"
[base]
epochs = 1
train_subset = 64
eval_subset = 64
[methods]
unitary = {}
"""


def _sweep_file(folder: Path, text: str) -> str:
    import hashlib

    path = folder / f"s{hashlib.sha256(text.encode()).hexdigest()[:8]}.toml"
    path.write_text(text)
    return str(path)


def _cases(folder: Path) -> list[tuple[str, list[str] | str]]:
    """(label, argv of `mtopt` or a Python snippet)."""
    run_dir = str(folder / "runs")
    base = ["--run-dir", run_dir]
    snippet_uw = (
        "import torch, mtopt\n"
        "enc = torch.nn.Linear(3, 2); h = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.SGD([*enc.parameters(), *h.parameters()], lr=0.1)\n"
        "mtopt.MultiTaskOptimizer(opt, 'uw', shared=enc, optimizer='sgd')\n"
    )
    return [
        ("train --lr-decay -3", ["train", "--lr-decay", "-3", *TINY, *base]),
        ("graddrop k=nan", "import mtopt; mtopt.make('graddrop', k=float('nan'))"),
        ("nash_mtl tol=-1", "import mtopt; mtopt.make('nash_mtl', tol=-1)"),
        ("selective_groups damping=5", "import mtopt; mtopt.make('selective_groups', damping=5)"),
        (
            "sweep name ../../escaped",
            ["sweep", _sweep_file(folder, 'name = "../../escaped"\n' + GOOD_SWEEP), *base],
        ),
        ("report, database missing", ["report", str(folder / "result.json")]),
        ("compare --methods ''", ["compare", "--methods", "", *TINY, *base]),
        ("--hp c=abc", ["train", "--method", "cagrad", "--hp", "c=abc", *TINY, *base]),
        ("compare --seeds 0", ["compare", "--seeds", "0", "--methods", "unitary", *TINY, *base]),
        (
            "sweep without problem",
            [
                "sweep",
                _sweep_file(folder, GOOD_SWEEP.replace('problem = "multi_mnist/cl_rr"', "")),
                *base,
            ],
        ),
        (
            "sweep methods = [...]",
            [
                "sweep",
                _sweep_file(folder, NO_TABLE),
                *base,
            ],
        ),
        (
            'sweep epochs = "three"',
            [
                "sweep",
                _sweep_file(folder, GOOD_SWEEP.replace("epochs = 1", 'epochs = "three"')),
                *base,
            ],
        ),
        (
            "sweep --set grid.lr=abc",
            ["sweep", _sweep_file(folder, GOOD_SWEEP), "--set", "grid.lr=abc", *base],
        ),
        (
            "sweep lr = []",
            [
                "sweep",
                _sweep_file(folder, GOOD_SWEEP.replace("[base]", "[grid]\nlr = []\n[base]")),
                *base,
            ],
        ),
        (
            'sweep fixed_from = "cagrad"',
            ["sweep", _sweep_file(folder, 'fixed_from = "cagrad"\n' + GOOD_SWEEP), *base],
        ),
        ("uw optimizer='sgd' (library)", snippet_uw),
        ("corrupt run store", ["compare", "--methods", "unitary", *TINY, *base, "--corrupt-db"]),
    ]


def run(label: str, command: list[str] | str, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if isinstance(command, str):
        argv = [sys.executable, "-c", command]
    else:
        if "--corrupt-db" in command:
            command = [c for c in command if c != "--corrupt-db"]
            (folder / "runs").mkdir(exist_ok=True)
            (folder / "runs" / "mtopt.sqlite").write_bytes(b"not a database" * 64)
        if command[0] == "report":
            (folder / "result.json").write_text(
                '{"name": "x", "database": "' + str(folder / "absent" / "db.sqlite") + '", '
                '"rows": [], "directions": {}, "references": {}, "config": {}}'
            )
        argv = [sys.executable, "-m", "mtopt.cli", *command]
    before = set(Path(folder).rglob("*"))
    escaped_root = folder.parent / "escaped"
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=folder, timeout=600)
    after = set(Path(folder).rglob("*"))
    created = [p for p in after - before if not p.is_relative_to(folder / "runs")]
    created = [p for p in created if p.name != "result.json" and p.suffix != ".toml"]
    if escaped_root.exists():
        created.append(escaped_root)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    first = next((line for line in err if "rror" in line), err[-1] if err else "")
    return {
        "label": label,
        "exit": proc.returncode,
        "stderr lines": len(err),
        "traceback": "Traceback" in proc.stderr,
        "outside run dir": len(created),
        "message": first[:140],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for label, _ in _cases(Path(tempfile.mkdtemp())):
        with tempfile.TemporaryDirectory() as top:
            folder = Path(top) / "work"
            folder.mkdir()
            command = dict(_cases(folder))[label]
            rows.append(run(label, command, folder))
            print(rows[-1], flush=True)
    header = ["case", "exit", "stderr lines", "traceback", "files outside run dir", "message"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        message = r["message"].replace("|", "/")
        lines.append(
            f"| {r['label']} | {r['exit']} | {r['stderr lines']} | "
            f"{'yes' if r['traceback'] else 'no'} | {r['outside run dir']} | {message} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
