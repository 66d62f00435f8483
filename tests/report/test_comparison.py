"""``mtopt report``'s statistics: per-seed Δm from the run records, intervals, the baseline
difference paired by seed, the verdict, MR spread, published numbers and their matching."""

from __future__ import annotations

import math

import pytest

from mtopt.errors import ConfigError
from mtopt.report.comparison import compare, load_published, markdown, published_key

DIRECTIONS = {"A": {"acc": False}, "B": {"mse": True}}
REFS = {
    "test": {"A": {"acc": 0.9}, "B": {"mse": 0.2}},
    "val": {"A": {"acc": 0.9}, "B": {"mse": 0.2}},
}


def _record(seed: int, acc: float, mse: float, cosine: float | None = None) -> dict:
    history = [{"epoch": 0}] if cosine is None else [{"epoch": 0, "cosine": cosine}]
    return {
        "config": {"seed": seed},
        "test": {"A": {"acc": acc}, "B": {"mse": mse}},
        "history": history,
    }


def _study():
    records, rows = {}, []
    runs = {
        "unitary:reduction=mean": [(0.88, 0.24, 0.7), (0.87, 0.25, 0.6), (0.885, 0.235, 0.65)],
        "cagrad": [(0.89, 0.205, None), (0.885, 0.21, None), (0.89, 0.2, None)],
        "rlw:distribution=dirichlet:sum_to=k": [
            (0.88, 0.25, None),
            (0.86, 0.26, None),
            (0.89, 0.22, None),
        ],
        "fixed from cagrad": [(0.89, 0.21, None), (0.88, 0.22, None), (0.89, 0.21, None)],
    }
    for label, seeds in runs.items():
        keys = []
        for seed, (acc, mse, cos) in enumerate(seeds, start=1):
            key = f"{label}-{seed}"
            records[key] = _record(seed, acc, mse, cos)
            keys.append(key)
        rows.append({"label": label, "keys": keys})
    result = {
        "problem": "multi_mnist/cl_rr",
        "directions": DIRECTIONS,
        "references": REFS,
        "rows": rows,
    }
    return result, records


def test_statistics_per_method_and_against_the_baseline():
    result, records = _study()
    comp = compare(result, records, baseline="unitary")
    rows = {r.label: r for r in comp.rows}
    assert comp.baseline == "unitary:reduction=mean"
    cagrad = rows["cagrad"]
    assert cagrad.delta_m.n == 3
    assert cagrad.versus is not None
    assert cagrad.versus.kind == "paired"
    assert cagrad.verdict == "better"
    # per seed: Δm = ½(acc/0.9 − 1) + ½(1 − mse/0.2), in %
    expected = 100 * (0.5 * (0.89 / 0.9 - 1) + 0.5 * (1 - 0.205 / 0.2))
    assert cagrad.by_seed[1] == pytest.approx(expected)
    assert rows["rlw:distribution=dirichlet:sum_to=k"].verdict in ("not distinguishable", "worse")
    assert rows["unitary:reduction=mean"].versus is None
    assert all(r.mean_rank is not None and r.mean_rank.n == 3 for r in comp.rows)
    assert comp.cosine["all epochs"] == pytest.approx(0.65)


def test_published_numbers_and_rank_correlation():
    result, records = _study()
    comp = compare(result, records, "unitary", published=load_published("gama_grassi_2025"))
    rows = {r.label: r for r in comp.rows}
    assert rows["unitary:reduction=mean"].published == -8.952
    assert rows["rlw:distribution=dirichlet:sum_to=k"].published == -10.31
    assert rows["fixed from cagrad"].published == -3.251
    rho, n = comp.correlation
    assert n == 4
    assert -1.0 <= rho <= 1.0
    assert comp.published_cosine == 0.6
    text = markdown(comp)
    assert "Spearman" in text
    assert "verdict" in text
    assert "paired" in text


def test_matching_a_row_to_published_keys():
    keys = ["rlw", "rlw:distribution=dirichlet", "unitary", "fixed"]
    assert (
        published_key("rlw:distribution=dirichlet:sum_to=k", keys) == "rlw:distribution=dirichlet"
    )
    assert published_key("rlw:distribution=normal", keys) == "rlw"
    assert published_key("unitary@muon", keys) == "unitary"
    assert published_key("fixed from cagrad", keys) == "fixed"
    assert published_key("cagrad", keys) is None


