"""Sweeps: the protocol's selection on a synthetic store, fixed-weight extraction, the SQLite
run database, and kill-and-resume of a real sweep in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtopt.errors import ConfigError
from mtopt.experiments import runner as runner_module
from mtopt.experiments.database import RunDatabase
from mtopt.experiments.sweep import SweepConfig, extract_fixed_weights, run_sweep
from mtopt.experiments.train import RunConfig, run_key


# -- a synthetic problem whose "training" is a formula of the config --------------------------
class FakeProblem:
    task_names = ("a", "b")

    def lower_is_better(self):
        return {"a": {"acc": False}, "b": {"mse": True}}


def fake_value(config, task: str, split: str) -> float:
    """Deterministic metrics: task a is best at lr 0.01, task b at lr 0.001; the method's ``c``
    and the seed shift the multi-task values; test = val + 0.01."""
    lr_term = {0.01: 0.0, 0.001: 1.0}[config.lr]
    noise = 0.01 * config.seed
    shift = 0.05 * config.hparams.get("c", 0.0)
    if task == "a":
        value = 0.9 - 0.2 * lr_term + noise + shift
    else:
        value = 0.3 - 0.2 * lr_term + noise - shift
    return value + (0.01 if split == "test" else 0.0)


def fake_train_run(
    config, references=None, problem=None, callback=None, checkpoint=None, holds=None
):
    if config.lr > 1.0:
        raise ValueError("non-finite loss(es): a=nan")  # a diverging configuration
    tasks = config.tasks or FakeProblem.task_names
    metric = {"a": "acc", "b": "mse"}
    val = {t: {metric[t]: fake_value(config, t, "val")} for t in tasks}
    test = {t: {metric[t]: fake_value(config, t, "test")} for t in tasks}
    record = {
        "key": run_key(config, references),
        "config": config.to_dict(),
        "tasks": list(tasks),
        "history": [{"mean_weights": [0.5, 0.5]}],
        "selection": {},
        "val": val,
        "test": test,
        "seconds": 10.0 * config.seed + len(tasks),  # a run's wall time, made up
        "step_seconds_median": 0.001,
    }
    if len(tasks) > 1:
        from mtopt.evaluation.metrics import delta_m

        directions = FakeProblem().lower_is_better()
        record["val_delta_m"] = delta_m(val, references["val"], directions)
        record["selection"] = {"delta_m": {"epoch": 0, "val_score": record["val_delta_m"]}}
    return record


@pytest.fixture
def fake(monkeypatch):
    import mtopt.problems

    monkeypatch.setattr(runner_module, "train_run", fake_train_run)
    monkeypatch.setattr(mtopt.problems, "get_problem", lambda name, **kw: FakeProblem())
    monkeypatch.setattr(runner_module, "_PROBLEMS", {})


def test_selection_follows_the_protocol(fake, tmp_path):
    config = SweepConfig(
        problem="fake",
        methods={"cagrad": {"c": [0.0, 0.5, 0.9]}, "unitary": {}},
        grid={"lr": [0.01, 0.001]},
        base={"epochs": 1},
        n_val_runs=2,
        n_best_runs=3,
        random_seed=1,
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    # references: each metric its own best lr (a: 0.01 → 0.9+; b: mse lower at lr 0.001)
    assert result.reference_configs == {"a": {"acc": {"lr": 0.01}}, "b": {"mse": {"lr": 0.001}}}
    seeds = [1, 2, 3]
    assert result.references["val"]["a"]["acc"] == pytest.approx(
        statistics.fmean(0.9 + 0.01 * s for s in seeds)
    )
    assert result.references["test"]["b"]["mse"] == pytest.approx(
        statistics.fmean(0.1 + 0.01 * s + 0.01 for s in seeds)
    )
    cagrad = next(r for r in result.rows if r.label == "cagrad")
    # score = mean val Δm over seeds 1, 2 for each of 6 points; recompute and take the argmax
    refs, directions = result.references, FakeProblem().lower_is_better()
    from mtopt.evaluation.metrics import delta_m
    from mtopt.experiments.train import RunConfig

    def score(lr, c):
        deltas = []
        for s in (1, 2):
            cfg = RunConfig(problem="fake", epochs=1, lr=lr, hparams={"c": c}, seed=s)
            val = {
                "a": {"acc": fake_value(cfg, "a", "val")},
                "b": {"mse": fake_value(cfg, "b", "val")},
            }
            deltas.append(delta_m(val, refs["val"], directions))
        return statistics.fmean(deltas)

    points = [(lr, c) for lr in (0.01, 0.001) for c in (0.0, 0.5, 0.9)]
    best = max(points, key=lambda p: score(*p))
    assert (cagrad.shared["lr"], cagrad.hparams["c"]) == best
    assert cagrad.val_score == pytest.approx(score(*best))
    assert len(cagrad.delta_m) == 3
    assert len(cagrad.keys) == 3
    assert cagrad.delta_m_flat == pytest.approx(cagrad.delta_m)  # one metric per task
    # only the best configuration got the extra seed 3
    seed3 = [
        r for r in db.records() if r["config"]["seed"] == 3 and r["config"]["method"] == "cagrad"
    ]
    assert len(seed3) == 1
    assert seed3[0]["config"]["hparams"] == {"c": best[1]}
    assert result.runs == db.count()
    # the cost: every stored run once (a grid point's first seed is the grid phase's), with
    # the sum of the records' wall times
    assert sum(p["runs"] for p in result.cost.values()) == db.count()
    seconds = sum(r.get("seconds") or 0.0 for r in db.records())
    assert sum(p["seconds"] for p in result.cost.values()) == pytest.approx(seconds)
    assert list(result.cost) == [
        "single-task grid",
        "single-task selected configurations",
        "grids",
        "selected configurations",
    ]
    assert result.cost["selected configurations"]["runs"] == 2  # seed 3 of cagrad and unitary
    # a second sweep reuses every stored run
    again = run_sweep(config, db, workers=1)
    assert again.runs == 0
    assert [r.delta_m for r in again.rows] == [r.delta_m for r in result.rows]
    assert again.cost == result.cost


def test_fixed_weights_follow_the_hand_computed_ema():
    history = [
        {"mean_weights": [1.0, 3.0]},  # → (0.25, 0.75)
        {"mean_weights": [2.0, 2.0]},  # → (0.5, 0.5)
        {"mean_weights": None},  # epochs without weights are skipped
        {"mean_weights": [0.9, 0.1]},
    ]
    m = np.array([0.25, 0.75])
    m = 0.9 * m + 0.1 * np.array([0.5, 0.5])
    m = 0.9 * m + 0.1 * np.array([0.9, 0.1])
    np.testing.assert_allclose(extract_fixed_weights(history), m / m.sum())
    with pytest.raises(ValueError, match="no weights"):
        extract_fixed_weights([{"mean_weights": None}])


def test_bad_sweep_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be 'lr', 'dropout' or 'weight_decay'"):
        SweepConfig(problem="p", methods={"unitary": {}}, grid={"momentum": [0.9]})
    with pytest.raises(ValueError, match="unknown method"):
        SweepConfig(problem="p", methods={"nope": {}})
    with pytest.raises(ValueError, match="n_val_runs"):
        SweepConfig(problem="p", methods={"unitary": {}}, n_val_runs=3, n_best_runs=2)
    path = tmp_path / "s.toml"
    path.write_text('problem = "p"\n[methods]\ncagrad = { c = [0.2, 0.5] }\n')
    config = SweepConfig.from_toml(
        path, ["base.epochs=2", "methods.cagrad.c=0.8", "grid.lr=0.1/0.2"]
    )
    assert config.base == {"epochs": 2}
    assert config.grid == {"lr": [0.1, 0.2]}
    assert config.methods == {"cagrad": {"c": [0.8]}}
    assert config.name == "s"
    # TOML's true is not the number 1 (pydantic's lax mode would read it as one)
    for line in ["n_val_runs = true", "cosine_every = false", "grid = { lr = [true] }",
                 "base = { epochs = true }", "methods = { cagrad = { c = [true] } }"]:  # fmt: skip
        methods = "" if line.startswith("methods") else "methods = { unitary = {} }\n"
        path.write_text(f'problem = "multi_mnist"\n{methods}{line}\n')
        with pytest.raises(ConfigError, match="must be a number, not a boolean"):
            SweepConfig.from_toml(path)
    with pytest.raises(ConfigError, match="must be a number, not a boolean"):
        SweepConfig.from_toml(path, ["base.batch_size=true"])  # --set too


# -- kill and resume a real sweep --------------------------------------------------------------
SWEEP = """
problem = "multi_mnist/cl_rr"
name = "resume"
[base]
epochs = 1
train_subset = 256
eval_subset = 256
[grid]
lr = [1e-3]
[methods]
unitary = {}
mgda_ub = {}
"rlw:seed=3" = {}
"""


def _sweep(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "mtopt.cli", "sweep", str(config)),
            *("--run-dir", str(run_dir), "--workers", "1", "--quiet"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_losing_or_duplicating_runs(tmp_path, mnist):
    config = tmp_path / "resume.toml"
    config.write_text(SWEEP)
    straight = _sweep(config, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()

    killed_dir = tmp_path / "killed"
    proc = _sweep(config, killed_dir)
    db_path = killed_dir / "mtopt.sqlite"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once at least one run is stored, before the end
        if db_path.exists() and RunDatabase(db_path).count() >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    db = RunDatabase(db_path)
    kept = {r["key"] for r in db.records()}
    assert 2 <= len(kept) < 5, "the kill landed outside the sweep"
    resumed = _sweep(config, killed_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read().decode()

    final = {r["key"]: r for r in db.records()}
    assert kept <= set(final)
    assert len(final) == 5
    assert db.unfinished() == []
    straight_result = json.loads((tmp_path / "straight" / "sweeps" / "resume.json").read_text())
    resumed_result = json.loads((killed_dir / "sweeps" / "resume.json").read_text())
    for a, b in zip(straight_result["rows"], resumed_result["rows"], strict=True):
        assert a["label"] == b["label"]
        assert a["test"] == b["test"]
        assert a["delta_m"] == b["delta_m"]
    assert straight_result["references"] == resumed_result["references"]


def test_compare_table_shows_the_flat_form_only_when_it_differs():
    from mtopt.experiments.compare import Comparison, MethodRow, format_table

    two_metrics = {"S": {"acc": False, "miou": False}, "D": {"l1": True}}
    ref = {"S": {"acc": 0.8, "miou": 0.5}, "D": {"l1": 1.0}}
    row = MethodRow("unitary", ref, -1.5, 0.2, 1.0, 0.1, 2, delta_m_flat=-2.25)
    table = format_table(Comparison("p", two_metrics, {"test": ref}, [row]))
    assert "Δm flat % ↑" in table
    assert "-2.25" in table
    one_metric = {"S": {"acc": False}, "D": {"l1": True}}
    table = format_table(Comparison("p", one_metric, {"test": ref}, [row]))
    assert "flat" not in table


def test_a_diverging_configuration_is_stored_as_failed_and_never_selected(fake, tmp_path):
    config = SweepConfig(
        problem="fake",
        methods={"unitary": {}},
        grid={"lr": [0.01, 10.0]},
        base={"epochs": 1},
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    assert result.rows[0].shared == {"lr": 0.01}
    assert result.reference_configs["a"]["acc"] == {"lr": 0.01}
    failed = [r for r in db.records() if "failed" in r]
    assert failed
    assert all("non-finite" in r["failed"] for r in failed)
    assert db.unfinished() == []
    assert run_sweep(config, db, workers=1).runs == 0  # failures are not redone
    everything_fails = SweepConfig(
        problem="fake", methods={"unitary": {}}, grid={"lr": [10.0]}, base={"epochs": 1}
    )
    with pytest.raises(RuntimeError, match="every configuration failed"):
        run_sweep(everything_fails, RunDatabase(tmp_path / "other.sqlite"), workers=1)


def test_per_method_and_per_task_shared_settings_override_the_grid(fake, tmp_path):
    # the paper selects lr and dropout per method and per single-task reference (App. A.6)
    config = SweepConfig(
        problem="fake",
        methods={"cagrad": {"c": [0.0, 0.5], "lr": [0.01]}, "unitary": {}},
        grid={"lr": [0.01, 0.001]},
        references={"a": {"lr": 0.001}},
        base={"epochs": 1},
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    # task a only ever runs at lr 0.001, although 0.01 would score better
    assert result.reference_configs["a"] == {"acc": {"lr": 0.001}}
    assert result.reference_configs["b"] == {"mse": {"lr": 0.001}}
    single_a = [r for r in db.records() if r["config"]["tasks"] == ["a"]]
    assert {r["config"]["lr"] for r in single_a} == {0.001}
    cagrad = next(r for r in result.rows if r.label == "cagrad")
    assert cagrad.shared == {"lr": 0.01}
    assert [p for p, _ in cagrad.grid_scores] == [{"lr": 0.01, "c": 0.0}, {"lr": 0.01, "c": 0.5}]
    runs = [r for r in db.records() if r["config"]["method"] == "cagrad"]
    assert len(runs) == 2
    assert all("lr" not in r["config"]["hparams"] for r in runs)
    unitary = next(r for r in result.rows if r.label == "unitary")
    assert len(unitary.grid_scores) == 2  # the shared grid, untouched
    with pytest.raises(ValueError, match=r"references\.a"):
        SweepConfig(problem="p", methods={"unitary": {}}, references={"a": {"momentum": 1}})
    with pytest.raises(ValueError, match="references name tasks"):
        run_sweep(
            SweepConfig(problem="p", methods={"unitary": {}}, references={"zz": {"lr": 1.0}}),
            RunDatabase(tmp_path / "o.sqlite"),
            workers=1,
        )


def test_rows_on_another_base_optimizer_get_references_trained_with_it(fake, tmp_path, monkeypatch):
    """A Muon row's Δm is also measured against single-task runs trained with Muon."""

    def with_optimizer_bonus(
        config, references=None, problem=None, callback=None, checkpoint=None, holds=None
    ):
        record = fake_train_run(config, references, problem, callback)
        if config.optimizer == "muon":  # Muon trains every run better, single-task ones too
            for split in ("val", "test"):
                for task, metrics in record[split].items():
                    for m in metrics:
                        metrics[m] += 0.05 if task == "a" else -0.05
        return record

    monkeypatch.setattr(runner_module, "train_run", with_optimizer_bonus)
    config = SweepConfig(
        problem="fake",
        methods={"unitary": {}, "unitary@muon": {}, "cagrad:c=0.5@muon": {}},
        grid={"lr": [0.01]},
        base={"epochs": 1},
        n_best_runs=2,
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    rows = {r.label: r for r in result.rows}
    assert rows["unitary"].optimizer == "adam"
    assert rows["unitary"].delta_m_own is None
    muon = rows["unitary@muon"]
    assert muon.optimizer == "muon"
    assert muon.delta_m_own is not None
    # against Adam's references Muon looks better; against its own, the gain is gone
    assert statistics.fmean(muon.delta_m) > statistics.fmean(rows["unitary"].delta_m) + 1
    assert statistics.fmean(muon.delta_m_own) == pytest.approx(
        statistics.fmean(rows["unitary"].delta_m), abs=1e-9
    )
    single_muon = [
        r
        for r in db.records()
        if r["config"]["tasks"] is not None and r["config"]["optimizer"] == "muon"
    ]
    assert len(single_muon) == 2 * 2  # two tasks, n_best_runs seeds
    assert set(result.to_dict()["optimizer_references"]) == {"muon"}


def _in_progress_config(**changes) -> SweepConfig:
    """The small study the stored-only tests cut short."""
    fields = {
        "problem": "fake",
        "methods": {"cagrad": {"c": [0.0, 0.5]}, "unitary": {}},
        "grid": {"lr": [0.01]},
        "base": {"epochs": 1},
        "n_val_runs": 1,
        "n_best_runs": 3,
        "random_seed": 1,
    }
    return SweepConfig(**{**fields, **changes})


def _drop(db: RunDatabase, keys) -> None:
    """Delete stored runs (a study cut short)."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(db.path)) as conn, conn:
        conn.executemany("DELETE FROM runs WHERE key = ?", [(k,) for k in keys])


def _never(*args, **kwargs):
    raise AssertionError("a stored-only sweep trained a run")


def test_a_study_in_progress_reports_what_is_stored(fake, tmp_path, monkeypatch):
    """``stored_only``: nothing trains; rows are the stored runs of the selected configurations,
    the rest (and a fixed row whose SMTO lacks its first seed) are pending, saying why."""
    config = _in_progress_config(fixed_from=["cagrad"])
    db = RunDatabase(tmp_path / "runs.sqlite")
    with pytest.raises(ConfigError, match="not stored yet"):
        run_sweep(config, db, workers=1, stored_only=True)
    full = run_sweep(config, db, workers=1)
    rows = {r.label: r for r in full.rows}
    # the fixed row's runs are a phase of their own in the study's cost
    assert full.cost["fixed weights: grids"]["runs"] == 1
    assert full.cost["fixed weights: selected configurations"]["runs"] == 2
    assert full.cost["selected configurations"]["runs"] == 4  # seeds 2, 3 of cagrad, unitary

    monkeypatch.setattr(runner_module, "train_run", _never)
    _drop(db, rows["cagrad"].keys[1:] + rows["fixed from cagrad"].keys)
    partial = run_sweep(config, db, workers=1, stored_only=True)
    got = {r.label: r for r in partial.rows}
    assert set(got) == {"cagrad", "unitary"}
    assert got["unitary"].delta_m == rows["unitary"].delta_m  # all 3 seeds stored
    assert got["cagrad"].delta_m == rows["cagrad"].delta_m[:1]
    assert partial.pending == {"fixed from cagrad": "1 of its 1 grid run(s)"}
    assert partial.runs == 0
    assert partial.to_dict()["pending"] == partial.pending
    _drop(db, rows["cagrad"].keys[:1])  # the selected point's first seed is a grid run too
    partial = run_sweep(config, db, workers=1, stored_only=True)
    assert [r.label for r in partial.rows] == ["unitary"]
    assert partial.pending == {
        "cagrad": "1 of its 2 grid run(s)",
        "fixed from cagrad": "cagrad's first seed",
    }
    _drop(db, rows["unitary"].keys[:1])  # the references stored, no method row yet
    partial = run_sweep(config, db, workers=1, stored_only=True)
    assert partial.rows == []  # (mean rank over no row raised here)
    assert set(partial.pending) == {"cagrad", "unitary", "fixed from cagrad"}


def test_a_study_in_progress_names_the_runs_in_flight(fake, tmp_path, monkeypatch):
    """``stored_only``: a run not stored whose epoch checkpoint exists is listed (what, lr,
    seed, epoch e of n), read without touching the files; a checkpoint of another run is
    neither listed nor set aside; before the references are stored, the one-line error names
    the reference runs in flight."""
    from mtopt.experiments import checkpoint

    config = _in_progress_config(base={"epochs": 3}, n_best_runs=2)
    db = RunDatabase(tmp_path / "runs.sqlite")
    rows = {r.label: r for r in run_sweep(config, db, workers=1).rows}
    monkeypatch.setattr(runner_module, "train_run", _never)
    flying, other = rows["cagrad"].keys[1], rows["unitary"].keys[1]  # second seeds
    _drop(db, [flying, other])
    checkpoint.save(db.checkpoint_path(flying), {"key": flying, "epochs_done": 2})
    checkpoint.save(db.checkpoint_path(other), {"key": "another run", "epochs_done": 1})
    folder = db.checkpoint_path(flying).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    partial = run_sweep(config, db, workers=1, stored_only=True)
    c = rows["cagrad"].hparams["c"]  # grid points differ in c: the label says which
    assert partial.in_flight == [f"cagrad:c={c} at lr 0.01, seed 2: epoch 2 of 3"]
    assert partial.to_dict()["in_flight"] == partial.in_flight
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    reference = next(
        r for r in db.records() if r["config"]["tasks"] is not None and r["config"]["seed"] == 1
    )
    _drop(db, [reference["key"]])
    path = db.checkpoint_path(reference["key"])
    checkpoint.save(path, {"key": reference["key"], "epochs_done": 1})
    task = reference["config"]["tasks"][0]
    with pytest.raises(
        ConfigError, match=rf"\(in flight: single-task {task} at lr 0\.01, seed 1: epoch 1 of 3\)"
    ):
        run_sweep(config, db, workers=1, stored_only=True)


def test_a_method_with_no_configuration_that_trained_is_reported_failed_and_the_study_goes_on(
    fake, monkeypatch, tmp_path
):
    def train(config, references=None, problem=None, callback=None, checkpoint=None, holds=None):
        if config.method == "fixed" and config.seed == 2:
            raise FloatingPointError("non-finite gradient: shared parameter 0")
        return fake_train_run(config, references, problem, callback, checkpoint)

    monkeypatch.setattr(runner_module, "train_run", train)
    config = SweepConfig(
        problem="fake",
        methods={"unitary": {}, "cagrad": {"c": [0.0, 0.5]}, "famo": {"lr": [10.0]}},
        grid={"lr": [0.01]},
        base={"epochs": 1},
        n_val_runs=2,
        n_best_runs=2,
        fixed_from=["cagrad", "famo"],
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    assert [r.label for r in result.rows] == ["unitary", "cagrad"]
    assert result.failed["famo"].startswith("a failed run at each of its 1 grid point(s): ")
    assert "non-finite loss" in result.failed["famo"]
    # one diverged seed of the fixed weights' one-point grid: that row failed, not the study
    assert result.failed["fixed from cagrad"] == (
        "a failed run at each of its 1 grid point(s): "
        "FloatingPointError: non-finite gradient: shared parameter 0"
    )
    assert result.failed["fixed from famo"] == "famo has no configuration that trained"
    assert result.to_dict()["failed"] == result.failed
    stored = run_sweep(config, db, workers=1, stored_only=True)  # the same view of the store
    assert stored.failed == result.failed
    assert [r.label for r in stored.rows] == ["unitary", "cagrad"]


def test_a_reference_s_failed_runs_are_counted_and_named(fake, monkeypatch, tmp_path):
    from mtopt.experiments.sweep import records_of
    from mtopt.report import comparison, tables

    def train(config, references=None, problem=None, callback=None, checkpoint=None, holds=None):
        if config.tasks == ("a",) and config.seed == 2:
            raise FloatingPointError("non-finite loss(es): a=nan")
        return fake_train_run(config, references, problem, callback, checkpoint)

    monkeypatch.setattr(runner_module, "train_run", train)
    config = SweepConfig(
        problem="fake",
        methods={"unitary": {}},
        grid={"lr": [0.01]},
        base={"epochs": 1},
        n_val_runs=1,
        n_best_runs=3,
    )
    db = RunDatabase(tmp_path / "runs.sqlite")
    result = run_sweep(config, db, workers=1)
    assert result.reference_failed_runs == {"a/acc": 1}  # task b's runs all trained
    # the reference is the mean of the two seeds that trained
    trained = [s for s in config.seeds(3) if s != 2]
    assert len(trained) == 2
    expected = statistics.fmean(
        fake_value(RunConfig(problem="fake", lr=0.01, seed=s), "a", "test") for s in trained
    )
    assert result.references["test"]["a"]["acc"] == pytest.approx(expected, rel=1e-12)
    written = result.to_dict()
    assert written["reference_failed_runs"] == {"a/acc": 1}
    assert "single-task (1 run(s) of a/acc failed, left out)" in tables.markdown_table(written)
    stats = comparison.compare(written, records_of(written, db), "unitary")
    assert "left out of their mean: a/acc (1)" in comparison.markdown(stats)
    monkeypatch.setattr(runner_module, "train_run", fake_train_run)
    clean = run_sweep(config, RunDatabase(tmp_path / "clean.sqlite"), workers=1)
    assert clean.reference_failed_runs == {}
    assert "failed" not in tables.markdown_table(clean.to_dict())


def test_an_error_of_the_machine_is_not_stored_as_a_failed_run(fake, monkeypatch):
    import torch

    from mtopt.experiments.train import RunConfig

    config = RunConfig(problem="fake", method="unitary", epochs=1)
    for error in (torch.OutOfMemoryError("CUDA out of memory"), torch.distributed.DistError("x")):

        def train(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(runner_module, "train_run", train)
        with pytest.raises(type(error)):
            runner_module.train_job(config, None, threads=0)

    def diverge(*args, **kwargs):
        raise RuntimeError("the solver's iterate blew up")

    monkeypatch.setattr(runner_module, "train_run", diverge)
    record = runner_module.train_job(config, None, threads=0)
    assert record["failed"] == "RuntimeError: the solver's iterate blew up"
