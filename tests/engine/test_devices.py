"""The engine on every device this machine has: CPU always, CUDA when available (skipped
otherwise); `make gpu-check` runs these on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from _unbatchable import unbatchable
from mtopt import Losses, MultiTaskOptimizer

TASKS = ("a", "b", "c")
METHODS = [("unitary", {}), ("mgda", {}), ("upgrad", {"engine": "gramian"}), ("mgda_ub", {}),
           ("cagrad", {}), ("nash_mtl", {}), ("famo", {}), ("pcgrad", {"seed": 1}),
           ("upgrad", {"engine": "batched"})]  # fmt: skip
IDS = [f"{n}#{h['engine']}" if "engine" in h else n for n, h in METHODS]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request):
    return torch.device(request.param)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(16, 1) for t in TASKS})


def run(name, hps, device, dtype=torch.float32, steps=3, autocast=None, scaler=None, group=None):
    torch.manual_seed(0)
    model = Net().to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mto = MultiTaskOptimizer(opt, name, shared=model.encoder, grad_scaler=scaler,
                             process_group=group, **hps)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x = torch.randn(steps, 32, 5, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(steps, 32, len(TASKS), generator=g).to(device=device, dtype=dtype)
    infos = []
    for s in range(steps):

        def closure(s=s):
            enabled = autocast is not None
            with torch.autocast(device.type, dtype=autocast, enabled=enabled):
                z = model.encoder(x[s])
                out = {
                    t: (
                        (model.heads[t](mto.task_input(z, t)).squeeze(1).float() - y[s, :, i]) ** 2
                    ).mean()
                    for i, t in enumerate(TASKS)
                }
            return Losses(out, features=z)

        infos.append(mto.step(closure))
    return [p.detach().cpu().double() for p in model.parameters()], infos


@pytest.mark.parametrize(("name", "hps"), METHODS, ids=IDS)
def test_a_step_on_the_device_matches_float64_on_the_cpu(name, hps, device):
    reference, _ = run(name, hps, torch.device("cpu"), torch.float64)
    got, infos = run(name, hps, device)
    by_auto = "batched" if device.type == "cuda" else "jacobian"  # engine="auto": batched_pass
    expected = hps.get("engine", by_auto)
    assert infos[-1].gradient_engine in (None, expected, "representation")
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(("name", "hps"), METHODS, ids=IDS)
def test_float16_autocast_with_a_grad_scaler(name, hps, device):
    # 2^10 leaves float16 (largest 65504) room for these gradients (|g| ≤ 1 here) times the
    # methods' weights (≤ 3). At torch's default 2^16 a step whose weights exceed 1 overflows
    # a head's float16 bias gradient (Nash-MTL's first step here), and the scaler skips it and
    # halves the scale, as it should (tests/engine/test_mixed_precision.py): the runs then no
    # longer follow the same trajectory as float64.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    reference, _ = run(name, hps, torch.device("cpu"), torch.float64)
    got, infos = run(name, hps, device, autocast=torch.float16, scaler=scaler)
    assert not any(i.skipped for i in infos)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=5e-3)  # float16 matmuls


@pytest.mark.parametrize(("name", "hps"), METHODS, ids=IDS)
def test_bfloat16_autocast(name, hps, device):
    # bfloat16 keeps 8 bits of mantissa (unit roundoff 2^-8 ≈ 0.004): the 3 steps move a weight
    # by at most lr · (1 + 1.9 + 2.71) · |g| · w ≈ 0.05 · 5.6 · 1 · 3 ≈ 0.84 with |g| ≤ 1 and the
    # methods' weights w ≤ 3, so the rounding moves it by ≈ 0.84 · 2^-8 ≈ 3.3e-3 at most.
    reference, _ = run(name, hps, torch.device("cpu"), torch.float64)
    got, infos = run(name, hps, device, autocast=torch.bfloat16)
    assert all(v == v for i in infos for v in i.losses.values())  # no NaN
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=5e-3)


@CUDA
def test_an_unbatchable_backward_falls_back_to_k_passes_on_cuda(caplog):
    # engine="auto" takes the batched pass on one CUDA device; a backward that reads a value on
    # the host has no batching rule, so the step falls back to K passes once, with a warning
    # (tests/core/test_gramian.py covers the same on the CPU by a monkeypatched batched_pass)
    cuda = torch.device("cuda")
    steps = {}
    for device in (torch.device("cpu"), cuda):
        enc, heads, closure = unbatchable(3, device)
        opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
        mto = MultiTaskOptimizer(opt, "mgda", shared=enc)
        with caplog.at_level(logging.WARNING, logger="mtopt"):
            infos = [mto.step(closure) for _ in range(2)]
        steps[device.type] = [p.detach().cpu() for p in enc.parameters()], infos
    assert [i.gradient_engine for i in steps["cuda"][1]] == ["jacobian", "jacobian"]
    assert caplog.text.count("batched Jacobian pass failed") == 1
    for a, b in zip(steps["cuda"][0], steps["cpu"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@CUDA
def test_nccl_group_of_one_process(tmp_path):
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        cuda = torch.device("cuda")
        for name, hps in METHODS:
            if hps.get("engine") == "gramian":  # refused in a process group
                continue
            alone, _ = run(name, hps, cuda)
            grouped, infos = run(name, hps, cuda, group=dist.group.WORLD)
            assert all(i.communicated_bytes > 0 for i in infos)
            for a, b in zip(grouped, alone, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()
