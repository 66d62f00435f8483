"""The command line under careless and hostile input (hypothesis): generated argv and sweep
files end with exit status 0, or with status 2 and exactly one line on stderr; never a
traceback, never a file written outside the run dir.

``MTOPT_BAD_INPUTS=N`` sets the number of generated inputs per test (default 12, to keep
``make test`` short; the figures of the issue came from N = 250); the module prints how many
inputs ended how (``pytest -s``). Valid inputs do train, so every generated input keeps a tiny
budget (64 images, one epoch) unless the budget itself is what is wrong."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtopt.cli import main

EXAMPLES = int(os.environ.get("MTOPT_BAD_INPUTS", "12"))
STATS: Counter[str] = Counter()

WORDS = st.sampled_from(
    ["abc", "", "-3", "0", "nan", "inf", "-inf", "1e309", "2.5", "1", "0.5", "../x", "a/b", "é"]
)
NUMBER_OPTIONS = [
    "--epochs", "--lr", "--dropout", "--weight-decay", "--batch-size", "--lr-decay",
    "--muon-lr", "--cosine-every", "--threads", "--train-subset", "--eval-subset",
]  # fmt: skip
METHOD_SPECS = st.sampled_from(
    [
        "unitary", "nope", "mgda:bogus=1", "cagrad:c=abc", "cagrad:c=-1", "graddrop:k=nan",
        "nash_mtl:tol=-1", "selective_groups:damping=5", "fixed", "fixed:weights=a/b",
        "rlw:distribution=x", "mgda:solver=adam", "", ",", "uw:lr=0", "cagrad@bogus",
        "mgda_ub@muon", "unitary:reduction=mean",
    ]
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    total = sum(STATS.values())
    print(
        f"\nbad-input CLI test: {total} inputs: " + ", ".join(f"{k} {v}" for k, v in STATS.items())
    )


def _run(argv: list[str], root: Path, capsys) -> None:
    before = set(root.rglob("*"))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # --help and friends
        code = int(exc.code or 0)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, (argv, out.err)
    assert "Traceback" not in out.out, (argv, out.out)
    assert code in (0, 2), (argv, code, out.err)
    if code == 2:
        lines = [line for line in out.err.splitlines() if line.strip()]
        error_lines = [line for line in lines if line.startswith("mtopt: error:")]
        assert len(error_lines) == 1, (argv, out.err)
        STATS["exit 2, one line"] += 1
    else:
        STATS["exit 0"] += 1
    written = set(root.rglob("*")) - before
    outside = [p for p in written if not p.is_relative_to(root / "runs")]
    assert not outside, (argv, outside)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.sampled_from(["train", "compare"]),
    options=st.lists(st.tuples(st.sampled_from(NUMBER_OPTIONS), WORDS), max_size=3),
    spec=METHOD_SPECS,
    extra=st.lists(
        st.sampled_from(
            ["--seeds", "--hp", "--problem", "--optimizer", "--bogus", "--seed"]
        ).flatmap(lambda o: st.tuples(st.just(o), WORDS | METHOD_SPECS)),
        max_size=2,
    ),
)
def test_train_and_compare_with_generated_options(
    command, options, spec, extra, tmp_path_factory, capsys, mnist
):
    root = tmp_path_factory.mktemp("cli")
    argv = [command, "--run-dir", str(root / "runs"), "--quiet"]
    argv += ["--epochs", "1", "--train-subset", "64", "--eval-subset", "64", "--batch-size", "32"]
    argv += ["--method" if command == "train" else "--methods", spec]
    for name, value in [*options, *extra]:
        argv += [name, value]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _run(argv, root, capsys)
    finally:
        os.chdir(cwd)


_TOML_LINES = {
    "problem": ['problem = "multi_mnist/cl_rr"', 'problem = "nope"', "problem = 3", ""],
    "name": [
        'name = "ok_name"', 'name = "../../../tmp/x/escaped"', 'name = "/abs"', 'name = ""',
        "name = 5", "",
    ],
    "n_val_runs": ["n_val_runs = 1", 'n_val_runs = "1"', "n_val_runs = 0", "n_val_runs = 3", ""],
    "fixed_from": ['fixed_from = ["unitary"]', 'fixed_from = "cagrad"', 'fixed_from = ["zz"]', ""],
    "methods": [
        '[methods]\nunitary = {}', 'methods = ["unitary"]', '[methods]\ncagrad = { c = [] }',
        '[methods]\ncagrad = { c = ["abc"] }', '[methods]\nnope = {}', "[methods]", "",
    ],
    "grid": [
        "[grid]\nlr = [1e-3]", "[grid]\nlr = []", '[grid]\nlr = "x"', "[grid]\nmomentum = [1]", "",
    ],
    # every variant keeps the budget tiny (the rest of the line is what may be wrong)
    "base": [
        f"[base]\ntrain_subset = 64\neval_subset = 64\n{tiny}" for tiny in (
            "epochs = 1", 'epochs = "three"', "epochs = 1\nlr_decay = -3", "epochs = 1\nbogus = 1"
        )
    ],
}  # fmt: skip


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    parts=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in _TOML_LINES.items()}),
    garbage=st.sampled_from(["", "[[[", "= 3", "\x00", "a = 1\na = 2"]),
    overrides=st.lists(
        st.sampled_from(
            ["grid.lr=abc", "base.epochs=0", "n_val_runs=x", "methods=3", "a.b.c=1", "noequals"]
        ),
        max_size=2,
    ),
)
def test_sweep_with_generated_files(parts, garbage, overrides, tmp_path_factory, capsys, mnist):
    root = tmp_path_factory.mktemp("sweep")
    # scalars first: TOML tables swallow every key after them
    order = ["problem", "name", "n_val_runs", "fixed_from", "base", "grid", "methods"]
    text = "\n".join(parts[k] for k in order if not parts[k].startswith("[")) + "\n"
    text += "\n".join(parts[k] for k in order if parts[k].startswith("[")) + "\n" + garbage
    config = root / "runs" / "input.toml"
    config.parent.mkdir()
    config.write_text(text)
    argv = ["sweep", str(config), "--run-dir", str(root / "runs"), "--workers", "1", "--quiet"]
    for item in overrides:
        argv += ["--set", item]
    _run(argv, root, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "missing.json"],
        ["report", "runs/not_json.json"],
        ["report", "runs/no_db.json"],
        ["compare", "--seeds", "0"],
        ["compare", "--methods", ""],
        ["train", "--hp", "c=abc", "--method", "cagrad"],
        ["train", "--lr-decay", "-3"],
        ["train", "--data-dir", "/nonexistent/folder"],
        ["data", "fetch", "nope"],
        ["data", "fetch", "mnist", "--data-dir", "runs"],  # a folder without MNIST's files
        ["sweep", "runs"],
    ],
)
def test_named_bad_inputs(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "not_json.json").write_text("{ truncated")
    (tmp_path / "runs" / "no_db.json").write_text(
        '{"name": "x", "problem": "p", "config": {}, "database": "runs/absent/mtopt.sqlite", '
        '"rows": [], "directions": {}, "references": {}}'
    )
    code = main([*argv, "--quiet"] if argv[0] in ("train", "compare") else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "runs" / "absent").exists()  # report never creates a store


def test_a_stored_only_sweep_before_its_references_is_one_line(tmp_path, capsys, mnist):
    """`mtopt sweep FILE --stored` on a store without the study's references: exit 2, one line
    naming what is missing, nothing trained, and the store left byte for byte as it was (it is
    only read: a committed store stays in its journal mode); without a store: one line too."""
    import contextlib
    import sqlite3

    from mtopt.experiments.database import RunDatabase

    config = tmp_path / "tiny.toml"
    config.write_text(
        'problem = "multi_mnist/cl_rr"\n[base]\nepochs = 1\ntrain_subset = 64\n'
        "[methods]\nunitary = {}\n"
    )
    runs = tmp_path / "runs"
    code = main(["sweep", str(config), "--run-dir", str(runs), "--stored", "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "no run store" in lines[0], lines
    assert not runs.exists()  # nothing created

    store = tmp_path / "study.sqlite"
    RunDatabase(store)  # an empty store, as committed: one file in DELETE journal mode
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("PRAGMA journal_mode=DELETE")
    before = store.read_bytes()
    code = main(["sweep", str(config), "--db", str(store), "--run-dir", str(runs), "--stored"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "not stored yet" in lines[0]
    assert not (tmp_path / "study.sqlite.checkpoints").exists()  # nothing trained
    assert store.read_bytes() == before


def _one_line_exit_2(code: int, err: str, message: str) -> None:
    """A user's mistake: exit status 2 and one line on stderr, which says ``message``."""
    assert code == 2, err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]
    assert message in err


ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "results" / "mnist_cl_rr" / "report_grid" / "grid.json"


