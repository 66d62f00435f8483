"""Epoch checkpoints: a run killed in the middle of an epoch and resumed gives, bit for bit in one
process, the record of a run that never stopped, for every registered method; a checkpoint of
another run, or a torn file, is set aside; a killed sweep resumes its run from the checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mtopt
import mtopt.experiments.database
from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments.database import RunDatabase
from mtopt.experiments.train import RunConfig, run_key, train_run
from mtopt.problems.multi_mnist import MultiMNIST
from mtopt.specs import parse_spec

TINY = {"epochs": 3, "train_subset": 384, "batch_size": 128, "eval_subset": 256}
REFS = {
    "val": {"CL": {"acc": 0.5}, "RR": {"mse": 0.8}},
    "test": {"CL": {"acc": 0.5}, "RR": {"mse": 0.8}},
}
#: what a run's record holds that is measured, not computed
MEASURED = {"seconds", "step_seconds_median", "resumed"}

#: every registered method (hyperparameters where it needs them), and the random-stream variants
SPECS = {name: {} for name in mtopt.available_methods()}
SPECS["fixed"] = {"weights": [0.3, 0.7]}
SPECS["rlw:seed=3"] = {}  # a private generator, in the method's state
SPECS["auto_lambda:meta_split=val"] = {}  # the meta-batch stream's position


class KilledError(Exception):
    """Stands for SIGKILL in the middle of an epoch."""


@pytest.fixture(scope="module")
def cl_rr(mnist):
    return MultiMNIST("cl_rr", mnist=mnist)


def _config(spec: str, hparams: dict, **overrides) -> RunConfig:
    name, given = (
        (spec, {}) if ":" not in spec else (parse_spec(spec).name, parse_spec(spec).hparams)
    )
    return RunConfig(
        problem="multi_mnist/cl_rr",
        method=name,
        hparams={**dict(given), **hparams},
        **{"dropout": 0.2, "lr_decay": 0.9, **TINY, **overrides},  # dropout: torch's stream
    )


def _kill_at(epoch: int, batch: int):
    def callback(event: str, progress: dict) -> None:
        if event == "step" and progress["epoch"] == epoch and progress["batch"] == batch:
            raise KilledError

    return callback


def _resumed_after(config: RunConfig, problem, path, change) -> dict:
    """Kill ``config``'s run in its second epoch, apply ``change`` to the checkpoint its first
    epoch left (as another version, machine or data would have written it), and resume."""
    with pytest.raises(KilledError):
        train_run(
            config, references=REFS, problem=problem, callback=_kill_at(1, 0), checkpoint=path
        )
    state = checkpoints.load(path, run_key(config, REFS))
    assert state is not None
    change(state)
    checkpoints.save(path, state)
    return train_run(config, references=REFS, problem=problem, checkpoint=path)


def _computed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in MEASURED}


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_a_run_killed_mid_epoch_resumes_to_the_same_record(spec, cl_rr, tmp_path):
    config = _config(spec, SPECS[spec])
    straight = train_run(config, references=REFS, problem=cl_rr)
    path = tmp_path / "run.pt"
    with pytest.raises(KilledError):  # killed in epoch 1, after epoch 0's checkpoint
        train_run(config, references=REFS, problem=cl_rr, callback=_kill_at(1, 1), checkpoint=path)
    torch.manual_seed(12345)  # the process's streams moved on meanwhile
    with pytest.raises(KilledError):  # killed again in epoch 2, having resumed once
        train_run(config, references=REFS, problem=cl_rr, callback=_kill_at(2, 0), checkpoint=path)
    resumed = train_run(config, references=REFS, problem=cl_rr, checkpoint=path)
    assert _computed(resumed) == _computed(straight)
    assert [r["epoch"] for r in resumed["resumed"]] == [1, 2]
    assert "resumed" not in straight
    assert resumed["seconds"] > 0


@pytest.mark.slow
def test_the_plateau_schedule_and_a_finished_checkpoint_resume(cl_rr, tmp_path):
    """The plateau schedule's counters are in the checkpoint; a checkpoint left after the last
    epoch (killed before the record was stored) gives the record without training again."""
    config = _config("famo", {}, lr_schedule="plateau", lr_decay=None)
    straight = train_run(config, references=REFS, problem=cl_rr)
    path = tmp_path / "run.pt"
    with pytest.raises(KilledError):
        train_run(config, references=REFS, problem=cl_rr, callback=_kill_at(2, 2), checkpoint=path)
    finished = train_run(config, references=REFS, problem=cl_rr, checkpoint=path)
    assert _computed(finished) == _computed(straight)
    again = train_run(
        config, references=REFS, problem=cl_rr, checkpoint=path, callback=_kill_at(0, 0)
    )
    assert _computed(again) == _computed(straight)  # no step ran (the callback would raise)


@pytest.mark.slow
def test_a_checkpoint_of_another_run_or_a_torn_file_is_set_aside(cl_rr, tmp_path, caplog):
    config = _config("unitary", {}, epochs=1)
    straight = train_run(config, references=REFS, problem=cl_rr)
    path = tmp_path / "run.pt"
    checkpoints.save(path, {"key": "another run", "epochs_done": 1})
    other = train_run(config, references=REFS, problem=cl_rr, checkpoint=path)
    assert _computed(other) == _computed(straight)
    assert "resumed" not in other
    assert (tmp_path / "run.pt.unusable").is_file()
    assert "set aside" in caplog.text
    path.write_bytes(b"\x80\x04 torn in the middle")
    torn = train_run(config, references=REFS, problem=cl_rr, checkpoint=path)
    assert _computed(torn) == _computed(straight)
    assert checkpoints.load(path, run_key(config, REFS)) is not None  # the new one is whole
    checkpoints.remove(path)
    assert not path.exists()


@pytest.mark.slow
def test_a_checkpoint_this_code_cannot_load_is_set_aside(cl_rr, tmp_path, caplog):
    """The right run's checkpoint, written by code whose state no longer fits (here: a model of
    another shape), is not a failed run: it is set aside and the run starts over."""
    config = _config("cagrad", {}, epochs=2)
    straight = train_run(config, references=REFS, problem=cl_rr)

    def reshape(state: dict) -> None:
        state["model"] = {k: torch.zeros(3) for k in state["model"]}

    again = _resumed_after(config, cl_rr, tmp_path / "run.pt", reshape)
    assert _computed(again) == _computed(straight)
    assert "resumed" not in again
    assert "not this code's" in caplog.text
    assert (tmp_path / "run.pt.unusable").is_file()


@pytest.mark.slow
def test_a_checkpoint_of_other_data_is_set_aside_and_another_version_is_named(
    cl_rr, tmp_path, caplog
):
    """A run resumed on other data (another data folder, say) would mix two data sets in one
    record: its checkpoint is set aside. One resumed under another code version or thread count
    is kept, with one warning line, and its record names the version it began with."""
    config = _config("famo", {}, epochs=2)
    straight = train_run(config, references=REFS, problem=cl_rr)
    assert straight["began_with"] == mtopt.experiments.database.code_version()
    assert straight["threads"] == torch.get_num_threads()
    assert len(straight["data_digest"]) == 16
    path = tmp_path / "run.pt"

    def older(state: dict) -> None:
        state["began"] = {**state["began"], "code_version": "mtopt 0.0.9 (abc)", "threads": 99}

    resumed = _resumed_after(config, cl_rr, path, older)
    began = {"began_with": "mtopt 0.0.9 (abc)", "threads": 99}  # each resume's: in ``resumed``
    assert _computed(resumed) == {**_computed(straight), **began}
    assert resumed["resumed"][0]["threads"] == torch.get_num_threads()
    assert "resumes under another setting: code_version mtopt 0.0.9 (abc) then" in caplog.text
    assert "threads 99 then" in caplog.text

    checkpoints.remove(path)  # as a store does once the record is in

    def other_data(state: dict) -> None:
        state["began"] = {**state["began"], "data_digest": "0123456789abcdef"}

    again = _resumed_after(config, cl_rr, path, other_data)
    assert _computed(again) == _computed(straight)
    assert "resumed" not in again
    assert "of other data (digest 0123456789abcdef" in caplog.text
    assert (tmp_path / "run.pt.unusable").is_file()


def test_a_temporary_file_a_kill_left_is_deleted(tmp_path):
    path = tmp_path / "k.pt"
    checkpoints.save(path, {"key": "k", "epochs_done": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = tmp_path / f"k.pt.{dead.pid}.tmp"  # killed between its write and its rename
    torn.write_bytes(b"a whole checkpoint, never renamed")
    live = tmp_path / f"k.pt.{os.getpid()}.tmp"  # being written by a live process now
    live.write_bytes(b"half")
    other = tmp_path / f"j.pt.{dead.pid}.tmp"  # another run's: not this one's to delete
    other.write_bytes(b"")
    assert checkpoints.load(path, "k")["epochs_done"] == 1
    assert not torn.exists()
    assert live.exists()  # a reader (``sweep --stored``, a new owner) leaves it
    torn.write_bytes(b"again")
    checkpoints.remove(path)  # the record is stored: whoever still writes has lost the run
    assert not torn.exists()
    assert not live.exists()
    assert not path.exists()
    assert other.exists()


def test_an_unwritable_checkpoint_folder_costs_resumability_not_the_run(tmp_path, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    assert not checkpoints.save(blocker / "sub" / "run.pt", {"key": "k"})
    assert "not resumable" in caplog.text
    assert checkpoints.load(tmp_path / "absent.pt", "k") is None


SWEEP = """
problem = "multi_mnist/cl_rr"
name = "resumable"
n_val_runs = 1
[base]
epochs = 6
train_subset = 2048
eval_subset = 256
batch_size = 128
[grid]
lr = [1e-3]
[methods]
"rlw:seed=3" = {}
"""


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_run_from_the_checkpoint(tmp_path, mnist):
    config = tmp_path / "resumable.toml"
    config.write_text(SWEEP)
    db_path = tmp_path / "runs" / "mtopt.sqlite"
    folder = db_path.with_name("mtopt.sqlite.checkpoints")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTOPT_LEASE_SECONDS": "3"}
    command = [
        *(sys.executable, "-m", "mtopt.cli", "sweep", str(config), "--quiet"),
        *("--db", str(db_path), "--run-dir", str(db_path.parent), "--workers", "1"),
    ]
    proc = subprocess.Popen(command, env=env)
    deadline = time.time() + 300
    key = None
    while time.time() < deadline and proc.poll() is None:  # the multi-task run's 2nd epoch
        db = RunDatabase(db_path) if db_path.exists() else None
        done = db.count() if db else 0
        saved = list(folder.glob("*.pt")) if folder.is_dir() else []
        if done == 2 and saved:  # the two references are stored; the method run has a checkpoint
            state = checkpoints.load(saved[0], saved[0].stem)
            if state is not None and state["epochs_done"] >= 2:
                key = saved[0].stem
                break
        time.sleep(0.05)
    assert key is not None, "the method run never saved a checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert subprocess.run(command, env=env, timeout=600).returncode == 0
    record = RunDatabase(db_path).get(key)
    assert record is not None
    assert record["resumed"][0]["epoch"] >= 2
    assert not list(folder.glob("*.pt")), "a stored run's checkpoint was left behind"
