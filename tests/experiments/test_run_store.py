"""The one run store (``mtopt.experiments.database``): claims and leases, damaged records and
files, read-only use, the import of earlier JSON run folders."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from mtopt.errors import StoreError
from mtopt.experiments.database import BUSY, CLAIMED, DONE, RunDatabase


def _record(key: str, seed: int = 1) -> dict:
    return {
        "key": key,
        "config": {"problem": "p", "method": "unitary", "seed": seed},
        "selection": {},
        "seconds": 1.0,
    }


def test_a_claim_is_exclusive_until_its_lease_lapses(tmp_path):
    path = tmp_path / "mtopt.sqlite"
    a = RunDatabase(path, lease_seconds=0.5)
    b = RunDatabase(path, lease_seconds=0.5)
    assert a.owner != b.owner
    assert a.claim("k") == CLAIMED
    assert b.claim("k") == BUSY  # a's heartbeat keeps it
    time.sleep(1.0)
    assert b.claim("k") == BUSY  # still beating: a is alive
    a._held.clear()  # a "dies": no more heartbeats
    time.sleep(0.8)
    assert b.claim("k") == CLAIMED  # the stale claim is taken over
    b.put(_record("k"))
    assert a.claim("k") == DONE
    assert b.claim("k") == DONE
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    assert a.count() == 1


def test_a_released_claim_is_free_again(tmp_path):
    a = RunDatabase(tmp_path / "s.sqlite")
    b = RunDatabase(tmp_path / "s.sqlite")
    assert a.claim("k") == CLAIMED
    a.release("k")
    assert b.claim("k") == CLAIMED


def test_a_damaged_record_is_quarantined_and_the_rest_goes_on(tmp_path, caplog):
    path = tmp_path / "mtopt.sqlite"
    db = RunDatabase(path)
    db.put(_record("good"))
    db.put(_record("bad", seed=2))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET record = ? WHERE key = 'bad'", ('{"key": "bad", trunc',))
    assert [r["key"] for r in db.records()] == ["good"]
    assert db.get("bad") is None
    assert "bad" not in db
    assert "bad" in caplog.text
    assert "set aside" in caplog.text
    with sqlite3.connect(path) as conn:
        kept = conn.execute("SELECT key, reason FROM quarantine").fetchall()
    assert kept[0][0] == "bad"
    assert "does not parse" in kept[0][1]
    assert db.claim("bad") == CLAIMED  # redone
    assert db.integrity_check() == "ok"


def test_read_only_use_never_creates_a_store(tmp_path):
    missing = tmp_path / "absent" / "mtopt.sqlite"
    with pytest.raises(StoreError, match="no run store"):
        RunDatabase(missing, readonly=True)
    assert not missing.parent.exists()
    path = tmp_path / "mtopt.sqlite"
    RunDatabase(path).put(_record("k"))
    ro = RunDatabase(path, readonly=True)
    assert ro.get("k")["key"] == "k"
    assert ro.count() == 1
    with pytest.raises(StoreError, match="read-only"):
        ro.put(_record("other"))
    with pytest.raises(StoreError, match="read-only"):
        ro.claim("other")


def test_a_file_that_is_not_a_store_is_one_clear_error(tmp_path):
    path = tmp_path / "mtopt.sqlite"
    path.write_bytes(b"this is not sqlite, just bytes" * 100)
    with pytest.raises(StoreError, match="not a usable run store") as exc:
        RunDatabase(path)
    assert "\n" not in str(exc.value)
    assert str(path) in str(exc.value)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE x (a)")
    with pytest.raises(StoreError, match="not an mtopt run store"):
        RunDatabase(other, readonly=True)


def test_json_run_folders_of_earlier_versions_are_imported_once(tmp_path, caplog):
    folder = tmp_path / "runs"
    folder.mkdir()
    for key in ("a", "b"):
        (folder / f"{key}.json").write_text(json.dumps(_record(key)))
    (folder / "c.json").write_text('{"key": "c", "config": {"problem"')  # truncated
    db = RunDatabase(tmp_path / "mtopt.sqlite")
    assert db.import_json_runs(folder) == 2
    assert db.import_json_runs(folder) == 0
    assert {r["key"] for r in db.records()} == {"a", "b"}
    assert (folder / "c.json.corrupt").exists()
    assert "c.json" in caplog.text