def _row0(result: dict, **changes) -> None:
    result["rows"][0].update(changes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(rows=[{}]), "rows.0.label: Field required"),
        (lambda r: r.update(rows="x"), "rows: Input should be a valid list"),
        (lambda r: r.update(rows=[1, 2]), "rows.0: Input should be a dictionary"),
        (lambda r: r.update(database=123), "database: Input should be a valid string"),
        (lambda r: r.pop("problem"), "is not a sweep result (written by mtopt sweep)"),
        (lambda r: _row0(r, delta_m="abc"), "rows.0.delta_m: Input should be a valid list"),
        (lambda r: r["rows"][0].pop("keys"), "rows.0.keys: Field required"),
        (lambda r: r["rows"][0].pop("test"), "rows.0.test: Field required"),
        (lambda r: _row0(r, keys=["0" * 16]), "1 of the 64 runs"),  # not in the store
        (lambda r: r.update(rows=[]), "has no method row to report"),  # was: empty plots
        (
            lambda r: r.update(rows=[], failed={"famo": "a failed run at each grid point"}),
            "report; failed, no configuration of theirs trained: famo: a failed run",
        ),
        (lambda r: r.update(reference_failed_runs=["a/acc"]), "reference_failed_runs"),
        (
            lambda r: r.update(rows=[], pending={"unitary": "its grid"}),
            "has no method row to report yet (waiting for: unitary)",
        ),
    ],
)
def test_report_on_a_result_of_the_wrong_shape_is_one_line(change, message, tmp_path, capsys):
    import json

    result = json.loads(GRID.read_text())
    result["database"] = str(ROOT / result["database"])
    change(result)
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    code = main(["report", str(path), "--out-dir", str(tmp_path / "out")])
    _one_line_exit_2(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[problems."p".delta_m]\nunitary = "abc"', "delta_m.unitary: 'abc' is not a number"),
        ('[problems."p".delta_m]\nunitary = nan', "delta_m.unitary: nan is not finite"),
        ('[problems."p"]\ndelta_m = [1, 2]', "delta_m is not a table"),
        ('[problems."p".delta_m]\n"mgda@sgd" = 1.0', "key 'mgda@sgd' is not a method"),
        ('[problems."p"]\nfixed_from = 3', "fixed_from must be a method name"),
        ("problems = 3", "no [problems.*] tables"),
    ],
)
def test_a_bad_file_of_published_numbers_names_the_file_and_key(text, message, tmp_path):
    from mtopt.errors import ConfigError
    from mtopt.report.comparison import load_published

    path = tmp_path / "paper.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_published(str(path))
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_refused_read_is_not_called_a_refused_write(tmp_path, monkeypatch):
    from mtopt.cli import user_error

    locked = tmp_path / "locked.json"
    locked.write_text("{}")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root reads everything
    read = user_error(PermissionError(13, "Permission denied", str(locked)))
    assert read == f"permission denied: cannot read {locked} (give yourself read access to it)"
    write = user_error(PermissionError(13, "Permission denied", str(tmp_path / "new")))
    assert write == f"permission denied: {tmp_path / 'new'} (use a folder you can write to)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--threads", "100000"], "--threads must be in [1, 1024], got 100000"),
        (["train", "--seed", str(2**64)], "seed must be less than or equal to 9223372036854775807"),
        (["sweep", "{toml}", "--threads", "5000"], "--threads must be in [1, 1024], got 5000"),
        (["sweep", "{toml}", "--set", f"random_seed={2**70}"], "random_seed"),
        # a typo of a count: an error, not a process listing 10^12 seeds until memory runs out
        (["sweep", "{toml}", "--set", "n_best_runs=1000000000000"], "n_best_runs must be less"),
        (["compare", "--seeds", "1000000000000"], "--seeds must be in [1, 10000]"),
    ],
)
def test_counts_beyond_what_the_machine_or_the_store_takes_are_one_line(
    argv, message, tmp_path, capsys, monkeypatch
):
    methods = "[methods]\nunitary = {}"
    _one_line_exit_2(*_main_in(tmp_path, methods, argv, capsys, monkeypatch), message)


