"""The other commands: ``methods``, ``data fetch``, ``bench``, ``toy``."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any, cast


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
    data = getattr(importlib.import_module(module), loader)(args.data_dir or None)
    # the digest shown is the cache file's (recorded at write, checked at this load)
    print(f"{summary(data)} ({time.perf_counter() - start:.1f} s)")
    for line in describe(data):
        print(line)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mtopt.bench import main as bench_main
    from mtopt.cli.paths import check_output_folder

    check_output_folder("--out-dir", args.out_dir)  # before minutes of measuring
    return bench_main(args)


def cmd_toy(args: argparse.Namespace) -> int:
    from mtopt.cli.paths import check_output_file
    from mtopt.errors import ConfigError
    from mtopt.experiments import toy

    paper = args.starts == "nash"
    starts = toy.START_POINTS if paper else toy.CAGRAD_START_POINTS
    steps = args.steps if args.steps is not None else (toy.STEPS if paper else toy.CAGRAD_STEPS)
    scale = args.scale if args.scale is not None else (toy.SCALE if paper else 1.0)
    specs = [s.strip() for s in (args.methods or ",".join(toy.DEFAULT_METHODS)).split(",")]
    if not all(specs):
        raise ConfigError(f"--methods {args.methods!r} has an empty entry (e.g. unitary,mgda)")
    toy.check_settings(steps, args.lr, scale, toy.BETAS, prefix="--")  # before the output checks
    if args.out.suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: the figure is a PNG file (NAME.png)")
    check_output_file("--out", args.out)
    check_output_file("--table", args.table)
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
