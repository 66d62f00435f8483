"""The statistics of a sweep's comparison (``mtopt report``): per method, Δm with its confidence
interval, the difference to a baseline with its interval and a verdict, the mean rank with its
spread over seeds, and, next to them, published numbers with the rank correlation between the
two orderings and the gradient-cosine level. The intervals are those of
:mod:`mtopt.evaluation.statistics`."""

from __future__ import annotations

import inspect
import math
import statistics
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mtopt.core.registry import method_class
from mtopt.errors import ConfigError
from mtopt.evaluation.metrics import delta_m, mean_rank, mean_table
from mtopt.evaluation.statistics import (
    Difference,
    Interval,
    difference_interval,
    mean_interval,
    rank_correlation,
    verdict,
)
from mtopt.report.tables import format_cost, mean_sd
from mtopt.specs import format_spec, optimizer_label, parse_spec

#: Published results shipped with mtopt (``--paper NAME``), in ``mtopt/report/published``.
PUBLISHED = ("gama_grassi_2025",)


@dataclass
class MethodStats:
    """One row of the statistics table."""

    label: str
    delta_m: Interval
    by_seed: dict[int, float]
    versus: Difference | None = None
    verdict: str = ""
    #: the spec's MR: the rank of the row's metrics averaged over the rank seeds (as the study
    #: table ranks its means), and beside it the MR of each seed, mean ± sd over the seeds
    rank_of_means: float | None = None
    mean_rank: Interval | None = None
    published: float | None = None
    #: the row's base optimizer, and for another one than the sweep's: Δm against single-task
    #: references trained with it, and the difference to the baseline method on it
    optimizer: str = "adam"
    own: Interval | None = None
    own_by_seed: dict[int, float] = field(default_factory=dict)
    versus_same: Difference | None = None
    verdict_same: str = ""


@dataclass
class Comparison:
    """The statistics of one sweep result."""

    problem: str
    baseline: str | None
    level: float
    rows: list[MethodStats]
    published_title: str | None = None
    correlation: tuple[float, int] = (math.nan, 0)
    cosine: dict[str, float] = field(default_factory=dict)
    published_cosine: float | None = None
    #: a study in progress (``mtopt sweep --stored``): rows not shown yet → what they wait for
    pending: dict[str, str] = field(default_factory=dict)
    #: runs not stored yet with an epoch checkpoint ("what, lr, seed: epoch e of n")
    in_flight: list[str] = field(default_factory=list)
    #: the seeds the mean rank used, when not every seed shown (rows that ran different seeds)
    rank_seeds: list[int] = field(default_factory=list)
    #: no seed is common to all rows: ranks would compare different sets of rows, so no MR
    no_common_seed: bool = False
    #: runs left out of their row because their Δm is not finite ("label seed s")
    left_out: list[str] = field(default_factory=list)
    #: rows with no configuration that trained (``SweepResult.failed``) → why
    failed: dict[str, str] = field(default_factory=dict)
    #: a study in progress whose baseline row is not stored yet: its label (no differences)
    baseline_pending: str | None = None
    #: single-task references with failed runs left out of their mean: ``task/metric`` → count
    reference_failed_runs: dict[str, int] = field(default_factory=dict)
    #: the study's stored runs by phase (``SweepResult.cost``): runs and seconds of training
    cost: dict[str, dict[str, float]] = field(default_factory=dict)


def load_published(name_or_path: str) -> dict[str, Any]:
    """A file of published numbers: a shipped name (``gama_grassi_2025``) or a TOML path."""
    try:
        if name_or_path in PUBLISHED:
            text = (
                resources.files("mtopt.report")
                .joinpath(f"published/{name_or_path}.toml")
                .read_text()
            )
        else:
            text = Path(name_or_path).read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(
            f"no published results {name_or_path!r}: give a TOML file or one of {PUBLISHED}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name_or_path}: not valid TOML ({exc})") from None
    if not isinstance(data.get("problems"), dict):
        raise ConfigError(f"{name_or_path}: no [problems.*] tables of published numbers")
    for problem, table in data["problems"].items():
        where = f"{name_or_path}: problems.{problem!r}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} is not a table")
        if "fixed_from" in table and not isinstance(table["fixed_from"], str):
            raise ConfigError(f"{where}.fixed_from must be a method name")
        for kind in ("delta_m", "mean_rank", "cosine"):
            numbers = table.get(kind, {})
            if not isinstance(numbers, dict):
                raise ConfigError(f"{where}.{kind} is not a table of method = number")
            for key, value in numbers.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{where}.{kind}.{key}: {value!r} is not a number")
                if not math.isfinite(value):
                    raise ConfigError(f"{where}.{kind}.{key}: {value} is not finite")
                try:
                    parse_spec(key, build=False)
                except ValueError as exc:
                    raise ConfigError(
                        f"{where}.{kind}: key {key!r} is not a method: {exc}"
                    ) from None
    return data


