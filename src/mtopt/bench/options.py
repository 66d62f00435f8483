"""What ``mtopt bench`` measures: :class:`BenchOptions`, read from the CLI's flags and written
back as the command that reproduces a run (for the report)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from mtopt.bench.labels import method_spec, parse_torchjd
from mtopt.bench.workloads import WORKLOADS
from mtopt.core.hparams import check_threads
from mtopt.specs import parse_spec

__all__ = ["BenchOptions", "command_line", "options_from_args"]


@dataclass
class BenchOptions:
    """What to measure (the CLI's ``mtopt bench`` flags).

    Attributes:
        workloads: names from :data:`~mtopt.bench.workloads.WORKLOADS`.
        steps: measured rounds (every contender steps once per round).
        warmup: untimed rounds first.
        methods: mtopt method specs ``NAME[:KEY=VALUE...][#ENGINE]``; ``None``: every registered
            method that runs with its defaults (:func:`~mtopt.bench.contenders.default_specs`).
        torchjd: measure TorchJD's aggregators too.
        torchjd_aggregators: which, as ``NAME[:level=rep][#gramian]``
            (:mod:`mtopt.bench.labels`); ``None``: all of
            :data:`~mtopt.bench.labels.DEFAULT_TORCHJD` when ``methods`` is ``None``, else the
            counterparts of the selected methods.
        threads: torch intra-op threads (``None``: torch's choice).
        libmtl: measure LibMTL 1.1.5's counterparts too, when it is installed.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds the models, the batches and the per-round order.
        out_dir: where ``bench.md``, ``bench.json`` and ``bench.png`` go (``None``: nowhere).
        plain: measure the plain step (the reference of every ratio).
    """

    workloads: tuple[str, ...] = WORKLOADS
    steps: int = 30
    warmup: int = 5
    methods: tuple[str, ...] | None = None
    torchjd: bool = True
    torchjd_aggregators: tuple[str, ...] | None = None
    threads: int | None = None
    libmtl: bool = True
    device: str = "cpu"
    seed: int = 0
    out_dir: Path | None = None
    plain: bool = True

    def validate(self) -> None:
        """Raise a ValueError for an impossible option, or a spec our grammar refuses (an
        unknown method or hyperparameter is not refused here: that contender is then reported
        as failed, the others still run)."""
        if self.steps < 1:
            raise ValueError(f"--steps must be ≥ 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be ≥ 0, got {self.warmup}")
        check_threads(self.threads)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available in this torch build")
        for name in self.workloads:
            if name not in WORKLOADS:
                raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
        if not self.workloads:
            raise ValueError("no workload to measure")
        for spec in self.methods or ():
            method_spec(spec)
        for name in self.torchjd_aggregators or ():
            parse_torchjd(name)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """:class:`BenchOptions` from the parsed ``mtopt bench`` flags. A method or aggregator the
    user named that cannot be built is their mistake (a ``ValueError``, one line), where
    :func:`run_bench` reports a contender whose set-up fails on a workload as a failed row."""
    aggregators = _split(getattr(args, "torchjd_aggregators", None))
    for spec in _split(args.methods) or ():
        parse_spec(spec, build=True, allow=("engine",))
    for name in aggregators or ():
        aggregator = parse_torchjd(name).aggregator
        try:
            import torchjd.aggregation as available
        except ImportError:
            break  # the bench says TorchJD is missing
        if not hasattr(available, aggregator):
            raise ValueError(f"no aggregator {aggregator!r} in torchjd.aggregation")
    return BenchOptions(
        workloads=_split(args.workloads) or WORKLOADS,
        steps=args.steps,
        warmup=args.warmup,
        methods=_split(args.methods),
        torchjd=not args.no_torchjd,
        libmtl=not getattr(args, "no_libmtl", False),
        torchjd_aggregators=aggregators,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        out_dir=args.out_dir,
    )


def command_line(options: BenchOptions) -> str:
    """The ``mtopt bench`` command that reproduces ``options`` (for the report)."""
    words = [
        "mtopt bench",
        f"--workloads {','.join(options.workloads)}",
        f"--steps {options.steps}",
        f"--warmup {options.warmup}",
    ]
    if options.methods is not None:
        words.append(f"--methods '{','.join(options.methods)}'")
    if not options.torchjd:
        words.append("--no-torchjd")
    elif options.torchjd_aggregators is not None:
        words.append(f"--torchjd-aggregators '{','.join(options.torchjd_aggregators)}'")
    if not options.libmtl:
        words.append("--no-libmtl")
    if options.threads is not None:
        words.append(f"--threads {options.threads}")
    words += [f"--device {options.device}", f"--seed {options.seed}"]
    if options.out_dir is not None:
        words.append(f"--out-dir {options.out_dir}")
    return " ".join(words)
