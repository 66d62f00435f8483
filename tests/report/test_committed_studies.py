"""The study tables committed under ``docs/results`` are what their committed run stores give: the
statistics are recomputed from the store's records and the sweep result beside each table, so that
a table left stale after the store grew (or a change to the statistics that moves a published
number) fails here. Numbers are compared to the last printed digit, ± 1 in it (a different BLAS
kernel may round the other way); everything else in the table must be the same text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtopt.experiments.database import RunDatabase
from mtopt.experiments.sweep import records_of, run_keys
from mtopt.report import comparison

ROOT = Path(__file__).resolve().parents[2]
CL_RR = ROOT / "docs" / "results" / "mnist_cl_rr"
STORE = CL_RR / "mnist_cl_rr.sqlite"
#: the folder of each table, and the sweep result it was made from
STUDIES = [
    "report/selected.json",  # stage A
    "report_optimizers/optimizers.json",  # stage C
    "report_grid/grid.json",  # stage B: the study's table
]
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def _same_up_to_last_digit(committed: str, recomputed: str) -> None:
    assert NUMBER.split(committed) == NUMBER.split(recomputed)
    for a, b in zip(NUMBER.findall(committed), NUMBER.findall(recomputed), strict=True):
        step = 10.0 ** -len(a.split(".")[1])
        assert abs(float(a) - float(b)) <= 1.5 * step, (a, b)


@pytest.mark.parametrize("sweep", STUDIES)
def test_committed_statistics_are_the_store_s(sweep: str) -> None:
    path = CL_RR / sweep
    result = json.loads(path.read_text())
    db = RunDatabase(STORE, readonly=True)
    records = records_of(result, db)
    keys = run_keys(result)
    assert set(records) == keys  # every run the table was made from is in the committed store
    published = comparison.load_published("gama_grassi_2025")
    stats = comparison.compare(result, records, "unitary", 0.95, published)
    committed = (path.parent / "statistics.md").read_text()
    _same_up_to_last_digit(committed, comparison.markdown(stats))


def test_the_comparison_notices_a_changed_number() -> None:
    with pytest.raises(AssertionError):
        _same_up_to_last_digit("| famo | -3.20 ± 0.56 |", "| famo | -3.23 ± 0.56 |")
    with pytest.raises(AssertionError):
        _same_up_to_last_digit("| famo | better |", "| famo | worse |")
    _same_up_to_last_digit("| famo | -3.20 ± 0.56 |", "| famo | -3.21 ± 0.56 |")


def test_records_of_leaves_out_a_run_the_store_lacks() -> None:
    result = json.loads((CL_RR / "report_grid" / "grid.json").read_text())
    keys = run_keys(result)
    missing = "0" * 16
    assert missing not in keys
    result["rows"][0]["keys"].append(missing)
    records = records_of(result, RunDatabase(STORE, readonly=True))
    assert set(records) == keys  # the unknown key is left out, every stored one is there
    assert list(records) == sorted(records)  # in key order, whatever the hash seed
    assert all(records[k]["key"] == k for k in records)
