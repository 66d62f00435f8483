"""Representation-level steps: rows from one backward pass into per-head copies of ``z`` (heads
read ``z`` through ``task_input``) equal the K-call rows (heads read ``z`` itself)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtopt import Losses, MultiTaskOptimizer
from mtopt.core.capabilities import RepresentationTransform

K = 3


def _train(
    method: str, mode: str, steps: int = 3, extra: bool = False, **hparams
) -> tuple[torch.Tensor, list]:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(K)]).double()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randn(10, K, dtype=torch.float64)
    params = list(enc.parameters()) + list(heads.parameters())
    mto = MultiTaskOptimizer(
        torch.optim.SGD(params, lr=0.1), method, shared=enc, tasks=["a", "b", "c"], **hparams
    )

    def closure():
        z = enc(x)
        losses = {}
        for k, name in enumerate(["a", "b", "c"]):
            if mode == "direct":  # the method's own transform, bypassing the optimizer's copies
                method = mto.method
                inp = method.task_input(z, k) if isinstance(method, RepresentationTransform) else z
            elif mode == "by_name":
                inp = mto.task_input(z, name)
            else:  # "by_index"
                inp = mto.task_input(z, k)
            out = heads[k](inp).squeeze(1)
            loss = ((out - y[:, k]) ** 2).mean()
            if extra and name == "b":  # task b also reads z directly, besides its head's input
                loss = loss + 0.1 * z.pow(2).mean()
            losses[name] = loss
        return Losses(losses, features=z)

    infos = [mto.step(closure) for _ in range(steps)]
    return torch.cat([p.detach().reshape(-1) for p in params]), infos


@pytest.mark.parametrize(
    "method", ["mgda_ub", "graddrop", "imtl", "aligned_mtl:level=rep", "rotograd"]
)
@pytest.mark.parametrize("mode", ["by_name", "by_index", "mixed"])
def test_split_heads_match_the_direct_rows(method, mode):
    extra = mode == "mixed"  # K-call fallback: one loss also reads z directly
    name, _, spec = method.partition(":")
    hparams = dict(kv.split("=") for kv in spec.split(",")) if spec else {}
    if name == "graddrop":
        hparams["seed"] = 0
    reference, _ = _train(name, "direct", extra=extra, **hparams)
    got, infos = _train(name, "by_name" if extra else mode, extra=extra, **hparams)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)
    assert infos[-1].gradient_engine == "representation"


def test_task_input_is_the_features_outside_a_step():
    enc = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    mto = MultiTaskOptimizer(
        torch.optim.SGD(list(enc.parameters()) + list(heads.parameters()), lr=0.1),
        "mgda_ub",
        shared=enc,
    )
    z = enc(torch.randn(2, 3))
    assert mto.task_input(z, 0) is z
    mto.step(lambda: Losses([h(mto.task_input(z, k)).pow(2).sum() for k, h in enumerate(heads)], z))
    assert mto.task_input(z, 1) is z


def test_a_failing_closure_leaves_task_input_alone():
    enc = nn.Linear(3, 4)
    mto = MultiTaskOptimizer(torch.optim.SGD(enc.parameters(), lr=0.1), "mgda_ub", shared=enc)

    def closure():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        mto.step(closure)
    z = enc(torch.randn(2, 3))
    assert mto.task_input(z, 0) is z


def test_copy_of_the_model_is_independent():
    """Sanity: the helper builds the same model each time (so the comparisons above are fair)."""
    a, _ = _train("mgda_ub", "direct", steps=1)
    b, _ = _train("mgda_ub", "direct", steps=1)
    assert torch.equal(a, b)
    assert copy.deepcopy(a).equal(a)