def published_key(label: str, keys: list[str]) -> str | None:
    """The key of ``keys`` that a row label matches (module doc of the published files): the
    same method name, the key's hyperparameters among the row's; ``fixed`` for a fixed-weights
    row. The most specific match wins."""
    if label.startswith("fixed"):
        return "fixed" if "fixed" in keys else None
    try:
        row = parse_spec(label, build=False)
    except ValueError:
        return None
    best, best_size = None, -1
    for key in keys:
        spec = parse_spec(key, build=False)
        same = spec.name == row.name and all(
            row.hparams.get(k) == v for k, v in spec.hparams.items()
        )
        if same and len(spec.hparams) > best_size:
            best, best_size = key, len(spec.hparams)
    return best


def compare(
    result: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    baseline: str | None = "unitary",
    level: float = 0.95,
    published: Mapping[str, Any] | None = None,
) -> Comparison:
    """The statistics of a sweep result (``SweepResult.to_dict()``) from its runs' records."""
    directions = result["directions"]
    refs = result["references"]["test"]
    optimizers = {row["label"]: row.get("optimizer", "adam") for row in result["rows"]}
    own_refs = result.get("optimizer_references", {})
    per_seed: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    left_out = []
    rows = []
    for result_row in result["rows"]:
        label, optimizer = result_row["label"], optimizers[result_row["label"]]
        own = own_refs.get(optimizer)
        tests, by_seed, own_by_seed = {}, {}, {}
        for key in result_row["keys"]:
            record = records.get(key)
            if record is None:
                continue
            seed, test = int(record["config"]["seed"]), record["test"]
            scores = [delta_m(test, r, directions) for r in (refs, own) if r is not None]
            if not all(math.isfinite(x) for x in scores):
                left_out.append(f"{label} seed {seed}")
                continue
            tests[seed], by_seed[seed] = test, scores[0]
            if own is not None:
                own_by_seed[seed] = scores[1]
        per_seed[label] = tests
        if not tests:
            continue
        by_seed = dict(sorted(by_seed.items()))
        row = MethodStats(label, mean_interval(list(by_seed.values()), level), by_seed)
        row.optimizer = optimizer
        if own is not None:
            row.own_by_seed = dict(sorted(own_by_seed.items()))
            row.own = mean_interval(list(row.own_by_seed.values()), level)
        rows.append(row)
    rank_seeds = _ranks(rows, per_seed, directions, level)
    pending = dict(result.get("pending") or {})
    base, waiting = None, None
    if baseline is not None:
        label = baseline_label([r.label for r in rows], baseline)
        if label is not None:
            base = next(r for r in rows if r.label == label)
        else:
            waiting = baseline_label(list(pending), baseline)  # a study in progress: not yet
            if waiting is None:
                known = ", ".join(r.label for r in rows)
                raise ConfigError(f"no row matches --baseline {baseline!r}; rows: {known}")
    if base is not None:
        for row in rows:
            if row is not base:
                row.versus = difference_interval(row.by_seed, base.by_seed, level)
                row.verdict = verdict(row.versus)
        _same_optimizer_baselines(rows, base, level)
    out = Comparison(result.get("problem", ""), base.label if base else None, level, rows)
    out.pending = pending
    out.baseline_pending = waiting
    out.in_flight = list(result.get("in_flight") or [])
    out.cost = dict(result.get("cost") or {})
    out.failed = dict(result.get("failed") or {})
    out.reference_failed_runs = dict(result.get("reference_failed_runs") or {})
    all_seeds = sorted({s for row in rows for s in row.by_seed})
    out.rank_seeds = rank_seeds if rank_seeds != all_seeds else []
    out.no_common_seed = len(rows) > 1 and not rank_seeds
    out.left_out = left_out
    out.cosine = _cosine(result, records, base)
    if published is not None:
        sweep_optimizer = optimizer_label(result.get("config", {}).get("base", {}))
        _attach_published(out, published, sweep_optimizer)
    return out


