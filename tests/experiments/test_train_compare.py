"""Training with best-validation selection, comparisons, resumability, determinism, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from mtopt.cli import main
from mtopt.errors import ConfigError
from mtopt.experiments.compare import compare, format_table
from mtopt.experiments.database import RunDatabase
from mtopt.experiments.runner import _execute
from mtopt.experiments.train import RunConfig, train_run
from mtopt.problems.multi_mnist import MultiMNIST
from mtopt.specs import parse_spec

TINY = {"epochs": 2, "train_subset": 512, "batch_size": 128, "eval_subset": 500}


@pytest.fixture(scope="module")
def problems(mnist):
    return {v: MultiMNIST(v, mnist=mnist) for v in ("cl_cr", "cl_rr", "rl_rr")}


def test_run_config_validates_and_hashes():
    a = RunConfig(problem="multi_mnist/cl_rr")
    assert a.key() == RunConfig(problem="multi_mnist/cl_rr").key()
    assert a.key() != replace(a, seed=2).key()
    with pytest.raises(ValueError, match="dropout"):
        RunConfig(problem="p", dropout=1.0)


@pytest.mark.slow
def test_multitask_run_needs_references(problems, tmp_path):
    config = RunConfig(problem="multi_mnist/cl_rr", **TINY)
    with pytest.raises(ConfigError, match="single-task"):
        train_run(config, problem=problems["cl_rr"])
    # the caller's mistake, raised by every executor, not stored as a diverged configuration
    db = tmp_path / "s.sqlite"
    with pytest.raises(ConfigError, match="single-task"):
        _execute(str(db), config, None, 0)
    with pytest.raises(ConfigError, match="has no task 'nope'"):
        _execute(str(db), replace(config, tasks=("nope",)), None, 0)
    single = replace(config, tasks=("CL",), method="famo", engine="gramian")
    with pytest.raises(ConfigError, match="engine='gramian' is not possible"):
        _execute(str(db), single, None, 0)  # an engine the method cannot use
    short = replace(config, tasks=("CL",), method="fixed", hparams={"weights": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="fixed: weights has 2 values for 1 tasks"):
        _execute(str(db), short, None, 0)  # a per-task hyperparameter of the wrong length
    assert RunDatabase(db).count() == 0


@pytest.mark.slow
def test_single_task_run_selects_best_validation_epoch_per_metric(problems):
    config = RunConfig(problem="multi_mnist/cl_rr", tasks=("CL",), **TINY)
    result = train_run(config, problem=problems["cl_rr"])
    accs = [h["val"]["CL"]["acc"] for h in result["history"]]
    chosen = result["selection"]["acc"]["epoch"]
    assert accs[chosen] == max(accs)
    assert result["val"]["CL"]["acc"] == max(accs)
    assert 0.0 <= result["test"]["CL"]["acc"] <= 1.0


@pytest.mark.slow
def test_same_seed_same_numbers(problems):
    config = RunConfig(problem="multi_mnist/cl_rr", tasks=("RR",), seed=7, **TINY)
    a = train_run(config, problem=problems["cl_rr"])
    b = train_run(config, problem=problems["cl_rr"])
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["test"] == b["test"]
    c = train_run(replace(config, seed=8), problem=problems["cl_rr"])
    assert c["history"][-1]["train_loss"] != a["history"][-1]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cl_cr", "cl_rr", "rl_rr"])
def test_end_to_end_comparison_per_variant(problems, variant, tmp_path):
    """A few steps of every input class on every variant, then the Δm / MR table."""
    base = RunConfig(
        problem=f"multi_mnist/{variant}",
        epochs=1,
        train_subset=256,
        batch_size=128,
        eval_subset=500,
    )
    seen = []

    def hook(label, config, cached):
        seen.append((label, cached))
        return

    store = RunDatabase(tmp_path / "mtopt.sqlite")
    methods = ["unitary:reduction=mean", "mgda", "mgda_ub:normalization=l2"]
    result = compare(f"multi_mnist/{variant}", methods, base, [1], store, hook, problems[variant])
    assert [r.label for r in result.rows] == ["single-task", *methods]
    for row in result.rows[1:]:
        assert row.delta_m is not None
        assert row.mean_rank is not None
        assert 1.0 <= row.mean_rank <= len(methods)
    assert sum(r.mean_rank for r in result.rows[1:]) == pytest.approx(
        len(methods) * (len(methods) + 1) / 2
    )
    table = format_table(result)
    assert "Δm % ↑" in table
    assert "MR ↓" in table
    assert all(not cached for _, cached in seen)
    # resumable: a second comparison over the same store retrains nothing
    seen.clear()
    again = compare(f"multi_mnist/{variant}", methods, base, [1], store, hook, problems[variant])
    assert seen
    assert all(cached for _, cached in seen)
    assert [r.delta_m for r in again.rows] == [r.delta_m for r in result.rows]


@pytest.mark.slow
def test_cli_train_writes_a_record(tmp_path, capsys, mnist):
    out = tmp_path / "run.json"
    code = main(
        [
            "train", "--problem", "multi_mnist/cl_rr", "--method", "mgda_ub",
            "--hp", "normalization=l2", "--epochs", "1",
            "--train-subset", "256", "--eval-subset", "500",
            "--run-dir", str(tmp_path), "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["method"] == "mgda_ub"
    assert record["config"]["hparams"] == {"normalization": "l2"}
    assert "test_delta_m" in record
    assert "test Δm" in capsys.readouterr().out


def test_cli_reports_bad_input(capsys):
    assert main(["train", "--method", "nope", "--epochs", "1", "--quiet"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["compare", "--methods", "unitary,mgda:bogus=1", "--quiet"]) == 2
    assert "unknown hyperparameter(s) ['bogus']" in capsys.readouterr().err


def test_cli_methods_lists_hyperparameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "mgda_ub" in out
    assert "normalization='loss+'" in out
    assert "weights=<required>" in out


@pytest.mark.slow
def test_every_registered_method_runs_through_compare(problems, tmp_path):
    """Each registered method (fixed needs its weights) runs a few steps in `compare`."""
    import mtopt

    specs = [m if m != "fixed" else "fixed:weights=0.3/0.7" for m in mtopt.available_methods()]
    specs += ["uw:variant=typed", "dwa:mode=window:window=2", "rlw:distribution=dirichlet"]
    specs += ["auto_lambda:meta_split=val", "go4align:num_groups=2"]
    base = RunConfig(problem="multi_mnist/cl_rr", **{**TINY, "epochs": 3, "train_subset": 256})
    result = compare(
        "multi_mnist/cl_rr",
        specs,
        base,
        [1],
        RunDatabase(tmp_path / "mtopt.sqlite"),
        None,
        problems["cl_rr"],
    )
    assert [r.label for r in result.rows[1:]] == specs
    for row in result.rows[1:]:
        assert math.isfinite(row.delta_m)
        assert row.solver_failures == 0


@pytest.mark.slow
def test_multitask_selection_and_reproducibility_of_stateful_methods(problems):
    """The kept epoch maximises validation Δm; RNG, closure and meta-batch methods repeat."""
    from mtopt.experiments.train import run_key

    refs = {
        "val": {"CL": {"acc": 0.5}, "RR": {"mse": 0.8}},
        "test": {"CL": {"acc": 0.5}, "RR": {"mse": 0.8}},
    }
    for spec in ("rlw", "famo", "auto_lambda:meta_lr=0.01"):
        parsed = parse_spec(spec)
        config = RunConfig(
            problem="multi_mnist/cl_rr",
            method=parsed.name,
            hparams=dict(parsed.hparams),
            dropout=0.2,
            **TINY,
        )
        a = train_run(config, references=refs, problem=problems["cl_rr"])
        b = train_run(config, references=refs, problem=problems["cl_rr"])
        assert a["history"] == b["history"]
        assert a["test"] == b["test"]
        scores = [h["score_delta_m"] for h in a["history"]]
        assert a["selection"]["delta_m"]["epoch"] == scores.index(max(scores))
        assert a["val_delta_m"] == pytest.approx(max(scores))
    other = {"val": {"CL": {"acc": 0.6}, "RR": {"mse": 0.8}}, "test": refs["test"]}
    assert run_key(config, refs) != run_key(config, other) != config.key()


def test_the_plateau_schedule_keeps_the_rate_until_the_loss_stalls(problems):
    base = {"problem": "multi_mnist/cl_rr", "tasks": ("CL",), **TINY, "epochs": 3}
    plateau = train_run(RunConfig(**base, lr_schedule="plateau"), problem=problems["cl_rr"])
    exponential = train_run(RunConfig(**base), problem=problems["cl_rr"])
    assert [h["lr"] for h in plateau["history"]] == [1e-3] * 3  # patience 5 epochs
    assert [h["lr"] for h in exponential["history"]] == pytest.approx([1e-3, 9.5e-4, 9.025e-4])
    with pytest.raises(ValueError, match="lr_schedule"):
        RunConfig(problem="p", lr_schedule="cosine")
