"""``mtopt.bench``: result structure of a tiny interleaved run, the report, the target logic, the
spec grammar of its contenders, and that the harness names no method."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import mtopt
from mtopt import bench
from mtopt.bench import (
    PLAIN,
    BenchOptions,
    BenchResult,
    ContenderResult,
    WorkloadResult,
    evaluate_targets,
    markdown_report,
    markdown_table,
    run_bench,
)

HAS_TORCHJD = bench.torchjd_available()


@pytest.fixture(scope="module")
def tiny_run() -> BenchResult:
    options = BenchOptions(
        workloads=("mlp11",),
        steps=3,
        warmup=1,
        methods=("unitary", "upgrad"),
        seed=3,
        libmtl=False,
    )
    return run_bench(options)


def test_every_contender_is_measured_each_round(tiny_run):
    (w,) = tiny_run.workloads
    expected = {PLAIN, "unitary", "upgrad"} | ({"torchjd:UPGrad"} if HAS_TORCHJD else set())
    assert set(w.contenders) == expected
    assert w.num_tasks == 11
    for c in w.contenders.values():
        assert c.error is None, c.error
        assert len(c.times) == 3
        assert c.min is not None
        assert c.median is not None
        assert c.max is not None
        assert 0 < c.min <= c.median <= c.max
        assert len(c.peak_memory) == 3
    # warm-up + measured rounds, each one a permutation of every contender
    assert w.warmup == 1
    assert len(w.order) == 4
    for round_order in w.order:
        assert sorted(round_order) == sorted(expected)
    assert len({tuple(o) for o in w.order}) > 1  # shuffled per round (fixed seed)
    assert w.contenders["upgrad"].phases["gradients"] > 0


def test_ratios_are_relative_to_the_plain_step_of_the_same_run(tiny_run):
    (w,) = tiny_run.workloads
    plain = w.contenders[PLAIN].median
    assert w.ratio_to_plain(PLAIN) == 1.0
    for label, c in w.contenders.items():
        assert math.isclose(w.ratio_to_plain(label), c.median / plain)
    assert w.contenders["upgrad"].category == "param"
    assert w.contenders["unitary"].category == "loss"
    assert w.contenders["upgrad"].counterpart == "torchjd:UPGrad"
    assert w.ratio_to_torchjd("unitary") is None
    if HAS_TORCHJD:
        theirs = w.contenders["torchjd:UPGrad"].median
        assert math.isclose(w.ratio_to_torchjd("upgrad"), w.contenders["upgrad"].median / theirs)


def test_markdown_has_one_row_per_contender(tiny_run, tmp_path):
    (w,) = tiny_run.workloads
    rows = [line for line in markdown_table(w).splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(w.contenders)
    report = markdown_report(tiny_run)
    assert "LibMTL" in report
    assert "## Targets" in report
    written = bench.write_outputs(tiny_run, tmp_path)
    assert {p.name for p in written} == {"bench.md", "bench.json", "bench.png"}
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "bench.md").read_text() == report
    again = bench.result_from_dict(json.loads((tmp_path / "bench.json").read_text()))
    assert markdown_report(again) == report


def test_outputs_without_the_counterparts(tmp_path):
    """``--no-torchjd``: ours still name their TorchJD counterpart, which was not measured; the
    report and the plot show no ratio for it instead of failing."""
    options = BenchOptions(
        workloads=("mlp11",), steps=1, warmup=0, methods=("upgrad",), libmtl=False, torchjd=False
    )
    result = run_bench(options)
    (w,) = result.workloads
    assert set(w.contenders) == {PLAIN, "upgrad"}
    assert w.contenders["upgrad"].counterpart == "torchjd:UPGrad"
    assert w.ratio_to_plain("torchjd:UPGrad") is None
    assert w.ratio_to_torchjd("upgrad") is None
    written = bench.write_outputs(result, tmp_path)
    assert {p.name for p in written} == {"bench.md", "bench.json", "bench.png"}


def _contender(label, kind, category, times, counterpart=None, groups=(), error=None):
    return ContenderResult(
        label,
        kind,
        category,
        counterpart=counterpart,
        times=list(times),
        groups=list(groups),
        error=error,
    )


def test_target_logic_on_a_synthetic_result():
    jd = "torchjd:"
    mlp = WorkloadResult(
        "mlp11",
        "synthetic",
        11,
        {
            c.label: c
            for c in [
                _contender(PLAIN, "plain", "plain", [1.0, 0.9, 1.1]),
                _contender("unitary", "mtopt", "loss", [1.04, 1.0, 1.2]),  # 1.04 ≤ 1.05
                _contender("dwa", "mtopt", "loss", [1.2]),  # 1.2 > 1.05
                _contender("mgda_ub", "mtopt", "rep", [1.4], jd + "MGDA:level=rep"),
                _contender("rotograd", "mtopt", "rep", [2.0]),
                _contender("upgrad", "mtopt", "param", [2.0], jd + "UPGrad"),
                _contender("mgda", "mtopt", "param", [3.0], jd + "MGDA"),
                _contender("nash_mtl", "mtopt", "param", [2.0], jd + "NashMTL"),
                _contender("cagrad", "mtopt", "param", [2.0], jd + "CAGrad"),  # not measured
                _contender("selective_groups", "mtopt", "closure", [2.05], groups=[2, 2, 3]),
                _contender(jd + "MGDA:level=rep", "torchjd", "torchjd", [1.5]),
                _contender(jd + "UPGrad", "torchjd", "torchjd", [2.5]),
                _contender(jd + "MGDA", "torchjd", "torchjd", [2.0]),
                _contender(jd + "NashMTL", "torchjd", "torchjd", [], error="set-up: no ecos"),
            ]
        },
    )
    lenet = WorkloadResult(
        "lenet",
        "synthetic",
        2,
        {
            c.label: c
            for c in [
                _contender(PLAIN, "plain", "plain", [1.0]),
                _contender("mgda_ub", "mtopt", "rep", [3.0]),  # rep target: mlp11 only
                _contender("selective_groups", "mtopt", "closure", [2.2], groups=[2]),
            ]
        },
    )
    result = BenchResult(BenchOptions(), [mlp, lenet], {}, "n/a")
    verdicts = {
        (t.workload, t.label, t.target.split(" ")[0]): t.met for t in evaluate_targets(result)
    }
    assert verdicts == {
        ("mlp11", "unitary", "loss-only"): True,
        ("mlp11", "dwa", "loss-only"): False,
        ("mlp11", "mgda_ub", "rep-level"): True,
        ("mlp11", "mgda_ub", "≤"): True,  # 1.4 / 1.5
        ("mlp11", "rotograd", "rep-level"): False,
        ("mlp11", "upgrad", "≤"): True,  # 2.0 / 2.5
        ("mlp11", "mgda", "≤"): False,  # 3.0 / 2.0
        ("mlp11", "nash_mtl", "≤"): None,  # counterpart failed: not evaluable
        ("mlp11", "selective_groups", "≤"): True,  # 2.05 ≤ M + 0.1 = 2.1
        ("lenet", "selective_groups", "≤"): False,  # 2.2 > 2.1
    }
    checks = {(t.workload, t.label): t for t in evaluate_targets(result) if "M =" in t.target}
    assert checks["mlp11", "selective_groups"].limit == pytest.approx(2.1)
    nash = next(t for t in evaluate_targets(result) if t.label == "nash_mtl")
    assert nash.verdict == "n/a"
    assert "ecos" in nash.note
    assert "not evaluable" in markdown_report(result)


def test_failing_contender_is_reported_not_fatal():
    options = BenchOptions(
        workloads=("mlp11",), steps=1, warmup=0, methods=("no_such_method",), torchjd=False
    )
    (w,) = run_bench(options).workloads
    assert w.contenders[PLAIN].error is None
    assert len(w.contenders[PLAIN].times) == 1
    bad = w.contenders["no_such_method"]
    assert bad.error is not None
    assert "no_such_method" in bad.error
    assert bad.median is None
    assert "FAILED" in markdown_table(w)


def test_options_from_cli_args_and_method_specs():
    args = argparse.Namespace(
        workloads="mlp11,lenet",
        steps=7,
        warmup=2,
        methods="upgrad, fixed:weights=1/2",
        threads=None,
        device="cpu",
        seed=5,
        out_dir=None,
        no_torchjd=True,
    )
    options = bench.options_from_args(args)
    assert options.workloads == ("mlp11", "lenet")
    assert options.methods == ("upgrad", "fixed:weights=1/2")
    assert not options.torchjd
    assert options.steps == 7
    spec = bench.method_spec("fixed:weights=1/2")
    assert (spec.name, dict(spec.hparams), spec.engine) == ("fixed", {"weights": [1, 2]}, None)
    with pytest.raises(ValueError, match="workload"):
        BenchOptions(workloads=("nope",)).validate()
    with pytest.raises(ValueError, match="steps"):
        BenchOptions(steps=0).validate()
    enabled = BenchOptions(methods=("mgda_ub", "imtl_g", "unitary"))
    names = bench.select_torchjd(enabled, enabled.methods)
    assert names == ["MGDA:level=rep", "IMTLG"]
    assert bench.command_line(options) == (
        "mtopt bench --workloads mlp11,lenet --steps 7 --warmup 2 "
        "--methods 'upgrad,fixed:weights=1/2' --no-torchjd --device cpu --seed 5"
    )


def test_memory_probe_cpu():
    import mmap

    probe = bench.MemoryProbe(torch.device("cpu"))
    size = 64 * 2**20
    probe.start()
    # an anonymous mapping touched page by page: fresh resident memory whatever the allocators
    # (torch's, glibc's) kept from earlier tests
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    peak = probe.stop()
    block.close()
    if probe.available:
        assert peak is not None
        assert peak >= 32 * 2**20
    else:
        assert peak is None


def test_libmtl_counterparts_when_installed():
    """LibMTL 1.1.5 (installed by hand with --no-deps) runs as its own rows; an mtopt method's
    notes carry its ratio to the LibMTL counterpart."""
    if not bench.libmtl_available():
        pytest.skip("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")
    options = BenchOptions(
        workloads=("mlp11",), steps=2, warmup=1, methods=("unitary", "gls"), torchjd=False
    )
    result = run_bench(options)
    w = result.workloads[0]
    assert {"libmtl:EW", "libmtl:GLS"} <= set(w.contenders)
    assert w.contenders["libmtl:EW"].error is None
    assert len(w.contenders["libmtl:EW"].times) == 2
    ratio = w.ratio_to_libmtl("unitary")
    assert ratio == pytest.approx(w.contenders["unitary"].median / w.contenders["libmtl:EW"].median)
    assert "libmtl:EW" in bench.markdown_table(w)
    assert w.ratio_to_libmtl("libmtl:EW") is None


def test_groups_target_pairs_each_step_with_its_own_group_count():
    w = WorkloadResult(
        "mlp11",
        "synthetic",
        11,
        {
            c.label: c
            for c in [
                _contender(PLAIN, "plain", "plain", [1.0]),
                # per step: 1.05 − 1, 2.02 − 2, 3.2 − 3, 2.1 − 2 → excess median 0.075
                _contender("sg", "mtopt", "closure", [1.05, 2.02, 3.2, 2.1], groups=[1, 2, 3, 2]),
            ]
        },
    )
    (check,) = evaluate_targets(BenchResult(BenchOptions(), [w], {}, "n/a"))
    assert check.limit == pytest.approx(2.1)  # median M = 2
    assert check.ratio == pytest.approx(2.075)
    assert check.met


def test_solver_targets_and_report_round_trip():
    w = WorkloadResult(
        "mlp11",
        "synthetic",
        11,
        {PLAIN: _contender(PLAIN, "plain", "plain", [1.0])},
        solvers=[
            bench.SolverResult("nash_mtl", "ref", ours=[1.0, 2.0, 3.0], theirs=[20.0, 21.0]),
            bench.SolverResult("other", "ref", ours=[1.0], theirs=[4.0]),
            bench.SolverResult("missing", "ref", error="ImportError: no ecos"),
        ],
    )
    result = BenchResult(BenchOptions(), [w], {}, "n/a")
    verdicts = {t.label: t.met for t in evaluate_targets(result) if "solver" in t.target}
    assert verdicts == {"nash_mtl": True, "other": False, "missing": None}  # 2/20.5, 1/4
    assert w.solvers[0].ratio == pytest.approx(2.0 / 20.5)
    report = markdown_report(result)
    assert "10.2×" in report
    assert "no ecos" in report
    again = bench.result_from_dict(json.loads(json.dumps(result.to_dict())))
    assert markdown_report(again) == report


@pytest.mark.skipif(not HAS_TORCHJD, reason="TorchJD not installed")
def test_compare_solver_replays_every_gramian():
    gen = torch.Generator().manual_seed(0)
    grams = []
    for _ in range(3):
        j = torch.randn(3, 8, generator=gen, dtype=torch.float64)
        grams.append(j @ j.T)
    out = bench.compare_solver("nash_mtl", grams)
    if out.error is not None:  # cvxpy/ECOS missing: said, not raised
        assert "Error" in out.error
        return
    assert len(out.ours) == len(out.theirs) == 3
    assert out.ratio is not None


def test_square_root_reproduces_the_gramian():
    j = torch.randn(4, 6, dtype=torch.float64)
    root = bench.square_root(j @ j.T)
    torch.testing.assert_close(root @ root.T, j @ j.T)


def _default_level(name):
    from mtopt.core.registry import method_class

    return method_class(name).default_level()


def test_engine_suffix_and_default_specs():
    """The gradient engine is our grammar's ``#ENGINE`` suffix (mtopt.specs.parse_spec)."""
    spec = bench.method_spec(" upgrad#gramian ")
    assert (spec.text, spec.name, spec.engine) == ("upgrad#gramian", "upgrad", "gramian")
    assert bench.method_spec("mgda").engine is None
    spec = bench.method_spec("cagrad:c=0.2#batched")
    assert (spec.name, dict(spec.hparams), spec.engine) == ("cagrad", {"c": 0.2}, "batched")
    specs = bench.default_specs()
    assert "upgrad#gramian" in specs
    assert "unitary#gramian" not in specs
    assert "mgda_ub#gramian" not in specs  # representation level: no Gramian engine
    assert not any("@" in s for s in specs)
    assert bench.counterpart_label("upgrad", _default_level("upgrad"), "gramian") == (
        "torchjd:UPGrad#gramian"
    )
    assert bench.counterpart_label("nash_mtl", _default_level("nash_mtl"), "gramian") is None
    assert bench.counterpart_label("nash_mtl", _default_level("nash_mtl")) == "torchjd:NashMTL"
    assert bench.counterpart_label("mgda_ub", "rep") == "torchjd:MGDA:level=rep"