def test_bad_inputs_are_one_line_errors(tmp_path):
    result, records = _study()
    with pytest.raises(ConfigError, match="no row matches --baseline 'nope'"):
        compare(result, records, baseline="nope")
    with pytest.raises(ConfigError, match="no published results"):
        load_published(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("title = 1\n")
    with pytest.raises(ConfigError, match="no \\[problems"):
        load_published(str(bad))


def test_one_seed_has_no_interval():
    result, records = _study()
    for row in result["rows"]:
        row["keys"] = row["keys"][:1]
    comp = compare(result, records, "unitary")
    assert all(math.isnan(r.delta_m.lo) for r in comp.rows)
    assert {r.verdict for r in comp.rows if r.versus is not None} == {"one seed"}
    assert "±" not in markdown(comp).split("\n\n")[0].split("\n", 2)[2]  # no spread of 1 seed


def test_rows_on_another_optimizer_are_also_measured_against_their_own_references():
    result, records = _study()
    muon_refs = {"A": {"acc": 0.95}, "B": {"mse": 0.15}}  # Muon trains single tasks better too
    result["optimizer_references"] = {"muon": muon_refs}
    for label, shift in (("unitary@muon", 0.0), ("cagrad@muon", 0.01)):
        keys = []
        for seed in (1, 2, 3):
            key = f"{label}-{seed}"
            records[key] = _record(seed, 0.93 + shift + 0.001 * seed, 0.17 - shift)
            keys.append(key)
        result["rows"].append({"label": label, "keys": keys, "optimizer": "muon"})
    comp = compare(result, records, "unitary")
    rows = {r.label: r for r in comp.rows}
    cagrad_muon = rows["cagrad@muon"]
    assert cagrad_muon.own is not None
    assert cagrad_muon.own.mean < cagrad_muon.delta_m.mean
    assert cagrad_muon.versus_same is not None
    assert cagrad_muon.verdict_same == "better"
    assert rows["unitary@muon"].versus_same is None  # the baseline of its optimizer
    assert rows["cagrad"].own is None
    assert "own-optimizer refs" in markdown(comp)


def test_published_numbers_only_beside_rows_on_the_sweeps_optimizer():
    result, records = _study()
    result["optimizer_references"] = {"muon": {"A": {"acc": 0.95}, "B": {"mse": 0.15}}}
    keys = [f"cagrad@muon-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.94, 0.16)
    result["rows"].append({"label": "cagrad@muon", "keys": keys, "optimizer": "muon"})
    comp = compare(result, records, "unitary", published=load_published("gama_grassi_2025"))
    rows = {r.label: r for r in comp.rows}
    assert rows["cagrad@muon"].published is None  # the paper's CAGrad ran on Adam
    assert rows["cagrad"].published == -2.137
    assert comp.correlation[1] == 4  # the four Adam rows, not the Muon one


def test_a_study_in_progress_says_which_rows_are_not_shown_yet():
    result, records = _study()
    result["pending"] = {"nash_mtl": "1 of its 1 grid run(s)"}
    result["in_flight"] = ["nash_mtl at lr 0.001, seed 1: epoch 7 of 60"]
    comp = compare(result, records, baseline="unitary")
    assert comp.pending == {"nash_mtl": "1 of its 1 grid run(s)"}
    text = markdown(comp)
    assert "study in progress" in text
    assert "nash_mtl (waits for 1 of its 1 grid run(s))" in text
    assert "Runs in flight (from their epoch checkpoints): nash_mtl at lr 0.001, seed 1" in text
    result.pop("pending")
    result.pop("in_flight")
    text = markdown(compare(result, records, baseline="unitary"))
    assert "study in progress" not in text
    assert "in flight" not in text


def test_the_qm9_mlp_studys_paper_column_is_the_shipped_gnn_table():
    """docs/results/qm9_mlp/published_gnn.toml files the paper's GNN numbers under qm9/mlp."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    mlp = load_published(str(root / "docs/results/qm9_mlp/published_gnn.toml"))["problems"]
    gnn = load_published("gama_grassi_2025")["problems"]["qm9/gnn"]
    assert mlp["qm9/mlp"]["delta_m"] == gnn["delta_m"]
    assert mlp["qm9/mlp"]["cosine"] == gnn["cosine"]


def test_rows_with_fewer_seeds_are_ranked_on_the_seeds_all_rows_ran():
    result, records = _study()
    full = compare(result, records, baseline="unitary")
    assert full.rank_seeds == []  # every row ran every seed: all of them are used
    cagrad = next(r for r in result["rows"] if r["label"] == "cagrad")
    cagrad["keys"] = cagrad["keys"][:1]  # a study in progress: cagrad's first seed only
    part = compare(result, records, baseline="unitary")
    assert part.rank_seeds == [1]
    assert all(r.mean_rank is not None and r.mean_rank.n == 1 for r in part.rows)
    from mtopt.evaluation.metrics import mean_rank

    seed1 = {r["label"]: records[r["keys"][0]]["test"] for r in result["rows"]}
    expected = mean_rank(seed1, DIRECTIONS)
    assert {r.label: r.mean_rank.mean for r in part.rows} == pytest.approx(expected)
    assert "MR over seed(s) 1 only" in markdown(part)
