"""The run store under crashes and concurrency: sweeps killed with SIGKILL at random points and
restarted, then two sweeps at once on the same store; pool workers end with their parent."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtopt.experiments.database import RunDatabase

SWEEP = """
problem = "multi_mnist/cl_rr"
name = "durable"
[base]
epochs = 1
train_subset = 128
eval_subset = 128
batch_size = 64
[grid]
lr = [1e-3, 5e-4]
[methods]
unitary = {}
"rlw:seed=3" = {}
"dwa" = {}
"""
#: 2 tasks × 2 lr (references) + 3 methods × 2 lr
EXPECTED_RUNS = 10


def _sweep(config: Path, db: Path, workers: int = 1, lease: float = 3.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTOPT_LEASE_SECONDS": str(lease)}
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mtopt.cli", "sweep", str(config)),
            *("--db", str(db), "--run-dir", str(db.parent), "--workers", str(workers)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _executed(output: str) -> int:
    match = re.search(r"(\d+) run\(s\) executed", output)
    assert match, output
    return int(match.group(1))


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


@pytest.mark.slow
def test_killed_then_concurrent_sweeps_finish_every_run_exactly_once(tmp_path, mnist):
    config = tmp_path / "durable.toml"
    config.write_text(SWEEP)
    db_path = tmp_path / "runs" / "mtopt.sqlite"
    rng = random.Random(0)
    kept: set[str] = set()
    kills = 0
    for target in (1, 3, 5):  # kill at a random moment once `target` runs are stored
        proc = _sweep(config, db_path)
        deadline = time.time() + 240
        while time.time() < deadline and _count(db_path) < target and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: inside a run, between runs, in a commit
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        now = {r["key"] for r in RunDatabase(db_path).records()}
        assert kept <= now, "a finished run was lost"
        kept = now
    assert kills >= 2
    before = _count(db_path)
    # two sweeps at once on the same store: they split what is left
    a, b = _sweep(config, db_path), _sweep(config, db_path)
    out_a = a.communicate(timeout=600)[0].decode()
    out_b = b.communicate(timeout=600)[0].decode()
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    # every run finished exactly once: each of the remaining runs trained by one process only
    assert _executed(out_a) + _executed(out_b) == EXPECTED_RUNS - before
    db = RunDatabase(db_path)
    assert db.count() == EXPECTED_RUNS
    assert len({r["key"] for r in db.records()}) == EXPECTED_RUNS
    assert kept <= {r["key"] for r in db.records()}
    assert db.integrity_check() == "ok"
    assert not list(db.checkpoint_path("k").parent.glob("*.pt")), "stored runs left checkpoints"
    # both wrote the same selection
    result = (tmp_path / "runs" / "sweeps" / "durable.json").read_text()
    assert '"rows"' in result


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_end_with_their_parent(tmp_path, mnist):
    config = tmp_path / "durable.toml"
    config.write_text(SWEEP.replace("epochs = 1", "epochs = 20"))
    proc = _sweep(config, tmp_path / "runs" / "mtopt.sqlite", workers=2)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        workers = [p for p in _children(proc.pid) if _alive(p)]
        time.sleep(0.1)
    assert len(workers) >= 2, "the pool never started"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    orphans = [p for p in workers if _alive(p)]
    for p in orphans:  # do not leave them behind if the test fails
        os.kill(p, signal.SIGKILL)
    assert not orphans, f"worker processes {orphans} outlived their parent"
