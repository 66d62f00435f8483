"""Data parallelism (mtopt.engine.distributed): two CPU processes in a ``gloo`` group, each given
half of every batch, end where one process stepping on the whole batch ends, for every
registered method, to float64 rounding."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtopt
from mtopt import Losses, MultiTaskOptimizer
from mtopt.core.capabilities import MetaBatchMethod
from mtopt.core.registry import method_class

TASKS = ("a", "b", "c")
STEPS = 4
BATCH = 12
#: what a method needs beyond its defaults; random ones get one seed on every rank
EXTRA: dict[str, dict[str, Any]] = {
    "fixed": {"weights": [0.2, 0.3, 0.5]},
    "graddrop": {"seed": 3},
    "pcgrad": {"seed": 3},
    "rlw": {"seed": 3},
    "selective_groups": {"seed": 3, "warmup_steps": 1},
}
#: every registered method, the representation-level variants of the two-level ones, and the
#: batched Jacobian pass
SPECS = [(name, {}) for name in mtopt.available_methods()] + [
    ("mgda", {"level": "rep"}),
    ("imtl_g", {"level": "rep"}),
    ("aligned_mtl", {"level": "rep"}),
    # the batched pass, started at the features z (the losses reach the encoder only through z)
    ("upgrad", {"engine": "batched"}),
    ("cagrad", {"engine": "batched"}),
]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 1) for t in TASKS})


def data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, len(TASKS), generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(STEPS, BATCH, len(TASKS), generator=g,
                                              dtype=torch.float64)  # fmt: skip
    scale = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)  # unequal loss scales
    return x, y * scale, x.flip(1), (y * scale).flip(1)


def train(name: str, hps: dict[str, Any], part: slice, group: Any) -> dict[str, torch.Tensor]:
    """``STEPS`` steps on the rows ``part`` of every batch; the final parameters."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kwargs = {**EXTRA.get(name, {}), **hps}
    mto = MultiTaskOptimizer(opt, name, shared=model.encoder, process_group=group, **kwargs)
    x, y, xm, ym = data()

    def losses(xb: torch.Tensor, yb: torch.Tensor) -> Losses:
        z = model.encoder(xb)
        out = {
            t: ((model.heads[t](mto.task_input(z, t)).squeeze(1) - yb[:, i]) ** 2).mean()
            for i, t in enumerate(TASKS)
        }
        return Losses(out, features=z)

    for s in range(STEPS):
        meta = None
        if isinstance(mto.method, MetaBatchMethod):
            meta = lambda s=s: losses(xm[s, part], ym[s, part])  # noqa: E731
        mto.step(lambda s=s: losses(x[s, part], y[s, part]), meta_closure=meta)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, group_ in enumerate(opt.param_groups[1:]):  # parameters a method added
        for j, p in enumerate(group_["params"]):
            params[f"added.{i}.{j}"] = p.detach().clone()
    return params


@contextmanager
def _rank_of_two(
    rank: int, world: int, store: str, timeout_s: float | None = None
) -> Iterator[None]:
    """The body runs as ``rank`` of a gloo group (a ``file://`` store); every rank tears the
    group down together, whatever the body raised.

    A crash prints every thread's Python stack (``faulthandler``): a child once died of SIGABRT
    in CI ("terminate called without an active exception", from C++ with no Python frame named)
    and the report could not say where. After a clean teardown the child leaves with
    ``os._exit(0)``, skipping the interpreter's finalisation, in which torch's C++ objects are
    destroyed in an order the test does not control; what the test checks is already on disk.
    """
    faulthandler.enable()
    torch.set_num_threads(1)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout
    )
    try:
        yield
    finally:
        dist.barrier()  # no rank tears the store down while another still uses it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    with _rank_of_two(rank, world, store):
        half = BATCH // world
        part = slice(rank * half, (rank + 1) * half)
        results: dict[str, Any] = {}
        for name, hps in SPECS:
            label = name + "".join(f":{k}={v}" for k, v in hps.items())
            results[label] = train(name, hps, part, dist.group.WORLD)
        if rank == 0:
            torch.save(results, out)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "params.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize(("name", "hps"), SPECS, ids=lambda v: v if isinstance(v, str) else "")