def _ranks(
    rows: list[MethodStats],
    per_seed: Mapping[str, Mapping[int, Any]],
    directions: Mapping[str, Mapping[str, bool]],
    level: float,
) -> list[int]:
    """Mean rank of the metrics averaged over seeds (the spec's MR, and the study table's when
    every row ran the same seeds; that table ranks each row's mean over all its seeds), and
    beside it the mean rank of each seed, its mean and spread. Ranks compare rows on the same
    seeds: the seeds every row ran (all of them in a finished study). When no seed is common to
    all rows there is no mean rank (each seed would rank a different set of rows, and a rank
    among two is not a rank among ten). Returns the seeds used."""
    present = [set(tests) for tests in per_seed.values() if tests]
    seeds = sorted(set.intersection(*present)) if len(present) > 1 else []
    ranks: dict[str, list[float]] = {row.label: [] for row in rows}
    for seed in seeds:
        tables = {label: tests[seed] for label, tests in per_seed.items() if seed in tests}
        for label, value in mean_rank(tables, directions).items():
            ranks[label].append(value)
    if seeds:
        means = {
            label: mean_table([tests[seed] for seed in seeds])
            for label, tests in per_seed.items()
            if tests
        }
        of_means = mean_rank(means, directions)
    for row in rows:
        if ranks[row.label]:
            row.mean_rank = mean_interval(ranks[row.label], level)
            row.rank_of_means = of_means[row.label]
    return seeds


def _same_optimizer_baselines(rows: list[MethodStats], base: MethodStats, level: float) -> None:
    """For rows on another base optimizer: the difference to the baseline method run on that
    optimizer, both against that optimizer's references (does the optimizer help the balancing,
    or only the optimization?). The baseline method on that optimizer is the row with the
    baseline's method part (name and hyperparameters) and that optimizer."""
    method = _method_part(base.label)
    for row in rows:
        if not row.own_by_seed or method is None:
            continue
        peers = [
            r
            for r in rows
            if r.optimizer == row.optimizer and r.own_by_seed and _method_part(r.label) == method
        ]
        if peers and peers[0] is not row:
            row.versus_same = difference_interval(row.own_by_seed, peers[0].own_by_seed, level)
            row.verdict_same = verdict(row.versus_same)


def _method_part(label: str) -> str | None:
    """A row label's method with every hyperparameter (its defaults filled in, so ``unitary``
    and ``unitary:reduction=sum`` are one method) and without its optimizer suffix; ``None`` for
    a fixed-weights row or a label that is not a spec."""
    if label.startswith("fixed"):
        return None
    try:
        spec = parse_spec(label, build=False)
    except ValueError:
        return None
    try:
        signature = method_class(spec.name).hyperparameters()
    except ValueError:  # not a registered name: its label is all there is
        signature = {}
    defaults = {k: v for k, v in signature.items() if v is not inspect.Parameter.empty}
    return format_spec(spec.name, {**defaults, **spec.hparams})


def _fixed_source(label: str) -> str | None:
    """The method name a ``fixed from SPEC`` row's weights were extracted from."""
    spec = label.removeprefix("fixed from ")
    if spec == label:
        return None
    try:
        return parse_spec(spec, build=False).name
    except ValueError:
        return None


def baseline_label(labels: list[str], baseline: str | None) -> str | None:
    """The row label ``baseline`` names: the label itself, or a method name whose row carries
    fixed options (``unitary`` for ``unitary:reduction=mean``); ``None`` when no row matches.
    Among several matches, a row on the sweep's own base optimizer (no ``@`` suffix) is meant;
    when that still leaves more than one, the name is ambiguous (a ``ConfigError`` lists them)."""
    if baseline is None or baseline in labels:
        return baseline
    matches = [label for label in labels if published_key(label, [baseline]) == baseline]
    if len(matches) > 1:
        own = [m for m in matches if not parse_spec(m, build=False).optimizer]
        matches = own or matches
    if len(matches) > 1:
        raise ConfigError(
            f"--baseline {baseline!r} matches {len(matches)} rows ({', '.join(matches)}): "
            "give the row's label"
        )
    return matches[0] if matches else None


