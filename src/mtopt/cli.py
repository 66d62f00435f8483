"""``mtopt``: train | compare | sweep | report | bench | toy | methods | data.

The CLI owns the terminal (tables, progress bars); the library prints nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn, cast

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for `make run` on 2 CPU cores; says so in the printed header.
    "quick": {"epochs": 4, "train_subset": 20_000, "seeds": 1},
    # Gama & Grassi's MNIST budget (their lr/dropout grid is a sweep, not a preset).
    "paper": {"epochs": 100, "train_subset": None, "seeds": 10},
}
DEFAULT_COMPARE_METHODS = "unitary:reduction=mean,mgda,mgda_ub"


def main(argv: list[str] | None = None) -> int:
    """Run the command line. A mistake of the user's (a bad option or file, missing or damaged
    data, an unusable run store) is one line on stderr and exit status 2; ``--debug`` shows the
    traceback instead."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
        level = logging.DEBUG if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("mtopt").setLevel(level)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mtopt: interrupted (finished runs are kept; run the command again to resume)",
              file=sys.stderr)  # fmt: skip
        return 130
    except BrokenPipeError:  # `mtopt methods | head`: the reader left, nothing to report
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter closes it
        return 0
    except Exception as exc:  # anticipated ones become one line; anything else is a bug
        message = user_error(exc)
        if message is None or debug:
            raise
        print(f"mtopt: error: {message}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an anticipated error, ``None`` for a bug (a traceback)."""
    import sqlite3

    from pydantic import ValidationError

    from mtopt.core.hparams import describe_fields
    from mtopt.errors import MtoptError

    if isinstance(exc, ValidationError):
        text = describe_fields(exc)
    elif isinstance(exc, MtoptError | ValueError | FileNotFoundError | NotADirectoryError):
        text = str(exc)
    elif isinstance(exc, PermissionError):
        text = f"permission denied: {exc.filename or exc} (use a folder you can write to)"
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    elif isinstance(exc, sqlite3.Error):
        text = f"run store error: {exc} (move the store aside or pass --run-dir)"
    else:
        return None
    return " ".join(text.split()) or type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (an exception the caller prints), and
    ``--debug`` / ``--verbose`` accepted after any subcommand too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        top = kwargs.get("prog") == "mtopt"
        default = False if top else argparse.SUPPRESS
        self.add_argument(
            "--debug", action="store_true", default=default, help="show an error's traceback"
        )
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=default,
            help="log every warning (by default each kind once per run, then counted)",
        )

    def error(self, message: str) -> NoReturn:
        from mtopt.errors import ConfigError

        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtopt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("methods", help="list the registered methods and their hyperparameters")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("data", help="fetch data sets into the cache")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="fetch a data set into the cache")
    f.add_argument("dataset", choices=list(DATASETS))
    f.add_argument(
        "--data-dir",
        help="folder with the data set's own files (MNIST or Fashion-MNIST IDX files, "
        "yeast.csv(.gz), qm9_part*.csv); else $MTOPT_DATA / $MTOPT_FASHION_DATA / "
        "$MTOPT_YEAST_DATA",
    )
    f.set_defaults(func=cmd_data_fetch)

    t = sub.add_parser("train", help="train one method (single-task references run first)")
    _run_options(t)
    t.add_argument(
        "--method",
        default="unitary",
        help="a method spec NAME[:KEY=VALUE...][@OPTIMIZER][#ENGINE] (mtopt.specs), e.g. "
        "'cagrad:c=0.2', 'mgda_ub@muon', 'upgrad#gramian'",
    )
    t.add_argument(
        "--hp", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter"
    )
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--out", type=Path, help="write the run record as JSON here")
    t.add_argument(
        "--plot-groups",
        type=Path,
        metavar="PNG",
        help="selective_groups: plot the number of groups and the affinities over training",
    )
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="compare methods against single-task references")
    _run_options(c)
    c.add_argument(
        "--methods",
        default=DEFAULT_COMPARE_METHODS,
        help="comma-separated specs NAME[:KEY=VALUE...][@OPTIMIZER][#ENGINE], lists as a/b, "
        "e.g. 'unitary,mgda:normalization=l2,fixed:weights=0.1/0.9,mgda_ub@muon,upgrad#gramian'",
    )
    c.add_argument("--seeds", type=int, help="number of seeds (run i uses seed 1 + i)")
    c.add_argument("--out", type=Path, help="write the comparison as JSON here")
    c.set_defaults(func=cmd_compare)

    w = sub.add_parser(
        "sweep", help="grid search with Gama & Grassi's selection protocol, from a TOML file"
    )
    w.add_argument("config", type=Path, help="sweep file (see examples/sweeps/)")
    w.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, dotted keys, lists as a/b (e.g. base.epochs=2)",
    )
    w.add_argument(
        "--workers",
        type=int,
        help="parallel runs (default: one per core; with --executor ray, as many as the "
        "cluster's CPUs hold)",
    )
    w.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where runs train: a local process pool, or one Ray task per run (pip install "
        "'mtopt[ray]'); the run store stays with this process either way",
    )
    w.add_argument(
        "--address",
        help="--executor ray: the cluster's head HOST:PORT, or auto on a cluster node "
        "(default: start a local Ray instance)",
    )
    w.add_argument(
        "--threads",
        type=int,
        help="torch threads per run, and CPUs each Ray task asks for (default: 1; torch's "
        "choice with --workers 1)",
    )
    w.add_argument("--run-dir", type=Path, default=Path("runs"), help="where results are kept")
    w.add_argument("--db", type=Path, help="SQLite run database (default RUN_DIR/mtopt.sqlite)")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.add_argument(
        "--stored",
        action="store_true",
        help="train nothing: the result of the runs stored so far (a study in progress; the "
        "rows still waiting are listed)",
    )
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="tables (markdown, LaTeX) and PNG plots of a sweep")
    r.add_argument("sweep", type=Path, help="the sweep result, RUN_DIR/sweeps/NAME.json")
    r.add_argument("--out-dir", type=Path, help="default: reports/NAME")
    r.add_argument(
        "--baseline",
        help="the row every method is compared with: a label or a method name (default: the "
        "unitary row, if there is one)",
    )
    r.add_argument(
        "--level", type=float, default=0.95, help="confidence level of the intervals (0.95)"
    )
    r.add_argument(
        "--paper",
        default="gama_grassi_2025",
        help="published numbers to print beside ours: a shipped name (gama_grassi_2025) or a "
        "TOML file; 'none' for none",
    )
    r.set_defaults(func=cmd_report)

    b = sub.add_parser(
        "bench",
        help="per-step cost of every method, and of TorchJD's counterparts, side by side",
    )
    b.add_argument(
        "--workloads", default="lenet,mlp11,resnet3", help="comma-separated: lenet, mlp11, resnet3"
    )
    b.add_argument("--steps", type=int, default=30, help="measured rounds (one step each)")
    b.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    b.add_argument(
        "--methods",
        help="comma-separated specs NAME[:KEY=VALUE...][#ENGINE], e.g. upgrad#gramian (default: "
        "every registered method that has no required hyperparameter, and NAME#gramian rows)",
    )
    b.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice; 1 on a shared machine)",
    )
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--seed", type=int, default=0, help="models, batches and the round order")
    b.add_argument("--out-dir", type=Path, help="write bench.md, bench.json and bench.png here")
    b.add_argument("--no-torchjd", action="store_true", help="do not measure TorchJD")
    b.add_argument(
        "--no-libmtl",
        action="store_true",
        help="do not measure LibMTL (measured when installed: pip install --no-deps LibMTL==1.1.5)",
    )
    b.add_argument(
        "--torchjd-aggregators",
        metavar="NAMES",
        help="comma-separated TorchJD aggregators NAME[:level=rep][#gramian] (level=rep: on the "
        "features; #gramian: autogram); default: all of them without --methods, else the "
        "counterparts of --methods",
    )
    b.set_defaults(func=cmd_bench)

    y = sub.add_parser(
        "toy",
        help="the two-objective toy of CAGrad, Nash-MTL and FAMO: every method's path over the "
        "Pareto front (PNG) and a table of the end points",
    )
    y.add_argument(
        "--methods",
        help="comma-separated specs NAME[:KEY=VALUE...] (default: unitary, mgda, cagrad, pcgrad, "
        "nash_mtl, famo, imtl_g, upgrad; the papers' toy settings fill in unset hyperparameters)",
    )
    y.add_argument(
        "--starts",
        choices=["nash", "cagrad"],
        default="nash",
        help="nash: the five start points of Nash-MTL's and FAMO's scripts (default: scale 0.1, "
        "35,000 steps); cagrad: the three of CAGrad's (scale 1, 100,000 steps)",
    )
    y.add_argument("--steps", type=int, help="Adam steps from each start (default: see --starts)")
    y.add_argument("--scale", type=float, help="the factor on L1 (default: see --starts)")
    y.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (1e-3)")
    y.add_argument("--out", type=Path, default=Path("toy.png"), help="the figure (PNG)")
    y.add_argument("--table", type=Path, help="also write the end points as a markdown table")
    y.add_argument("--quiet", action="store_true", help="no progress lines")
    y.set_defaults(func=cmd_toy)
    return p


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", default="multi_mnist/cl_rr")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named budget; flags override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-subset", type=int, help="train on the first N training samples")
    p.add_argument(
        "--eval-subset", type=int, help="validate and test on the first N samples of each split"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr-decay", type=float, default=0.95, help="per-epoch γ; 0 disables")
    p.add_argument(
        "--optimizer",
        choices=["adam", "muon"],
        default="adam",
        help="base optimizer: Adam, or Muon on hidden matrices with AdamW (at --lr) elsewhere",
    )
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon's learning rate")
    p.add_argument(
        "--apt",
        action="store_true",
        help="EXPERIMENTAL adaptive momentum (APT, reconstructed from its abstract) on the "
        "shared parameters",
    )
    p.add_argument(
        "--cosine-every",
        type=int,
        metavar="N",
        help="every N steps log the mean cosine of the task gradients (the gradient-cosine "
        "diagnostic, docs/protocol.md)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model and the data live: cpu, cuda or cuda:N (under torchrun: each "
        "rank's LOCAL_RANK device)",
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (else $MTOPT_DATA)")
    p.add_argument("--run-dir", type=Path, default=Path("runs"), help="where results are kept")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice; use 1 when other CPU-bound "
        "processes share the cores, where more threads can slow a step down ~10×)",
    )


def _base_config(args: argparse.Namespace):
    from mtopt.experiments.train import RunConfig

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    preset = PRESETS.get(args.preset or "", {})
    epochs = args.epochs if args.epochs is not None else preset.get("epochs", 10)
    subset = args.train_subset if args.train_subset is not None else preset.get("train_subset")
    eval_subset = args.eval_subset if args.eval_subset is not None else preset.get("eval_subset")
    return RunConfig(
        problem=args.problem,
        epochs=epochs,
        lr=args.lr,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        lr_decay=args.lr_decay or None,
        train_subset=subset,
        eval_subset=eval_subset,
        optimizer=args.optimizer,
        apt=args.apt,
        muon_lr=args.muon_lr,
        cosine_every=args.cosine_every,
        device=args.device,
    )


def _problem(args: argparse.Namespace):
    from mtopt.errors import ConfigError
    from mtopt.problems import get_problem

    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir {args.data_dir} is not a folder")
    kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    return get_problem(args.problem, **kwargs)


def _progress_hook(quiet: bool):
    from tqdm import tqdm

    def hook(label: str, config, cached: bool):
        if cached:
            if not quiet:
                print(f"  {label} (seed {config.seed}): finished earlier, reusing", file=sys.stderr)
            return None
        if quiet:
            return None
        # disable=None: a live bar on a terminal, nothing in logs and CI (the "done" line stays)
        bar = tqdm(
            desc=f"  {label} (seed {config.seed})", leave=False, file=sys.stderr, disable=None
        )

        def callback(kind: str, payload: dict[str, Any]) -> None:
            if kind == "step":
                if not bar.disable and bar.total is None:
                    bar.reset(total=payload["batches"] * config.epochs)
                bar.update(1)
            else:
                scores = {k[6:]: f"{v:.4g}" for k, v in payload.items() if k.startswith("score_")}
                if payload.get("solver_failures"):
                    scores["uncertified"] = str(payload["solver_failures"])
                bar.set_postfix(epoch=payload["epoch"] + 1, **scores)
                if payload["epoch"] + 1 == config.epochs:
                    bar.close()
                    print(f"  {label} (seed {config.seed}): done", file=sys.stderr)

        return callback

    return hook


def _optimizer_text(base) -> str:
    if base.optimizer == "muon":
        text = f"Muon lr {base.muon_lr} + AdamW lr {base.lr}"
    else:
        text = f"Adam lr {base.lr}"
    return text + (" with APT (experimental)" if base.apt else "")


def _header(args: argparse.Namespace, base, seeds: int) -> str:
    subset = f"the first {base.train_subset:,} of" if base.train_subset else "all"
    lines = [
        f"mtopt {args.command} — {args.problem}",
        f"  training on {subset} the training images for {base.epochs} epoch(s), "
        f"{seeds} seed(s), {_optimizer_text(base)}, batch {base.batch_size}, "
        f"dropout {base.dropout}",
    ]
    if base.eval_subset:
        lines.append(
            f"  validation and test on the first {base.eval_subset:,} images of each split"
        )
    if args.preset == "quick":
        lines.append(
            "  QUICK PRESET: a smoke-scale comparison (training subset, few epochs, one seed),"
            " not the paper's protocol (100 epochs, lr/dropout grid, 10 seeds)."
        )
    lines.append("  selection: best validation epoch (Δm vs single-task for multi-task runs)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    import mtopt
    from mtopt.core.registry import method_class

    for name in mtopt.available_methods():
        cls = method_class(name)
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        need = cls.describe_needs()
        needs = "|".join(cast(str, n.name) for n in type(need) if n in need)
        hps = ", ".join(
            f"{k}=<required>" if v is inspect.Parameter.empty else f"{k}={v!r}"
            for k, v in cls.hyperparameters().items()
        )
        print(f"{name:10s} needs {needs:12s} {doc}\n{'':10s} {hps}")
    return 0


def _images(name: str, data: Any) -> str:
    return (
        f"{name} ready: {data.train_images.shape[0]:,} train + "
        f"{data.test_images.shape[0]:,} test images"
    )


#: dataset → (module, loader, one-line summary of what was loaded)
DATASETS: dict[str, tuple[str, str, Callable[[Any], str]]] = {
    "mnist": ("mtopt.problems.mnist_data", "load_mnist", lambda d: _images("MNIST", d)),
    "fashion": (
        "mtopt.problems.fashion_data",
        "load_fashion_mnist",
        lambda d: _images("Fashion-MNIST", d),
    ),
    "yeast": (
        "mtopt.problems.yeast",
        "load_yeast",
        lambda d: (
            f"Yeast ready: {d.features.shape[0]:,} genes × {d.features.shape[1]} features "
            f"× {d.labels.shape[1]} labels"
        ),
    ),
    "qm9": (
        "mtopt.problems.qm9_data",
        "load_qm9",
        lambda d: f"QM9 ready: {len(d):,} molecules × {d.targets.shape[1]} targets",
    ),
}


def cmd_data_fetch(args: argparse.Namespace) -> int:
    import importlib

    from mtopt.problems.cache import describe

    start = time.perf_counter()
    module, loader, summary = DATASETS[args.dataset]
    data = getattr(importlib.import_module(module), loader)(args.data_dir)
    # the digest shown is the cache file's (recorded at write, checked at this load)
    print(f"{summary(data)} ({time.perf_counter() - start:.1f} s)")
    for line in describe(data):
        print(line)
    return 0


def _store(run_dir: Path):
    """The run store of ``run_dir`` (``RUN_DIR/mtopt.sqlite``), with the JSON records of earlier
    versions (``RUN_DIR/runs/*.json``) imported once."""
    from mtopt.experiments.database import RunDatabase

    db = RunDatabase(run_dir / "mtopt.sqlite")
    db.import_json_runs(run_dir / "runs")
    return db


def cmd_train(args: argparse.Namespace) -> int:
    from mtopt.experiments import data_parallel
    from mtopt.experiments.compare import run_or_load, single_task_references
    from mtopt.specs import format_spec, parse_spec, parse_value, run_options

    base = _base_config(args)
    bad = [item for item in args.hp if "=" not in item]
    if bad:
        raise ValueError(f"--hp expects KEY=VALUE, got {bad}")
    spec = parse_spec(args.method, build=False)
    extra = {k.strip(): parse_value(v.strip()) for k, _, v in (i.partition("=") for i in args.hp)}
    method, hparams = spec.name, {**spec.hparams, **extra}
    parse_spec(format_spec(method, hparams))  # builds the method: a bad name fails here
    base = replace(base, **run_options(spec))
    problem = _problem(args)
    rank = 0
    if data_parallel.launched():  # torchrun: one run over the launcher's processes
        rank, _ = data_parallel.init()
        if rank:  # rank 0 speaks and writes; the others train in step with it
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
        store: Any = data_parallel.RankZeroStore(_store(args.run_dir) if rank == 0 else None)
    else:
        store = _store(args.run_dir)
    hook = _progress_hook(args.quiet or rank > 0)
    print(_header(args, base, 1))
    refs = None
    if len(problem.task_names) > 1:
        refs, _ = single_task_references(problem, base, [args.seed], store, hook)
    config = replace(base, method=method, hparams=hparams, seed=args.seed)
    result = run_or_load(store, config, problem, refs, hook, method)
    selection = result["selection"]
    print(f"\n{result['method_repr']}  (run {result['key']}, {result['seconds']:.0f} s)")
    for name, sel in selection.items():
        epoch, score = sel["epoch"] + 1, sel["val_score"]
        print(f"  selected on {name}: epoch {epoch}, validation score {score:.4f}")
    for task, metrics in result["test"].items():
        shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items())
        print(f"  test {task}: {shown}")
    if "test_delta_m" in result:
        print(f"  test Δm vs single-task: {result['test_delta_m']:+.2f} % (higher is better)")
    if result["solver_failures"]:
        count = result["solver_failures"]
        print(f"  WARNING: the solver's answer was not certified on {count} step(s)")
    if args.out and rank == 0:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"  record written to {args.out}")
    if args.plot_groups:
        from mtopt.report.plots import plot_groups

        print(f"  groups plot written to {plot_groups(result, args.plot_groups)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mtopt.errors import ConfigError
    from mtopt.experiments.compare import compare, format_table
    from mtopt.specs import parse_spec

    started = time.perf_counter()
    base = _base_config(args)
    preset = PRESETS.get(args.preset or "", {})
    n_seeds = args.seeds if args.seeds is not None else preset.get("seeds", 1)
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {n_seeds}")
    seeds = [1 + i for i in range(n_seeds)]
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--methods names no method (e.g. --methods unitary,mgda)")
    for spec in specs:  # every spec builds before anything trains
        parse_spec(spec)
    store = _store(args.run_dir)
    print(_header(args, base, n_seeds))
    print(f"  methods: {', '.join(specs)}; results kept in {store.path}")
    comparison = compare(
        args.problem,
        specs,
        base,
        seeds,
        store,
        hook=_progress_hook(args.quiet),
        problem=_problem(args),
    )
    print()
    print(format_table(comparison))
    print(
        "\nΔm: Gama & Grassi's per-task relative change vs single-task test metrics, in %, "
        "higher is better (mean ± std over seeds); Δm flat (shown when a task has several "
        "metrics): the plain mean over all metrics, same sign (Nash-MTL's code prints its "
        "negative, lower is better). MR: mean rank over the compared methods, "
        "lower is better. ms/step: median wall time of one training step (× unitary: "
        "relative to unitary scalarization; a run reused from the store keeps the time measured "
        "when it ran)."
    )
    failures = {r.label: r.solver_failures for r in comparison.rows if r.solver_failures}
    if failures:
        print(f"WARNING: solver did not converge on some steps: {failures}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(asdict(comparison), indent=1))
        print(f"comparison written to {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mtopt.errors import ConfigError
    from mtopt.experiments.database import RunDatabase
    from mtopt.experiments.sweep import SweepConfig, run_sweep
    from mtopt.report.tables import markdown_table

    started = time.perf_counter()
    config = SweepConfig.from_toml(args.config, args.set)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be ≥ 1, got {args.threads}")
    if args.address is not None and args.executor != "ray":
        raise ConfigError("--address names a Ray cluster: use it with --executor ray")
    db = RunDatabase(args.db or args.run_dir / "mtopt.sqlite")
    executor = None
    if (
        args.executor == "ray" and not args.stored
    ):  # Ray starts (or fails, in one line) before anything runs
        from mtopt.experiments.executors import RayExecutor

        executor = RayExecutor(args.address, args.threads or 1, args.workers).start()
    unfinished = [] if args.stored else db.unfinished()
    print(f"mtopt sweep {config.name} — {config.problem}; runs kept in {db.path}")
    if unfinished:
        print(
            f"  {len(unfinished)} run(s) started earlier but never finished: they are redone "
            "(or waited for, if another process is training them now)"
        )

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"  [{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    try:
        result = run_sweep(
            config,
            db,
            args.workers,
            progress,
            executor=executor,
            threads=args.threads,
            stored_only=args.stored,
        )
    finally:
        if executor is not None:
            executor.close()
    out = args.run_dir / "sweeps" / f"{config.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    data = json.loads(out.read_text())
    print()
    print(markdown_table(data))
    for label, waits in result.pending.items():
        print(f"pending: {label} (waits for {waits})")
    print(
        f"{result.runs} run(s) executed in {time.perf_counter() - started:.0f} s; "
        f"result in {out} (render it with `mtopt report {out}`)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mtopt.errors import ConfigError
    from mtopt.experiments.database import RunDatabase
    from mtopt.report import comparison
    from mtopt.report.plots import (
        learning_curve_table,
        plot_cosine,
        plot_delta_m,
        plot_delta_m_ci,
        plot_learning_curves,
        plot_weights,
    )
    from mtopt.report.tables import latex_table, markdown_table

    if not 0.0 < args.level < 1.0:
        raise ConfigError(f"--level must be in (0, 1), got {args.level}")
    published = None if args.paper == "none" else comparison.load_published(args.paper)

    result = _read_sweep_result(args.sweep)
    db = RunDatabase(result["database"], readonly=True)
    out_dir = args.out_dir or Path("reports") / result["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = {key for row in result["rows"] for key in row["keys"]}
    records = {key: rec for key in keys if (rec := db.get(key)) is not None}
    written = []
    for name, text in (("table.md", markdown_table(result)), ("table.tex", latex_table(result))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    written.append(plot_delta_m(result, out_dir / "delta_m.png"))
    baseline = args.baseline
    if baseline is None:
        labels = [row["label"] for row in result["rows"]]
        baseline = next((x for x in labels if comparison.published_key(x, ["unitary"])), None)
    stats = comparison.compare(result, records, baseline, args.level, published)
    (out_dir / "statistics.md").write_text(comparison.markdown(stats))
    written += [out_dir / "statistics.md", plot_delta_m_ci(stats, out_dir / "delta_m_ci.png")]
    for name, plot in (("weights.png", plot_weights), ("cosine.png", plot_cosine)):
        path = plot(result, records, out_dir / name)
        if path is None:
            print(f"  ({name}: nothing to plot in this sweep)")
        else:
            written.append(path)
    curves = plot_learning_curves(result, records, out_dir / "learning_curves.png", baseline)
    if curves is not None:
        (out_dir / "learning_curves.md").write_text(learning_curve_table(result, records))
        written += [curves, out_dir / "learning_curves.md"]
    print(markdown_table(result))
    print(comparison.markdown(stats))
    for path in written:
        print(f"  wrote {path}")
    return 0


def _read_sweep_result(path: Path) -> dict[str, Any]:
    """A sweep result written by ``mtopt sweep``, checked enough to report on."""
    from mtopt.errors import ConfigError

    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no sweep result {path} (mtopt sweep writes RUN_DIR/sweeps/NAME.json)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a sweep result (not JSON: {exc})") from None
    needed = ("name", "database", "rows", "directions", "references")
    if not isinstance(result, dict) or any(k not in result for k in needed):
        raise ConfigError(f"{path} is not a sweep result (written by mtopt sweep)")
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    from mtopt.bench import main as bench_main

    return bench_main(args)


def cmd_toy(args: argparse.Namespace) -> int:
    from mtopt.errors import ConfigError
    from mtopt.experiments import toy

    paper = args.starts == "nash"
    starts = toy.START_POINTS if paper else toy.CAGRAD_START_POINTS
    steps = args.steps if args.steps is not None else (toy.STEPS if paper else toy.CAGRAD_STEPS)
    scale = args.scale if args.scale is not None else (toy.SCALE if paper else 1.0)
    specs = [s.strip() for s in (args.methods or ",".join(toy.DEFAULT_METHODS)).split(",")]
    if not all(specs):
        raise ConfigError(f"--methods {args.methods!r} has an empty entry (e.g. unitary,mgda)")
    if steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {steps}")
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: the figure is a PNG file (NAME.png)")
    for option, path in (("--out", args.out), ("--table", args.table)):
        if path is not None and (path.is_dir() or not path.resolve().parent.is_dir()):
            raise ConfigError(f"{option} {path}: not a file in an existing folder")
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"  [{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr)

    results = toy.run_toy(specs, starts, steps, args.lr, scale, progress)
    table = toy.format_table(results)
    print(table)
    if args.table is not None:
        args.table.write_text(table + "\n")
        print(f"  wrote {args.table}")
    print(f"  wrote {toy.plot_toy(results, args.out, scale)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