def test_two_ranks_equal_one_process(name, hps, distributed_results):
    label = name + "".join(f":{k}={v}" for k, v in hps.items())
    single = train(name, hps, slice(None), None)
    got = distributed_results[label]
    assert got.keys() == single.keys()
    torch.manual_seed(0)
    start = dict(Net().double().named_parameters())
    moved = max(float((single[n] - start[n]).detach().abs().max()) for n in start)
    assert moved > 1e-3, f"{label}: the parameters barely moved ({moved:.1e}); the test is void"
    for n in single:
        # float64 rounding, carried through STEPS steps of a well-conditioned problem
        torch.testing.assert_close(got[n], single[n], rtol=1e-9, atol=1e-11, msg=f"{label} {n}")


def test_every_registered_method_is_covered():
    assert {name for name, _ in SPECS} == set(mtopt.available_methods())
    for name in EXTRA:
        method_class(name)  # still registered


def test_outside_a_group_nothing_is_communicated():
    torch.manual_seed(0)
    model = Net().double()
    mto = MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda",
                             shared=model.encoder)  # fmt: skip
    assert mto.sync is None
    x, y, _, _ = data()
    info = mto.step(
        lambda: {
            t: ((model.heads[t](model.encoder(x[0])).squeeze(1) - y[0, :, i]) ** 2).mean()
            for i, t in enumerate(TASKS)
        }
    )
    assert info.communicated_bytes == 0


def test_process_group_is_validated():
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="process_group must be 'auto', None or a ProcessGroup"):
        MultiTaskOptimizer(opt, "unitary", process_group="world")


def _group_errors(rank: int, world: int, store: str, out: str) -> None:
    errors = []
    with _rank_of_two(rank, world, store):
        model = Net().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for name, kwargs in (
            ("mgda", {"engine": "gramian"}),
            ("rlw", {}),
            ("rlw", {"seed": rank}),
        ):
            try:
                MultiTaskOptimizer(opt, name, shared=model.encoder, **kwargs)
            except ValueError as exc:
                errors.append(str(exc))
        if rank == 0:
            Path(out).write_text("\n".join(errors))


def test_what_cannot_hold_in_a_group_is_refused_in_one_line(tmp_path):
    out = tmp_path / "errors.txt"
    mp.spawn(_group_errors, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert "engine='gramian' is not possible in a process group" in lines[0]
    assert "draws random numbers: in a process group give it a seed" in lines[1]
    assert "different seeds on the ranks: [0, 1]" in lines[2]


def _one_rank_non_finite(rank: int, world: int, store: str, out: str, micro: bool) -> None:
    with _rank_of_two(rank, world, store, timeout_s=30):
        torch.manual_seed(0)
        model = Net().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mto = MultiTaskOptimizer(opt, "mgda", shared=model.encoder)
        x, y, _, _ = data()

        def closure(lo: int = 0, hi: int = 6, broken: bool = True):
            z = model.encoder(x[0, rank * 6 + lo : rank * 6 + hi])
            out = {t: ((model.heads[t](z).squeeze(1) - y[0, lo:hi, i]) ** 2).mean()
                   for i, t in enumerate(TASKS)}  # fmt: skip
            if rank == 1 and broken:  # a finite loss (0) whose gradient is NaN, on this rank
                out["a"] = out["a"] + torch.sqrt(((z - z.detach()) ** 2).sum())
            return out

        try:
            if micro:  # accumulation: the second micro-batch of rank 1 only
                mto.step([lambda: closure(0, 3, False), lambda: closure(3, 6)])
            else:
                mto.step(closure)
            result = "stepped"
        except FloatingPointError as exc:
            result = "FloatingPointError: " + str(exc).split(":")[0]
        Path(f"{out}.{rank}").write_text(result)


@pytest.mark.parametrize("micro", [False, True], ids=["one batch", "micro-batches"])
def test_a_non_finite_gradient_on_one_rank_stops_every_rank(tmp_path, micro):
    """Reduced before it is checked: every rank raises, none waits in a collective (with
    gradient accumulation too: the mean Jacobian is checked after the ranks' mean)."""
    out = tmp_path / "result"
    mp.spawn(_one_rank_non_finite, args=(2, str(tmp_path / "store"), str(out), micro), nprocs=2,
             join=True)  # fmt: skip
    for rank in (0, 1):
        text = Path(f"{out}.{rank}").read_text()
        assert text.startswith("FloatingPointError: the gradient of task(s) ['a']"), text
