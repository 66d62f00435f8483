"""Regression tests for bugs found in review: fused optimizers and RotoGrad's rotation cache,
diverging sweep runs, the cosine diagnostic and BatchNorm, Muon with dense heads and with
RotoGrad, stacked losses under selective groups, multi-task run keys."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import mtopt
from mtopt.experiments.train import RunConfig, build_optimizer, run_key, train_run
from mtopt.problems.base import Metric, MultiTaskModel, Problem, Split, TaskSpec


class Toy(Problem):
    """Two regression tasks on random features; optional BatchNorm in the encoder."""

    name = "toy"

    def __init__(self, bn: bool = False) -> None:
        self.bn = bn

        def loss(k):
            return lambda pred, b: ((pred.squeeze(-1) - b["y"][:, k]) ** 2).mean()

        def metric(k):
            return Metric(
                "mse", True, lambda pred, b: ((pred.squeeze(-1) - b["y"][:, k]) ** 2).sum()
            )

        self.tasks = tuple(TaskSpec(f"t{k}", loss(k), (metric(k),), "regression") for k in range(2))

    def splits(self):
        g = torch.Generator().manual_seed(0)

        def make(n):
            x = torch.randn(n, 6, generator=g)
            y = torch.stack([2 * x[:, 0] + x[:, 1] ** 2, x[:, 2] - x[:, 3]], 1)
            return Split({"x": x, "y": y}, lambda b: b)

        return {"train": make(256), "val": make(128), "test": make(128)}

    def make_model(self, tasks, dropout=0.0):
        layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if self.bn else []) + [nn.ReLU()]
        return MultiTaskModel(nn.Sequential(*layers), {t: nn.Linear(16, 1) for t in tasks})


REFS = {
    "val": {"t0": {"mse": 1.0}, "t1": {"mse": 1.0}},
    "test": {"t0": {"mse": 1.0}, "t1": {"mse": 1.0}},
}


def test_cosine_diagnostic_leaves_batchnorm_statistics_alone():
    runs = [
        train_run(
            RunConfig("toy", epochs=2, batch_size=32, cosine_every=every), REFS, problem=Toy(True)
        )
        for every in (None, 1)
    ]
    assert runs[0]["val"] == runs[1]["val"]
    assert runs[0]["test"] == runs[1]["test"]
    assert "cosine" in runs[1]["history"][0]
    assert "cosine" not in runs[0]["history"][0]


def test_rotograd_rotations_follow_a_fused_optimizer():
    torch.manual_seed(0)
    enc, heads = nn.Linear(5, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    opt = torch.optim.Adam([*enc.parameters(), *heads.parameters()], lr=1e-2, fused=True)
    mto = mtopt.MultiTaskOptimizer(opt, "rotograd", shared=enc.parameters(), rotation_lr_scale=5.0)
    x, ys = torch.randn(16, 5), [torch.randn(16, 1) for _ in range(2)]

    def closure():
        z = enc(x)
        return mtopt.Losses(
            [((heads[k](mto.task_input(z, k)) - ys[k]) ** 2).mean() for k in range(2)], features=z
        )

    for _ in range(10):
        mto.step(closure)
    from mtopt.methods.rotograd import rotation_matrices

    true = rotation_matrices(mto.method.generator.detach())
    assert (true - torch.eye(4)).abs().max() > 1e-3
    torch.testing.assert_close(mto.method.rotations(), true)


def test_muon_with_dense_heads_and_with_rotograd():
    from mtopt.optim import Muon
    from mtopt.problems.dense_models import dense_model

    model = dense_model(
        {"S": (7, "log_softmax"), "D": (1, "none")}, (32, 64), width=8, head_channels=16
    )
    opt = build_optimizer(RunConfig("cityscapes/sd7", optimizer="muon", lr=1e-3), model)
    adamw = {id(p) for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    for head in model.heads.values():
        last = [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]
        assert id(last.weight) in adamw  # output layers stay on AdamW

    torch.manual_seed(0)
    enc, heads = nn.Linear(5, 8), nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])
    muon = Muon(
        [
            {"params": [enc.weight], "use_muon": True},
            {"params": [enc.bias, *heads.parameters()], "use_muon": False},
        ],
        lr=0.02,
        adamw_lr=1e-3,
    )
    mto = mtopt.MultiTaskOptimizer(muon, "rotograd", shared=enc.parameters())
    x, ys = torch.randn(16, 5), [torch.randn(16, 1) for _ in range(2)]

    def closure():
        z = enc(x)  # once: the heads must read the features the closure returns
        return mtopt.Losses([((heads[k](z) - ys[k]) ** 2).mean() for k in range(2)], features=z)

    mto.step(closure)
    group = muon.param_groups[-1]
    assert group["params"][0] is mto.method.generator
    assert group["use_muon"] is False
    assert group["lr"] == pytest.approx(0.1 * 1e-3)


def test_selective_groups_refuse_stacked_losses():
    enc, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1) for _ in range(2)])
    opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
    mto = mtopt.MultiTaskOptimizer(opt, "selective_groups", shared=enc.parameters())
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="one stacked tensor"):
        mto.step(lambda: torch.stack([heads[k](enc(x)).pow(2).mean() for k in range(2)]))


def test_multitask_run_keys_ignore_new_default_fields():
    config = RunConfig(problem="multi_mnist/cl_rr", method="cagrad", seed=2)
    old = {
        k: v
        for k, v in config.to_dict().items()
        if k
        not in ("optimizer", "apt", "muon_lr", "cosine_every", "engine", "lr_schedule", "device")
    }
    blob = json.dumps([old, REFS["val"]], sort_keys=True, default=str)
    assert run_key(config, REFS) == hashlib.sha256(blob.encode()).hexdigest()[:16]
