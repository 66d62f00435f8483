"""The commands that train and report: ``train``, ``compare``, ``sweep``, ``report``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mtopt.cli.paths import check_output_file, check_output_folder
from mtopt.core.hparams import MAX_SEEDS, check_threads

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for `make run` on 2 CPU cores; says so in the printed header.
    "quick": {"epochs": 4, "train_subset": 20_000, "seeds": 1},
    # Gama & Grassi's MNIST budget (their lr/dropout grid is a sweep, not a preset).
    "paper": {"epochs": 100, "train_subset": None, "seeds": 10},
}
DEFAULT_COMPARE_METHODS = "unitary:reduction=mean,mgda,mgda_ub"


def _base_config(args: argparse.Namespace):
    from mtopt.experiments.train import RunConfig

    if args.threads is not None:
        import torch

        check_threads(args.threads)
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
    extra: dict[str, Any] = {}
    for key, _, value in (item.partition("=") for item in args.hp):
        key = key.strip()
        if key in spec.hparams or key in extra:
            where = f"the method spec {args.method!r}" if key in spec.hparams else "--hp"
            raise ValueError(f"--hp {key}: {key} is already set by {where}; set it once")
        extra[key] = parse_value(value.strip())
    method, hparams = spec.name, {**spec.hparams, **extra}
    parse_spec(format_spec(method, hparams))  # builds the method: a bad name fails here
    check_output_file("--out", args.out)
    check_output_file("--plot-groups", args.plot_groups)
    base = replace(base, **run_options(spec))
    problem = _problem(args)
    rank = 0
    if data_parallel.launched():  # torchrun: one run over the launcher's processes
        rank, _ = data_parallel.init(base.device)
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
    if not 1 <= n_seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be in [1, {MAX_SEEDS}], got {n_seeds}")
    seeds = [1 + i for i in range(n_seeds)]
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--methods names no method (e.g. --methods unitary,mgda)")
    for spec in specs:  # every spec builds before anything trains
        parse_spec(spec)
    check_output_file("--out", args.out)
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
    from mtopt.report.tables import format_cost, markdown_table

    started = time.perf_counter()
    config = SweepConfig.from_toml(args.config, args.set)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {args.workers}")
    check_threads(args.threads)
    if args.address is not None and args.executor != "ray":
        raise ConfigError("--address names a Ray cluster: use it with --executor ray")
    # --stored trains nothing: the store is only read (a committed store is left as it is)
    db = RunDatabase(args.db or args.run_dir / "mtopt.sqlite", readonly=args.stored)
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
    for run in result.in_flight:
        print(f"in flight: {run}")
    for label, why in result.failed.items():
        print(f"failed: {label} ({why})")
    if cost := format_cost(result.cost):
        print(f"cost: {cost}")
    print(
        f"{result.runs} run(s) executed in {time.perf_counter() - started:.0f} s; "
        f"result in {out} (render it with `mtopt report {out}`)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mtopt.errors import ConfigError
    from mtopt.experiments.database import RunDatabase
    from mtopt.experiments.sweep import records_of, run_keys
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
    check_output_folder("--out-dir", args.out_dir)
    published = None if args.paper == "none" else comparison.load_published(args.paper)

    result = _read_sweep_result(args.sweep)
    db = RunDatabase(result["database"], readonly=True)
    if not result["rows"]:  # a study in progress written before its first row: empty plots
        waiting = ", ".join(result.get("pending") or {})
        failed = "; ".join(f"{k}: {v}" for k, v in (result.get("failed") or {}).items())
        raise ConfigError(
            f"{args.sweep} has no method row to report"
            + (f" yet (waiting for: {waiting})" if waiting else "")
            + (f"; failed, no configuration of theirs trained: {failed}" if failed else "")
        )
    records = records_of(result, db)
    keys = run_keys(result)
    if len(records) < len(keys):
        raise ConfigError(
            f"{len(keys) - len(records)} of the {len(keys)} runs {args.sweep} names are not in "
            f"its run store {result['database']}: report on a result with the store it was "
            "made from (or write it again: mtopt sweep FILE --db STORE --stored)"
        )
    out_dir = args.out_dir or Path("reports") / result["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("table.md", markdown_table(result)), ("table.tex", latex_table(result))):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    written.append(plot_delta_m(result, out_dir / "delta_m.png"))
    baseline = args.baseline
    if baseline is None:
        labels = [row["label"] for row in result["rows"]]
        baseline = (
            "unitary" if any(comparison.published_key(x, ["unitary"]) for x in labels) else None
        )
    stats = comparison.compare(result, records, baseline, args.level, published)
    (out_dir / "statistics.md").write_text(comparison.markdown(stats))
    written += [out_dir / "statistics.md", plot_delta_m_ci(stats, out_dir / "delta_m_ci.png")]
    for name, plot in (("weights.png", plot_weights), ("cosine.png", plot_cosine)):
        path = plot(result, records, out_dir / name)
        if path is None:
            print(f"  ({name}: nothing to plot in this sweep)")
        else:
            written.append(path)
    curves = plot_learning_curves(result, records, out_dir / "learning_curves.png", stats.baseline)
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
    needed = ("name", "problem", "config", "database", "rows", "directions", "references")
    if not isinstance(result, dict) or any(k not in result for k in needed):
        raise ConfigError(f"{path} is not a sweep result (written by mtopt sweep)")
    problem = _sweep_result_shape(result)
    if problem is not None:
        raise ConfigError(f"{path} is not a sweep result (written by mtopt sweep): {problem}")
    return result


def _sweep_result_shape(result: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a sweep result's fields (``None``: nothing): each row
    must be a :class:`~mtopt.experiments.sweep.MethodResult`, the other fields what
    ``SweepResult.to_dict`` writes."""
    from pydantic import TypeAdapter, ValidationError

    from mtopt.experiments.sweep import MethodResult

    table = dict[str, dict[str, float]]
    fields: dict[str, Any] = {
        "name": str,
        "problem": str,
        "config": dict[str, Any],
        "database": str,
        "directions": dict[str, dict[str, bool]],
        "references": dict[str, table],
        "rows": list[MethodResult],
        "optimizer_references": dict[str, table],
        "pending": dict[str, str],
        "in_flight": list[str],
        "failed": dict[str, str],
        "reference_failed_runs": dict[str, int],
    }
    for name, kind in fields.items():
        if name not in result:
            continue
        try:
            TypeAdapter(kind).validate_python(result[name], strict=False)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(x) for x in (name, *error["loc"]))
            return f"{where}: {error['msg']}"
    return None
