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
    for label, shift in (("unitary:reduction=mean@muon", 0.0), ("cagrad@muon", 0.01)):
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
    assert rows["unitary:reduction=mean@muon"].versus_same is None  # its optimizer's baseline
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
    assert mlp["qm9/mlp"]["fixed_from"] == gnn["fixed_from"] == "nash_mtl"


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
    assert "MR over seed(s) 1 only: the rows ran different seeds" in markdown(part)
    assert "not the study table's" in markdown(part)
    assert "Cost:" not in markdown(part)  # a result of an earlier version: no cost
    result["cost"] = {"grids": {"runs": 3, "seconds": 1800.0}}
    assert "Cost: 3 stored run(s) of this study, 0.5 h of training in all (grids 3 in 0.5 h)." in (
        markdown(compare(result, records, baseline="unitary"))
    )


def test_a_run_whose_delta_m_is_not_finite_is_left_out_and_named():
    result, records = _study()
    records["cagrad-2"]["test"]["B"]["mse"] = math.nan  # a diverged regression head
    comp = compare(result, records, baseline="unitary")
    cagrad = next(r for r in comp.rows if r.label == "cagrad")
    assert sorted(cagrad.by_seed) == [1, 3]
    assert cagrad.versus is not None
    assert cagrad.versus.kind == "paired"  # on the two seeds both rows have
    assert cagrad.versus.n == 2
    assert comp.left_out == ["cagrad seed 2"]
    assert comp.rank_seeds == [1, 3]  # the ranks compare rows on the seeds all of them have
    assert "Left out (Δm not finite: a metric diverged): cagrad seed 2" in markdown(comp)
    assert "MR over seed(s) 1, 3 only: the rows' seeds differ (a run left out above" in (
        markdown(comp)
    )


def test_no_mean_rank_when_no_seed_is_common_to_all_rows():
    result, records = _study()
    for row in result["rows"]:
        if row["label"] == "cagrad":
            row["keys"] = row["keys"][2:]  # seed 3 only
        elif row["label"].startswith("fixed"):
            row["keys"] = row["keys"][:1]  # seed 1 only
    comp = compare(result, records, baseline="unitary")
    assert comp.no_common_seed
    assert all(r.mean_rank is None for r in comp.rows)
    assert "No MR: no seed is common to all rows" in markdown(comp)