def _main_in(tmp_path, methods: str, argv, capsys, monkeypatch) -> tuple[int, str]:
    """``main(argv + --quiet)`` run in ``tmp_path``, ``{toml}`` in ``argv`` standing for a sweep
    file there with ``methods``: the exit status and stderr."""
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "s.toml"
    toml.write_text(f'problem = "multi_mnist/cl_rr"\n{methods}\n')
    code = main([*(a.replace("{toml}", str(toml)) for a in argv), "--quiet"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'"),
        (["--methods", "cagrad:c=abc"], "c must be a valid number"),
        (["--methods", "fixed"], "requires hyperparameter(s) ['weights']"),
        (["--methods", "upgrad", "--torchjd-aggregators", "NoSuch"], "no aggregator 'NoSuch'"),
    ],
)
def test_bench_refuses_a_contender_the_user_misnamed(methods, message, tmp_path, capsys):
    if "--torchjd-aggregators" in methods:
        pytest.importorskip("torchjd")
    argv = ["bench", "--workloads", "mlp11", "--steps", "1", "--warmup", "0", *methods]
    code = main([*argv, "--out-dir", str(tmp_path / "out")])
    _one_line_exit_2(code, capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()  # refused before measuring anything


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--method", "cagrad:c=0.5", "--hp", "c=0.6"], "--hp c: c is already set by"),
        (["train", "--method", "cagrad", "--hp", "c=0.5", "--hp", "c=0.6"], "already set by --hp"),
        (["train", "--method", "cagrad:c=0.5:c=0.6"], "c is set twice in method spec"),
        (["sweep", "{toml}"], "c set by the spec and by its grid"),
        (["compare", "--methods", "unitary,cagrad:c=0.5:c=0.6"], "c is set twice"),
    ],
)
def test_a_hyperparameter_set_twice_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    """Which of two values would win is a guess the user should not have to make."""
    methods = '[methods]\n"cagrad:c=0.5" = { c = 0.6 }'
    _one_line_exit_2(*_main_in(tmp_path, methods, argv, capsys, monkeypatch), message)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "{folder}"], "--out {folder} is a folder: give a file name"),
        (["train", "--out", "{folder}/no/such/record.json"], "there is no folder"),
        (["compare", "--out", "{folder}"], "is a folder: give a file name"),
        (["report", "{grid}", "--out-dir", "{file}"], "--out-dir {file} is a file, not a folder"),
        (["report", "{grid}", "--out-dir", "{file}/sub"], "is a file, not a folder"),
        (["bench", "--out-dir", "{file}"], "--out-dir {file} is a file, not a folder"),
        (["toy", "--out", "{folder}/no/such/toy.png"], "there is no folder"),
        (["train", "--plot-groups", "{folder}"], "--plot-groups {folder} is a folder"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(
    argv, message, tmp_path, capsys, monkeypatch
):
    """A run, a comparison or a bench of minutes must not end on an error about its output:
    the path is checked first (the run store stays unopened: no runs/ folder appears)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    values = {"{folder}": "folder", "{file}": "file", "{grid}": str(GRID)}
    for old, new in values.items():
        argv = [a.replace(old, new) for a in argv]
        message = message.replace(old, new)
    if argv[0] in ("train", "compare"):
        argv.append("--quiet")
    code = main(argv)
    _one_line_exit_2(code, capsys.readouterr().err, message)
    assert not (tmp_path / "runs").exists()
