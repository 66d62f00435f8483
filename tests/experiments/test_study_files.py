"""The sweep files the repository ships (``docs/results/**``, ``examples/sweeps``) are read the way
``mtopt sweep`` reads them: a study file that does not load, or whose grid has a point that does
not build (a misspelt method or hyperparameter, a value out of range), fails here, not hours into
a background run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mtopt.experiments.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[2]


def _sweep_files() -> list[Path]:
    files = sorted((ROOT / "docs" / "results").rglob("*.toml"))
    files += sorted((ROOT / "examples" / "sweeps").glob("*.toml"))
    out = []
    for path in files:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        if "methods" in data:  # sweep files; the published-numbers tables have none
            out.append(path)
    return out


SWEEP_FILES = _sweep_files()


def test_the_study_files_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SWEEP_FILES}
    for expected in (
        "docs/results/mnist_cl_rr/selected.toml",
        "docs/results/qm9_mlp/study.toml",
        "examples/sweeps/cl_rr_cpu.toml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_sweep_file_loads(path: Path) -> None:
    config = SweepConfig.from_toml(path)  # builds every grid point, fails in one line
    for spec in config.fixed_from:
        assert spec in config.methods


def test_qm9_study_shares_its_curves_runs() -> None:
    """The QM9 study's grid contains the 400-epoch curves' method runs at the same configuration,
    so those runs (stored) are the study's own; its unitary row logs the cosine and is new."""
    study = SweepConfig.from_toml(ROOT / "docs/results/qm9_mlp/study.toml")
    curves = SweepConfig.from_toml(ROOT / "docs/results/qm9_mlp/curves/qm9_mlp_curves_400.toml")
    assert study.base == curves.base
    assert set(curves.grid["lr"]) <= set(study.grid["lr"])
    for spec in ("famo", "nash_mtl", "cagrad"):
        fixed = {k: v[0] for k, v in curves.methods[spec].items() if k != "lr"}
        assert {k: v[0] for k, v in study.methods[spec].items()} == fixed
        lr = curves.methods[spec].get("lr", curves.grid["lr"])[0]
        assert lr in study.grid["lr"]
