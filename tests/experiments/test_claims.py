"""Claims under stress: a live owner that stalls past the lease loses its run to the process that
takes it over (its heartbeat notices, its training stops, its record is refused); an owner id
tells pid namespaces and machines of one host name apart; a CPU allocation that fails is the
machine's (the run is redone), not a diverged configuration."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mtopt.experiments import checkpoint as checkpoints
from mtopt.experiments import runner
from mtopt.experiments.database import (
    BUSY,
    CLAIMED,
    ClaimLostError,
    RunDatabase,
    _dead_here,
    _machine,
)
from mtopt.experiments.train import RunConfig, run_key, train_run
from mtopt.problems.multi_mnist import MultiMNIST


def _record(key: str, tag: str) -> dict:
    return {
        "key": key,
        "config": {"problem": "p", "method": "unitary", "seed": 1},
        "selection": {},
        "seconds": 1.0,
        "tag": tag,
    }


def _until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_stalled_owner_loses_its_claim_and_cannot_overwrite_the_new_owner(tmp_path):
    path = tmp_path / "s.sqlite"
    slow = RunDatabase(path, lease_seconds=0.4)  # beats every 0.1 s
    fast = RunDatabase(path, lease_seconds=0.02)  # calls a claim stale after 0.02 s
    assert slow.claim("k") == CLAIMED
    assert slow.holds("k")
    assert _until(lambda: fast.claim("k") == CLAIMED)  # between two of slow's beats
    assert _until(lambda: not slow.holds("k"))  # slow's next beat finds another owner
    with pytest.raises(ClaimLostError, match=r"another process took it over .* holds it"):
        slow.put(_record("k", "slow"))
    assert slow.get("k") is None  # nothing stored, fast's claim intact
    fast.put(_record("k", "fast"))
    with pytest.raises(ClaimLostError, match="stored it"):
        slow.put(_record("k", "slow"))  # finished by fast meanwhile: its record stays
    assert fast.get("k")["tag"] == "fast"
    assert fast.claim("k") == "done"


def test_a_put_without_a_claim_still_stores(tmp_path):
    """``train`` and imports store runs they never claimed; nothing changes for them."""
    db = RunDatabase(tmp_path / "s.sqlite")
    db.put(_record("k", "x"))
    assert db.get("k")["tag"] == "x"


def test_a_resumed_claim_keeps_the_first_start(tmp_path):
    path = tmp_path / "s.sqlite"
    a = RunDatabase(path)
    assert a.claim("k") == CLAIMED
    first = a._connect().execute("SELECT started_at FROM started").fetchone()[0]
    a.release("k")
    b = RunDatabase(path)
    assert b.claim("k") == CLAIMED
    assert b._connect().execute("SELECT started_at FROM started").fetchone()[0] == first


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_an_owner_of_this_machine_and_pid_namespace_is_dead_at_once():
    pid = _dead_pid()
    assert _dead_here(f"{_machine()}:{pid}:tag")
    # the same host name in another pid namespace (a container), or another machine of that name
    assert not _dead_here(f"{_machine()}x:{pid}:tag")
    # an owner id of an earlier version (host name only) cannot tell: it waits for the lease
    assert not _dead_here(f"{socket.gethostname()}:{pid}:tag")
    assert not _dead_here(f"{_machine()}:{os.getpid()}:tag")  # alive


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 9007199254740992 bytes. Error code 12"
        ),
        MemoryError(),
    ],
)
def test_a_failed_allocation_is_redone_not_stored_as_diverged(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(runner, "train_run", fail)
    config = RunConfig(problem="multi_mnist/cl_rr", method="unitary")
    with pytest.raises(type(error)):
        runner.train_job(config, None, 0)


def test_a_diverging_configuration_is_still_a_stored_failure(monkeypatch):
    def fail(*args, **kwargs):
        time.sleep(0.05)  # some training before it diverged
        raise RuntimeError("the solver returned NaN weights")

    monkeypatch.setattr(runner, "train_run", fail)
    config = RunConfig(problem="multi_mnist/cl_rr", method="unitary")
    record = runner.train_job(config, None, 0)
    assert record["failed"].startswith("RuntimeError: the solver returned NaN")
    assert record["seconds"] >= 0.05  # its time, counted in the study's cost


def test_training_stops_at_the_epoch_its_claim_is_lost_without_a_checkpoint(mnist, tmp_path):
    config = RunConfig(
        problem="multi_mnist/cl_rr",
        method="unitary",
        epochs=3,
        train_subset=256,
        batch_size=128,
        eval_subset=128,
    )
    refs = {"val": {"CL": {"acc": 0.5}, "RR": {"mse": 0.8}}}
    answers = iter([True, False])
    path = tmp_path / "k.pt"
    with pytest.raises(ClaimLostError, match="stopped after epoch 2"):
        train_run(
            config,
            refs,
            MultiMNIST("cl_rr", mnist=mnist),
            checkpoint=path,
            holds=lambda: next(answers),
        )
    assert path.is_file()  # epoch 1's, written while the claim held; epoch 2's never written
    assert checkpoints.epochs_done(path, run_key(config, refs)) == 1


def test_execute_leaves_a_lost_run_to_its_new_owner(monkeypatch, tmp_path):
    path = str(tmp_path / "s.sqlite")

    def lose(config, references, threads, checkpoint, holds):
        raise ClaimLostError("run k: taken over")

    monkeypatch.setattr(runner, "train_job", lose)
    config = RunConfig(problem="multi_mnist/cl_rr", method="unitary")
    assert runner._execute(path, config, None, 0) == BUSY


def test_a_sweep_warns_when_its_stored_runs_were_trained_on_different_data(tmp_path, caplog):
    db = RunDatabase(tmp_path / "s.sqlite")
    configs = [RunConfig(problem="multi_mnist/cl_rr", method="unitary", seed=s) for s in (1, 2, 3)]
    for config, digest in zip(configs, ["aaaa", "aaaa", "bbbb"], strict=True):
        db.put({**_record(run_key(config), "x"), "config": config.to_dict(), "data_digest": digest})
    records = runner.Runner(db, workers=1).stored([(c, None) for c in configs[:2]], "same")
    assert all(r is not None for r in records)
    assert "different data" not in caplog.text
    runner.Runner(db, workers=1).stored([(c, None) for c in configs], "mixed")
    assert caplog.text.count("were trained on different data (digests aaaa, bbbb)") == 1


def test_a_record_this_process_never_claimed_is_stored_whatever_the_claims_say(tmp_path):
    """An import of earlier runs, or ``train``, stores without a claim; a leftover claim of a
    killed sweep on the same key does not turn that into an error."""
    path = tmp_path / "s.sqlite"
    other = RunDatabase(path, lease_seconds=600)
    assert other.claim("k") == CLAIMED
    other._held.clear()  # it "dies": its claim row stays
    mine = RunDatabase(path)
    mine.put(_record("k", "imported"))
    assert mine.get("k")["tag"] == "imported"
    assert not mine._lost


def test_a_claim_not_renewed_for_half_a_lease_is_asked_of_the_store(tmp_path):
    """A process that was stopped, or whose heartbeat could not write, does not go on from
    its memory: ``holds`` asks the store, renewing the claim when it is still its own."""
    path = tmp_path / "s.sqlite"
    a = RunDatabase(path, lease_seconds=600)  # beats every 150 s: none in this test
    assert a.claim("k") == CLAIMED
    assert a.claim("j") == CLAIMED
    a._beats["k"] = a._beats["j"] = 0.0  # as after a long stop
    assert a.holds("k")  # still its own: renewed
    assert a._beats["k"] > 0.0
    b = RunDatabase(path, lease_seconds=1e-3)
    assert _until(lambda: b.claim("j") == CLAIMED)
    assert not a.holds("j")  # another process has it now
    assert "j" in a._lost


def test_compare_waits_for_the_new_owners_record_after_losing_its_claim(monkeypatch, tmp_path):
    from mtopt.experiments import compare as compare_module

    path = tmp_path / "s.sqlite"
    store = RunDatabase(path, lease_seconds=600)
    config = RunConfig(problem="multi_mnist/cl_rr", method="unitary")
    key = run_key(config)
    calls = []

    def train(config, references=None, problem=None, callback=None, checkpoint=None, holds=None):
        calls.append(1)
        other = RunDatabase(path, lease_seconds=1e-3)  # takes it over, and finishes it
        assert _until(lambda: other.claim(key) == CLAIMED)
        other.put({**_record(key, "the other's"), "config": config.to_dict()})
        store._beats[key] = 0.0  # this process stalled: no heartbeat for the whole lease
        assert not holds()
        raise ClaimLostError(f"run {key}: lost")

    monkeypatch.setattr(compare_module, "train_run", train)
    record = compare_module.run_or_load(store, config, None, None, None, "unitary")
    assert record["tag"] == "the other's"
    assert calls == [1]
