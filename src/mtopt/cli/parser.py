"""The command line's declarations: every subcommand, option and help text (``mtopt --help``;
the documentation's CLI reference is rendered from :func:`build_parser`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn


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


def build_parser() -> argparse.ArgumentParser:
    from mtopt import cli
    from mtopt.cli.runs import (
        DEFAULT_COMPARE_METHODS,
        cmd_compare,
        cmd_report,
        cmd_sweep,
        cmd_train,
    )
    from mtopt.cli.tools import DATASETS, cmd_bench, cmd_data_fetch, cmd_methods, cmd_toy

    p = _Parser(prog="mtopt", description=cli.__doc__)
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
        help="the row every method is compared with: a label or a method name (a name means the "
        "row on the sweep's own optimizer; one that fits several rows is an error: give the "
        "label); default: the unitary row, if there is one",
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
    from mtopt.cli.runs import PRESETS

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
    p.add_argument(
        "--data-dir",
        help="folder with the problem's data files, which it must hold (MNIST IDX files, "
        "qm9_part*.csv, yeast.csv, ...); default: $MTOPT_DATA (or the data set's own variable), "
        "then mtopt's cache",
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs"), help="where results are kept")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice; use 1 when other CPU-bound "
        "processes share the cores, where more threads can slow a step down ~10×)",
    )