def _cosine(
    result: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]], base: MethodStats | None
) -> dict[str, float]:
    """The cosine diagnostic's level: its mean over all epochs and over the last quarter, over
    the baseline's runs (the rows that logged it)."""
    if base is None:
        return {}
    row = next(r for r in result["rows"] if r["label"] == base.label)
    curves = [
        [e["cosine"] for e in records[k]["history"] if "cosine" in e]
        for k in row["keys"]
        if k in records
    ]
    curves = [c for c in curves if c]
    if not curves:
        return {}
    length = min(len(c) for c in curves)
    tail = max(1, length // 4)
    return {
        "all epochs": statistics.fmean(v for c in curves for v in c[:length]),
        "last quarter": statistics.fmean(v for c in curves for v in c[length - tail : length]),
    }


def _attach_published(out: Comparison, published: Mapping[str, Any], sweep_optimizer: str) -> None:
    """The published Δm beside the rows they are for, and the rank correlation over those rows.
    A published number goes beside one row only: the first row in the sweep's order that matches
    its key, on the sweep's base optimizer; a ``fixed`` number only beside the fixed weights
    extracted from the paper's source method when the file names it (``fixed_from``)."""
    table = published["problems"].get(out.problem)
    out.published_title = str(published.get("title", "published"))
    if table is None:
        return
    numbers = table.get("delta_m", {})
    keys = list(numbers)
    source = table.get("fixed_from")
    ours, theirs = {}, {}
    taken: set[str] = set()
    for row in out.rows:
        if row.optimizer != sweep_optimizer:
            # a row on another base optimizer than the sweep's: the published number is for the
            # sweep's optimizer, so it is neither shown beside this row nor ranked against it
            continue
        key = published_key(row.label, keys)
        if key == "fixed" and source is not None and _fixed_source(row.label) != source:
            continue  # fixed weights extracted from another method than the paper's
        if key is None or key in taken:
            continue  # one row per published number, or the correlation counts it twice
        taken.add(key)
        row.published = float(numbers[key])
        ours[row.label], theirs[row.label] = row.delta_m.mean, row.published
    out.correlation = rank_correlation(ours, theirs)
    if out.baseline is not None:
        cos = table.get("cosine", {})
        key = published_key(out.baseline, list(cos))
        out.published_cosine = None if key is None else float(cos[key])


def _difference(v: Difference) -> str:
    """A difference cell: the value, its interval, and how it was taken: paired over how many
    shared seeds, or unpaired (Welch)."""
    how = f"paired, {v.n} seeds" if v.kind == "paired" else "Welch"
    if math.isnan(v.lo):
        return f"{v.mean:+.2f} (unpaired, no interval)"
    return f"{v.mean:+.2f} {_ci(v)} {how}"


def markdown(comparison: Comparison) -> str:
    """The statistics table, with a note on how every column was computed."""
    pct = f"{round(100 * comparison.level, 6):g} %"
    base = comparison.baseline
    header = ["method", "seeds", "Δm % (mean ± sd)", f"Δm {pct} CI"]
    if base is not None:
        header += [f"− {base} ({pct} CI)", "verdict"]
    header += ["MR", "MR per seed (mean ± sd)"]
    others = any(r.own is not None for r in comparison.rows)
    if others:
        header += ["optimizer", "Δm vs own-optimizer refs", "− baseline on that optimizer"]
    if comparison.published_title:
        header += [f"Δm, {comparison.published_title}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(comparison.rows, key=lambda r: -r.delta_m.mean):
        d = row.delta_m
        cells = [row.label, str(d.n), mean_sd(d.mean, d.std, d.n, sign="+"), _ci(d)]
        if base is not None:
            if row.versus is None:
                cells += ["(baseline)", ""]
            else:
                cells += [_difference(row.versus), row.verdict]
        mr = row.mean_rank
        cells.append("—" if row.rank_of_means is None else f"{row.rank_of_means:.2f}")
        cells.append("—" if mr is None else mean_sd(mr.mean, mr.std, mr.n))
        if others:
            cells.append(row.optimizer)
            cells.append("—" if row.own is None else f"{row.own.mean:+.2f} {_ci(row.own)}")
            same = row.versus_same
            cells.append("—" if same is None else f"{_difference(same)} {row.verdict_same}")
        if comparison.published_title:
            cells.append("—" if row.published is None else f"{row.published:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    differences = (
        f" Differences to {base}: paired by seed on the seeds both rows ran when there are two "
        "or more, else Welch; verdict: better / worse when the whole interval is above / below "
        "0, else not distinguishable (each row at that level on its own, not corrected for the "
        "number of rows: among many rows that differ from the baseline by nothing, some 1 in 20 "
        "would still get a verdict at 95 %)."
        if base is not None
        else ""
    )
    if comparison.baseline_pending is not None:
        differences = (
            f" No differences yet: the baseline, {comparison.baseline_pending}, is not stored."
        )
    notes = [
        "",
        f"Δm: Gama & Grassi's Δm against this study's single-task references (%, higher is "
        f"better); {pct} t intervals over seeds.{differences} MR: mean rank among the rows of "
        "their metrics averaged over the seeds (the study table's, when the rows ran the same "
        "seeds); MR per seed: the mean rank "
        "on each seed, mean ± sd over seeds (lower is better for both; the two can order rows "
        "differently when a row's seeds disagree).",
    ]
    if any(r.own is not None for r in comparison.rows):
        notes.append(
            "Rows on another base optimizer than the sweep's: Δm also against single-task "
            "references trained with that optimizer, and the difference to the baseline method "
            "run with it (paired on shared seeds, as above), so that a better optimizer is not "
            "counted as better balancing."
        )
    if comparison.published_title:
        rho, n = comparison.correlation
        shown = "n/a" if math.isnan(rho) else f"{rho:+.2f}"
        notes.append(
            f"Against {comparison.published_title}: Spearman rank correlation of the Δm "
            f"orderings {shown} over the {n} methods in both (their Δm is against their own "
            "references and budget: compare orderings, not values)."
        )
    if comparison.cosine:
        ours = ", ".join(f"{k} {v:.2f}" for k, v in comparison.cosine.items())
        paper = (
            ""
            if comparison.published_cosine is None
            else f"; {comparison.published_title}: about {comparison.published_cosine:.2f}"
        )
        notes.append(f"Gradient-cosine diagnostic under {base}: {ours}{paper}.")
    if comparison.no_common_seed:
        notes.append(
            "No MR: no seed is common to all rows, and a rank compares rows on the same seed."
        )
    if comparison.failed:
        why = "; ".join(f"{k} ({v})" for k, v in comparison.failed.items())
        notes.append(f"Not shown, no configuration of theirs trained: {why}.")
    if comparison.reference_failed_runs:
        which = ", ".join(f"{k} ({n})" for k, n in comparison.reference_failed_runs.items())
        notes.append(
            f"Single-task references with failed runs, left out of their mean: {which}; "
            "every Δm is measured against the mean of the runs that trained."
        )
    if comparison.left_out:
        notes.append(
            f"Left out (Δm not finite: a metric diverged): {', '.join(comparison.left_out)}; "
            "the seeds column counts the runs shown."
        )
    if comparison.rank_seeds:
        shown = ", ".join(str(s) for s in comparison.rank_seeds)
        why = (
            "the rows' seeds differ (a run left out above, or rows that ran different seeds)"
            if comparison.left_out
            else "the rows ran different seeds"
        )
        notes.append(
            f"MR over seed(s) {shown} only: {why}, and ranks compare rows "
            "on the same seeds (so MR here is not the study table's, which ranks each row's mean "
            "over all its seeds)."
        )
    if comparison.pending:
        waiting = "; ".join(f"{k} (waits for {v})" for k, v in comparison.pending.items())
        notes.append(
            f"A study in progress: the rows are the runs stored so far (seeds column); not "
            f"shown yet: {waiting}."
        )
    if comparison.in_flight:
        notes.append(
            f"Runs in flight (from their epoch checkpoints): {'; '.join(comparison.in_flight)}."
        )
    if cost := format_cost(comparison.cost):
        notes.append(f"Cost: {cost}.")
    return "\n".join(lines + notes) + "\n"


def _ci(i: Interval) -> str:
    if math.isnan(i.lo):
        return "—"
    return f"[{i.lo:+.2f}, {i.hi:+.2f}]"