def test_a_baseline_name_means_the_row_on_the_sweeps_optimizer_or_is_ambiguous():
    result, records = _study()
    keys = [f"unitary@muon-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.95, 0.15)
    result["rows"].insert(0, {"label": "unitary@muon", "keys": keys, "optimizer": "muon"})
    assert compare(result, records, "unitary").baseline == "unitary:reduction=mean"
    assert compare(result, records, "unitary@muon").baseline == "unitary@muon"
    keys = [f"unitary:reduction=sum-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.88, 0.24)
    result["rows"].append({"label": "unitary:reduction=sum", "keys": keys})
    with pytest.raises(ConfigError, match=r"matches 2 rows .*give the row's label"):
        compare(result, records, "unitary")


def test_a_published_number_is_beside_one_row_and_fixed_weights_from_the_papers_source():
    result, records = _study()
    keys = [f"unitary:reduction=sum-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.80, 0.30)
    result["rows"].append({"label": "unitary:reduction=sum", "keys": keys})
    keys = [f"fixed from nash_mtl-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.90, 0.20)
    result["rows"].append({"label": "fixed from nash_mtl", "keys": keys})
    # a row on Muon whose Muon references are not stored yet: still not the paper's Adam number
    keys = [f"cagrad@muon-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.94, 0.16)
    result["rows"].append({"label": "cagrad@muon", "keys": keys, "optimizer": "muon"})
    comp = compare(
        result, records, "unitary:reduction=mean", published=load_published("gama_grassi_2025")
    )
    rows = {r.label: r for r in comp.rows}
    assert rows["unitary:reduction=mean"].published == -8.952  # listed first in the sweep
    assert rows["unitary:reduction=sum"].published is None
    assert rows["fixed from cagrad"].published == -3.251  # CL_RR's fixed weights: from CAGrad
    assert rows["fixed from nash_mtl"].published is None
    assert rows["cagrad@muon"].published is None
    assert comp.correlation[1] == 4  # unitary, cagrad, rlw, fixed from cagrad: each once


def test_the_baseline_on_another_optimizer_has_the_baselines_hyperparameters():
    result, records = _study()
    result["optimizer_references"] = {"muon": {"A": {"acc": 0.95}, "B": {"mse": 0.15}}}
    for label, acc in (("unitary:reduction=sum@muon", 0.99), ("unitary:reduction=mean@muon", 0.93)):
        keys = [f"{label}-{seed}" for seed in (1, 2, 3)]
        for seed, key in enumerate(keys, start=1):
            records[key] = _record(seed, acc + 0.001 * seed, 0.17)
        result["rows"].append({"label": label, "keys": keys, "optimizer": "muon"})
    keys = [f"cagrad@muon-{seed}" for seed in (1, 2, 3)]
    for seed, key in enumerate(keys, start=1):
        records[key] = _record(seed, 0.945 + 0.002 * seed, 0.16)
    result["rows"].append({"label": "cagrad@muon", "keys": keys, "optimizer": "muon"})
    comp = compare(result, records, "unitary:reduction=mean")
    rows = {r.label: r for r in comp.rows}
    peer = rows["unitary:reduction=mean@muon"]
    versus = rows["cagrad@muon"].versus_same
    assert versus is not None
    expected = rows["cagrad@muon"].own.mean - peer.own.mean  # not the reduction=sum row's
    assert versus.mean == pytest.approx(expected)
    assert peer.versus_same is None
    assert rows["unitary:reduction=sum@muon"].versus_same is not None  # a row like any other


def test_the_level_is_printed_as_given():
    result, records = _study()
    assert "97.5 % CI" in markdown(compare(result, records, "unitary", level=0.975))
    assert "95 % CI" in markdown(compare(result, records, "unitary", level=0.95))


def test_a_row_that_failed_is_named_under_the_table():
    result, records = _study()
    result["failed"] = {"famo": "a failed run at each of its 1 grid point(s): ValueError: x"}
    comp = compare(result, records, baseline="unitary")
    assert comp.failed == result["failed"]
    assert "Not shown, no configuration of theirs trained: famo (a failed run at each" in (
        markdown(comp)
    )
    result.pop("failed")
    assert "Not shown" not in markdown(compare(result, records, baseline="unitary"))


def test_a_study_whose_baseline_is_not_stored_yet_is_shown_without_differences():
    result, records = _study()
    unitary = result["rows"].pop(0)
    result["pending"] = {unitary["label"]: "3 of its 3 grid run(s)"}
    comp = compare(result, records, baseline="unitary")
    assert comp.baseline is None
    assert comp.baseline_pending == "unitary:reduction=mean"
    assert all(r.versus is None for r in comp.rows)
    text = markdown(comp)
    assert "No differences yet: the baseline, unitary:reduction=mean, is not stored." in text
    assert "verdict" not in text
    with pytest.raises(ConfigError, match="no row matches --baseline 'nope'"):
        compare(result, records, baseline="nope")  # a name neither shown nor pending
    result["rows"], result["pending"] = [], {**result["pending"], "cagrad": "its grid"}
    empty = markdown(compare(result, records, baseline="unitary"))  # no row at all yet
    assert "not shown yet: unitary:reduction=mean" in empty


def test_without_a_baseline_the_note_names_no_differences():
    result, records = _study()
    text = markdown(compare(result, records, baseline=None))
    assert "Differences to" not in text
    assert "None" not in text


def _two_rows(unitary: list[tuple[int, float]], cagrad: list[tuple[int, float]]):
    """Rows on task B alone (task A at its reference): ``(seed, mse)`` per run."""
    records, rows = {}, []
    for label, runs in (("unitary:reduction=mean", unitary), ("cagrad", cagrad)):
        keys = []
        for seed, mse in runs:
            records[f"{label}-{seed}"] = _record(seed, 0.9, mse)
            keys.append(f"{label}-{seed}")
        rows.append({"label": label, "keys": keys})
    result = {"problem": "p", "directions": DIRECTIONS, "references": REFS, "rows": rows}
    return result, records


def test_the_mr_column_ranks_the_seed_means_as_the_study_table_does():
    """One good and two bad seeds against three middling ones: ranked on the means (the spec's
    MR, the study table's) cagrad is first; ranked seed by seed, unitary wins two seeds of
    three. Both are printed, each named."""
    result, records = _two_rows([(1, 0.1), (2, 0.1), (3, 1.0)], [(1, 0.2), (2, 0.2), (3, 0.2)])
    comp = compare(result, records, baseline="unitary")
    rows = {r.label: r for r in comp.rows}
    assert rows["cagrad"].rank_of_means == pytest.approx(1.25)  # ½(1.5) + ½(1): task A ties
    assert rows["unitary:reduction=mean"].rank_of_means == pytest.approx(1.75)
    assert rows["cagrad"].mean_rank.mean == pytest.approx((1.75 + 1.75 + 1.25) / 3)
    text = markdown(comp)
    assert "| MR | MR per seed (mean ± sd) |" in text
    assert "| 1.25 | 1.58 ± 0.29 |" in text


def test_a_difference_says_over_how_many_shared_seeds_it_is_paired():
    result, records = _two_rows([(1, 0.2), (2, 0.21), (3, 0.22)], [(1, 0.18), (2, 0.2), (4, 0.1)])
    comp = compare(result, records, baseline="unitary")
    text = markdown(comp)
    assert "paired, 2 seeds" in text  # seeds 1 and 2; seed 3 and 4 ran on one side only
    result, records = _two_rows([(1, 0.2), (2, 0.21)], [(3, 0.18)])
    assert "(unpaired, no interval)" in markdown(compare(result, records, baseline="unitary"))
    result, records = _two_rows([(1, 0.2), (2, 0.21)], [(3, 0.18), (4, 0.19)])
    assert "] Welch |" in markdown(compare(result, records, baseline="unitary"))
