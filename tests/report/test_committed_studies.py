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
RESULTS = ROOT / "docs" / "results"
CL_RR = RESULTS / "mnist_cl_rr"
QM9 = RESULTS / "qm9_mlp"
#: each table's sweep result (its folder holds the table), the run store and published numbers
STUDIES = {
    "cl_rr/selected": (CL_RR / "report/selected.json", CL_RR / "mnist_cl_rr.sqlite", None),
    "cl_rr/optimizers": (
        CL_RR / "report_optimizers/optimizers.json",
        CL_RR / "mnist_cl_rr.sqlite",
        None,
    ),
    "cl_rr/grid": (CL_RR / "report_grid/grid.json", CL_RR / "mnist_cl_rr.sqlite", None),
    "qm9_mlp": (QM9 / "report/study.json", QM9 / "qm9_mlp.sqlite", QM9 / "published_gnn.toml"),
}
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def _same_up_to_last_digit(committed: str, recomputed: str) -> None:
    assert NUMBER.split(committed) == NUMBER.split(recomputed)
    for a, b in zip(NUMBER.findall(committed), NUMBER.findall(recomputed), strict=True):
        step = 10.0 ** -len(a.split(".")[1])
        assert abs(float(a) - float(b)) <= 1.5 * step, (a, b)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_committed_statistics_are_the_store_s(study: str) -> None:
    path, store, paper = STUDIES[study]
    result = json.loads(path.read_text())
    db = RunDatabase(store, readonly=True)
    records = records_of(result, db)
    keys = run_keys(result)
    assert set(records) == keys  # every run the table was made from is in the committed store
    published = comparison.load_published(str(paper) if paper else "gama_grassi_2025")
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
    records = records_of(result, RunDatabase(CL_RR / "mnist_cl_rr.sqlite", readonly=True))
    assert set(records) == keys  # the unknown key is left out, every stored one is there
    assert list(records) == sorted(records)  # in key order, whatever the hash seed
    assert all(records[k]["key"] == k for k in records)
