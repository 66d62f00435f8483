"""Sweeps on Ray (``mtopt sweep --executor ray``): the same records as the local executor, a
killed driver's sweep finished by the next one, and bad input in one line.

One local Ray instance with 2 CPUs serves the module; the tests that need it are skipped when Ray
is not installed (``pip install 'mtopt[ray]'``). The sweep is ``test_sweep``'s tiny real one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_sweep import SWEEP

from mtopt.cli import main
from mtopt.experiments import runner as runner_module
from mtopt.experiments.database import RunDatabase
from mtopt.experiments.sweep import SweepConfig, run_sweep
from mtopt.experiments.train import run_key

#: the fields of a record that do not depend on timing (``seconds`` and ``step_seconds_median``
#: do; ``code_version`` is the checkout's)
STABLE = (
    "config",
    "tasks",
    "method_repr",
    "history",
    "selection",
    "val",
    "test",
    "solver_failures",
)
RUNS = 5  # the tiny sweep: two single-task runs, three methods
NO_RAY = "Ray is not installed (pip install 'mtopt[ray]')"


def stable(db: RunDatabase) -> dict[str, dict]:
    return {r["key"]: {f: r.get(f) for f in STABLE} for r in db.records()}


def claims(db_path: Path) -> int:
    with sqlite3.connect(db_path) as con:
        return int(con.execute("SELECT COUNT(*) FROM claims").fetchone()[0])


def same_result(a: dict, b: dict) -> None:
    """What ``test_sweep`` compares between two sweeps: rows' test metrics and Δm, references."""
    assert [r["label"] for r in a["rows"]] == [r["label"] for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"], strict=True):
        assert x["test"] == y["test"]
        assert x["delta_m"] == y["delta_m"]
    assert a["references"] == b["references"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray_sweep") / "resume.toml"
    path.write_text(SWEEP)
    return path


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs for the module; its GCS address."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    # idle workers of one job (driver) are kept while another runs: the resumed sweep reuses them
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        _system_config={"num_workers_soft_limit": 8},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local(sweep_file, tmp_path_factory, mnist):
    """The tiny sweep on the local executor (in this process, one torch thread as a Ray task
    has): its store and result."""
    db = RunDatabase(tmp_path_factory.mktemp("local") / "mtopt.sqlite")
    threads = torch.get_num_threads()
    try:
        result = run_sweep(SweepConfig.from_toml(sweep_file), db, workers=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert result.runs == RUNS
    return db, json.loads(json.dumps(result.to_dict(), default=str))


def test_ray_gives_the_records_of_the_local_executor(cluster, local, sweep_file, tmp_path, capfd):
    def in_the_driver(*args, **kwargs):
        raise AssertionError("a run trained in the driver, not in a Ray task")

    local_db, local_result = local
    run_dir = tmp_path / "ray"
    # Ray is initialised in this process: the executor uses that instance; training in this
    # process (the driver) would fail
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "train_run", in_the_driver)
        code = main(
            ["sweep", str(sweep_file), "--run-dir", str(run_dir), "--executor", "ray", "--quiet"]
        )
    out = capfd.readouterr().out
    assert code == 0, out
    assert f"{RUNS} run(s) executed" in out
    db = RunDatabase(run_dir / "mtopt.sqlite")
    assert stable(db) == stable(local_db)
    assert db.count() == RUNS
    assert db.unfinished() == []
    assert claims(db.path) == 0
    same_result(json.loads((run_dir / "sweeps" / "resume.json").read_text()), local_result)


def _driver(sweep_file: Path, run_dir: Path, address: str) -> subprocess.Popen:
    """``mtopt sweep --executor ray --address ADDRESS`` in its own process (a driver to kill)."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mtopt.cli", "sweep", str(sweep_file)),
            *("--run-dir", str(run_dir), "--quiet", "--executor", "ray", "--address", address),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_a_killed_driver_is_finished_by_the_next_with_no_run_lost_or_repeated(
    cluster, local, sweep_file, tmp_path, capfd
):
    # a driver in its own process, attached to the cluster by its address, killed (SIGKILL)
    # once 2 runs are stored; then this process finishes the sweep
    run_dir = tmp_path / "killed"
    db_path = run_dir / "mtopt.sqlite"
    proc = _driver(sweep_file, run_dir, cluster)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if db_path.exists() and RunDatabase(db_path).count() >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = RunDatabase(db_path)
    kept = {r["key"] for r in db.records()}
    assert 2 <= len(kept) < RUNS, "the kill landed outside the sweep"
    with sqlite3.connect(db_path) as con:
        finished = dict(con.execute("SELECT key, finished_at FROM runs").fetchall())

    argv = ["sweep", str(sweep_file), "--run-dir", str(run_dir), "--executor", "ray", "--quiet"]
    assert main(argv) == 0
    out = capfd.readouterr().out
    # the stored runs were not trained again, nor written again
    assert f"{RUNS - len(kept)} run(s) executed" in out
    assert db.count() == RUNS
    with sqlite3.connect(db_path) as con:
        after = dict(con.execute("SELECT key, finished_at FROM runs").fetchall())
    assert {k: after[k] for k in finished} == finished
    assert db.unfinished() == []  # the dead driver's claimed runs were taken over
    assert claims(db_path) == 0
    assert stable(db) == stable(local[0])
    same_result(json.loads((run_dir / "sweeps" / "resume.json").read_text()), local[1])


def test_a_run_another_process_holds_is_left_to_it(cluster, local, sweep_file, tmp_path):
    from mtopt.experiments.executors import RayExecutor
    from mtopt.problems import get_problem

    config = SweepConfig.from_toml(sweep_file)
    base = config.base_config()
    jobs = [
        (replace(base, method="unitary", hparams={}, tasks=(task,), seed=1), None)
        for task in get_problem(config.problem).task_names
    ]
    held, free = (run_key(c, r) for c, r in jobs)
    db = RunDatabase(tmp_path / "mtopt.sqlite")
    other = RunDatabase(db.path)  # another driver on the same store, alive
    assert other.claim(held) == "claimed"
    with RayExecutor() as executor:
        assert executor.run(db, jobs) == {held: "busy", free: "ran"}
    assert db.get(held) is None
    assert stable(db) == {free: stable(local[0])[free]}
    assert claims(db.path) == 1  # the other driver's claim is untouched


def test_a_task_whose_claim_is_taken_over_is_cancelled_and_left_to_the_new_owner(
    cluster, sweep_file, tmp_path
):
    """The driver stalls past the lease (here: another process is simply let take the claim
    over); between results it finds the claim lost, cancels the task and stores nothing."""
    from mtopt.experiments.executors import RayExecutor
    from mtopt.problems import get_problem

    config = SweepConfig.from_toml(sweep_file)
    task = get_problem(config.problem).task_names[0]
    # a single-task run of 100,000 epochs of 256 images: hours, were it not cancelled
    long_run = replace(
        config.base_config(), method="unitary", hparams={}, tasks=(task,), epochs=100_000
    )
    key = run_key(long_run, None)
    db = RunDatabase(tmp_path / "mtopt.sqlite", lease_seconds=2.0)
    thief = RunDatabase(db.path, lease_seconds=1e-3)  # calls any claim stale at once
    checkpoint = db.checkpoint_path(key)
    taken = threading.Event()

    def take_over() -> None:
        # once the task trains (its first epoch checkpointed), between two of the driver's beats
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not checkpoint.exists():
            time.sleep(0.05)
        while time.monotonic() < deadline:
            if thief.claim(key) == "claimed":
                taken.set()
                return
            time.sleep(0.01)

    helper = threading.Thread(target=take_over, daemon=True)
    helper.start()
    outcome: dict = {}

    def drive() -> None:
        with RayExecutor() as executor:
            outcome.update(executor.run(db, [(long_run, None)]))

    driver = threading.Thread(target=drive, daemon=True)
    try:
        driver.start()
        driver.join(timeout=150)  # a driver that never notices would wait hours: fail instead
        assert not driver.is_alive(), "the driver did not notice its lost claim"
    finally:
        helper.join()
    try:
        assert taken.is_set()
        assert outcome == {key: "busy"}
        assert db.get(key) is None
        with sqlite3.connect(db.path) as con:
            owners = con.execute("SELECT owner FROM claims WHERE key = ?", (key,)).fetchall()
        assert owners == [(thief.owner,)]  # the new owner's claim stands
        # the task is gone: its checkpoint, written every epoch (a fraction of a second), stops
        # changing (the kill lands within moments; a loaded machine is given 30 s)
        deadline = time.monotonic() + 30
        while True:
            seen = checkpoint.stat().st_mtime_ns
            time.sleep(2.0)
            if checkpoint.stat().st_mtime_ns == seen:
                break
            assert time.monotonic() < deadline, "the cancelled task still trains"
    finally:
        thief.release(key)


def test_an_error_in_a_task_is_raised_as_itself_and_frees_its_claim(cluster, tmp_path):
    from mtopt.experiments.executors import RayExecutor
    from mtopt.experiments.train import RunConfig

    db = RunDatabase(tmp_path / "mtopt.sqlite")
    with RayExecutor() as executor, pytest.raises(ValueError, match="unknown problem") as caught:
        executor.run(db, [(RunConfig(problem="nope", epochs=1), None)])
    assert type(caught.value) is ValueError  # not Ray's wrapper: the CLI prints one line
    assert db.count() == 0
    assert claims(db.path) == 0


def test_a_users_mistake_in_a_run_is_raised_not_stored_as_a_result(tmp_path, monkeypatch):
    """Data missing on the machine that trains (a Ray node, or this one) is not a run's result:
    stored as failed, the run would never be trained again once the data is there."""
    from mtopt.errors import DataError
    from mtopt.experiments.train import RunConfig

    def no_data(*args, **kwargs):
        raise DataError("no MNIST here: run `mtopt data fetch mnist`")

    monkeypatch.setattr(runner_module, "train_run", no_data)
    db_path = tmp_path / "mtopt.sqlite"
    with pytest.raises(DataError, match="mtopt data fetch"):
        runner_module._execute(str(db_path), RunConfig(problem="multi_mnist/cl_rr"), None, 0)
    assert RunDatabase(db_path).count() == 0
    assert claims(db_path) == 0


def test_threads_beyond_every_node_are_refused(cluster, sweep_file, tmp_path, capfd):
    argv = ["sweep", str(sweep_file), "--run-dir", str(tmp_path), "--executor", "ray"]
    assert main([*argv, "--threads", "3"]) == 2
    err = capfd.readouterr().err.strip()
    assert err == (
        "mtopt: error: each run asks for 3 CPUs (--threads) and no node of the Ray cluster has "
        "more than 2"
    )


def _ray_missing() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return True
    return False


#: an address is checked once Ray imports (without Ray, the one line says to install it)
NEEDS_RAY = pytest.mark.skipif(_ray_missing(), reason=NO_RAY)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--address", "10.0.0.1:6379"], "--address names a Ray cluster: use it with --executor"),
        pytest.param(
            ["--executor", "ray", "--address", "127.0.0.1:1"],
            "no Ray cluster answers at 127.0.0.1:1 (Connection refused)",
            marks=NEEDS_RAY,
        ),
        pytest.param(
            ["--executor", "ray", "--address", "ray:/x"],
            "Ray address 'ray:/x': use HOST:PORT",
            marks=NEEDS_RAY,
        ),
        (["--executor", "ray", "--threads", "0"], "--threads must be in [1, 1024], got 0"),
        (["--executor", "ray", "--workers", "0"], "--workers must be ≥ 1, got 0"),
    ],
)
def test_bad_ray_options_are_one_line(options, message, sweep_file, tmp_path, capfd):
    started = time.perf_counter()
    code = main(["sweep", str(sweep_file), "--run-dir", str(tmp_path), *options])
    err = capfd.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err
    assert err.startswith("mtopt: error: ")
    assert message in err
    assert time.perf_counter() - started < 10  # not Ray's minutes of retries


def test_the_ray_executor_without_ray_is_one_line(sweep_file, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as when not installed
    code = main(["sweep", str(sweep_file), "--run-dir", str(tmp_path), "--executor", "ray"])
    err = capfd.readouterr().err.strip()
    assert code == 2
    assert err == (
        "mtopt: error: the ray executor needs Ray: pip install 'mtopt[ray]' (or 'ray>=2.9')"
    )