def test_engine_suffix_picks_the_engine_of_the_row():
    workload = bench.get_workload("mlp11")
    model = workload.build()
    row = bench.MtoptContender(model, workload, "upgrad#gramian")
    assert row.mto.engine == "gramian"
    assert row.result.label == "upgrad#gramian"
    assert row.result.counterpart == "torchjd:UPGrad#gramian"
    assert bench.MtoptContender(workload.build(), workload, "upgrad").mto.engine == "auto"


def test_optimizer_suffix_is_refused_with_parse_specs_error(capsys):
    """The bench always uses Adam: ``@OPTIMIZER`` is refused, before anything runs, with the
    one line ``parse_spec`` gives; the old ``@gramian`` engine suffix is refused the same way."""
    from mtopt.cli import main as cli_main
    from mtopt.specs import parse_spec

    with pytest.raises(ValueError, match="not supported here") as expected:
        parse_spec("upgrad@adam", build=False, allow=("engine",))
    for spec in ("upgrad@adam", "upgrad@gramian"):
        with pytest.raises(ValueError, match=r"base optimizer \(@\w+\) is not supported here"):
            BenchOptions(methods=("unitary", spec)).validate()
    with pytest.raises(ValueError, match="not supported here") as got:
        BenchOptions(methods=("upgrad@adam",)).validate()
    assert str(got.value) == str(expected.value)
    code = cli_main(["bench", "--workloads", "mlp11", "--methods", "upgrad@adam", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"mtopt: error: {expected.value}"]


def test_torchjd_contenders_follow_the_spec_grammar():
    assert bench.parse_torchjd("UPGrad").label == "torchjd:UPGrad"
    assert bench.parse_torchjd("torchjd:MGDA:level=rep").name == "MGDA:level=rep"
    assert bench.parse_torchjd("UPGrad:level=param").name == "UPGrad"
    assert bench.parse_torchjd("UPGrad#gramian") == bench.TorchJDSpec("UPGrad", "param", "gramian")
    assert all(bench.parse_torchjd(n).name == n for n in bench.DEFAULT_TORCHJD)
    with pytest.raises(ValueError, match=r"level=rep"):
        bench.parse_torchjd("GradDrop@rep")  # the old label: one line naming the new form
    for bad in ("UPGrad:c=1", "UPGrad:level=loss", "UPGrad#batched", "MGDA:level=rep#gramian"):
        with pytest.raises(ValueError, match="TorchJD contender"):
            bench.parse_torchjd(bad)
    with pytest.raises(ValueError, match="TorchJD contender"):
        BenchOptions(torchjd_aggregators=("UPGrad@gram",)).validate()
    chosen = BenchOptions(methods=("upgrad",), torchjd_aggregators=("torchjd:MGDA:level=rep",))
    assert bench.select_torchjd(chosen, chosen.methods) == ["MGDA:level=rep"]
    if HAS_TORCHJD:
        assert bench.make_aggregator("UPGrad#gramian", 3).__class__.__name__ == "UPGradWeighting"
        assert bench.make_aggregator("CAGrad:level=rep", 3).__class__.__name__ == "CAGrad"


def test_methods_with_required_hyperparameters_leave_the_default_list(capsys):
    """A method that cannot run with its defaults is left out of the default list with one
    line saying what to pass, and runs when the spec gives it; the report records the line."""
    required = {
        name: bench.required_hyperparameters(name)
        for name in mtopt.available_methods()
        if bench.required_hyperparameters(name)
    }
    assert required.get("fixed") == ["weights"]
    lines: list[str] = []
    specs = bench.default_specs(lines.append)
    assert lines == [bench.left_out_message(name, keys) for name, keys in required.items()]
    assert "fixed: needs weights=...; pass it in --methods" in lines
    assert not set(required) & {bench.method_spec(s).name for s in specs}
    assert bench.method_specs(BenchOptions(), lines.append) == specs
    assert bench.method_specs(BenchOptions(methods=("fixed:weights=1/2",))) == ["fixed:weights=1/2"]
    result = BenchResult(BenchOptions(), [], {}, "n/a", notes=lines[:1])
    report = markdown_report(result)
    assert f"- left out of the default method list: {lines[0]}" in report
    assert markdown_report(bench.result_from_dict(json.loads(json.dumps(result.to_dict())))) == (
        report
    )


def test_given_hyperparameters_and_own_defaults_run_normally():
    """``fixed`` runs once its spec gives the weights; ``selective_groups`` runs with its own
    defaults, its M read from ``StepInfo.updates``."""
    ones = "/".join(["1"] * 11)
    options = BenchOptions(
        workloads=("mlp11",),
        steps=2,
        warmup=0,
        methods=(f"fixed:weights={ones}", "selective_groups"),
        torchjd=False,
        libmtl=False,
    )
    (w,) = run_bench(options).workloads
    fixed, groups = w.contenders[f"fixed:weights={ones}"], w.contenders["selective_groups"]
    assert fixed.error is None
    assert len(fixed.times) == 2
    assert fixed.category == "loss"
    assert groups.error is None
    assert len(groups.times) == 2
    assert groups.category == "closure"
    assert len(groups.groups) == 2
    assert all(m >= 1 for m in groups.groups)
    assert any("M =" in t.target for t in evaluate_targets(BenchResult(options, [w], {}, "")))


def _compared_strings(node: ast.AST) -> set[str]:
    """String constants compared with ``==``, ``!=``, ``in``, ``not in`` (also inside a literal
    tuple/list/set), or matched in a ``case``."""
    found: set[str] = set()
    for sub in ast.walk(node):
        operands: list[ast.AST] = []
        if isinstance(sub, ast.Compare):
            operands = [sub.left, *sub.comparators]
        elif isinstance(sub, ast.MatchValue):
            operands = [sub.value]
        for op in operands:
            items = op.elts if isinstance(op, ast.Tuple | ast.List | ast.Set) else [op]
            found |= {i.value for i in items if isinstance(i, ast.Constant)}
        affixes = ("startswith", "endswith", "removeprefix", "removesuffix")
        if isinstance(sub, ast.Call) and getattr(sub.func, "attr", None) in affixes:
            found |= {a.value for a in sub.args if isinstance(a, ast.Constant)}
    return {s for s in found if isinstance(s, str)}


def test_no_module_of_the_harness_special_cases_a_method():
    """The harness names no method: no registered name is compared against anywhere in
    ``mtopt.bench`` (the counterpart tables, data about TorchJD and LibMTL, are keyed by our
    names; that is not a comparison)."""
    names = set(mtopt.available_methods())
    root = Path(inspect.getfile(bench)).parent
    sources = sorted(root.rglob("*.py"))
    assert {p.name for p in sources} >= {"workloads.py", "measure.py", "report.py", "torchjd.py"}
    for path in sources:
        text = path.read_text()
        special = _compared_strings(ast.parse(text)) & names
        assert not special, f"{path.name} compares with method name(s) {sorted(special)}"
        for quoted in ('"fixed"', "'fixed'", '"selective_groups"', "'selective_groups'"):
            assert quoted not in text, f"{path.name} names {quoted}"
    assert not (root.parent / "bench.py").exists()
