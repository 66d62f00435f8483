"""Selective task group updates: affinity tracking, grouping, sequential updates per batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from mtopt.methods.selective_groups import group_tasks, update_affinity

F64 = torch.float64


class Net:
    """A linear encoder and K linear heads regressing targets; float64, no randomness."""

    def __init__(self, k: int = 2, seed: int = 0, targets=None) -> None:
        torch.manual_seed(seed)
        self.encoder = torch.nn.Linear(4, 3).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(3, 1).double() for _ in range(k)])
        self.x = torch.randn(12, 4, dtype=F64)
        self.ys = (
            targets if targets is not None else [torch.randn(12, 1, dtype=F64) for _ in range(k)]
        )

    def parameters(self):
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def losses(self) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.encoder(self.x))
        return {
            f"t{i}": torch.nn.functional.mse_loss(h(z), y)
            for i, (h, y) in enumerate(zip(self.heads, self.ys, strict=True))
        }


def mto_for(net: Net, optimizer=torch.optim.SGD, lr: float = 0.1, **hp):
    opt = optimizer(net.parameters(), lr=lr)
    return mtopt.MultiTaskOptimizer(opt, "selective_groups", shared=net.encoder.parameters(), **hp)


# -- affinity and grouping ------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 0.5), st.floats(0.1, 3.0), st.floats(0.1, 3.0))
def test_ema_of_a_constant_signal_converges_to_it(decay, before, after):
    affinity = np.zeros((3, 3))
    for _ in range(int(40 / decay)):
        update_affinity(affinity, [1], np.full(3, before), np.full(3, after), decay)
    signal = 1 - after / before
    assert affinity[1, 0] == pytest.approx(signal, abs=1e-6)
    assert affinity[1, 2] == pytest.approx(signal, abs=1e-6)
    assert affinity[1, 1] == pytest.approx(max(signal, 0.0), abs=1e-6)  # self: only gains count
    assert np.all(affinity[[0, 2]] == 0)  # only the group's rows move


def test_affinity_rules_inside_a_group():
    """Within a group of two (both scaled by 1/|G|): same-sign changes are kept, opposite signs
    give -max(a_t, a_s); a target with no previous loss is skipped."""
    affinity = np.zeros((3, 3))
    before = np.array([1.0, 1.0, 0.0])
    after = np.array([0.6, 1.2, 5.0])  # a = (0.4, -0.2) / 2
    update_affinity(affinity, [0, 1], before, after, decay=1.0)
    assert affinity[0, 0] == pytest.approx(0.2)
    assert affinity[0, 1] == pytest.approx(-0.2)  # -max(-0.1, 0.2)
    assert affinity[1, 0] == pytest.approx(-0.2)  # -max(0.2, -0.1)
    assert affinity[1, 1] == 0.0  # its own loss rose: not recorded
    assert affinity[0, 2] == affinity[1, 2] == 0.0  # previous loss 0: skipped


def test_block_structured_affinity_gives_the_blocks():
    block = np.array([0, 0, 1, 1, 1, 2])
    affinity = np.where(block[:, None] == block[None, :], 0.5, -0.3)
    affinity += 0.01 * np.random.default_rng(0).normal(size=affinity.shape)
    groups, how = group_tasks(
        affinity, preference=None, damping=0.5, max_iter=200, convergence_iter=50, max_retries=3
    )
    assert how == "affinity_propagation"
    assert sorted(groups) == [[0, 1], [2, 3, 4], [5]]


def test_grouping_waits_for_positive_self_affinity():
    affinity = np.array([[0.2, 0.1], [0.1, 0.0]])
    groups, how = group_tasks(
        affinity, preference=None, damping=0.5, max_iter=200, convergence_iter=50, max_retries=3
    )
    assert groups is None
    assert how == "kept_previous:non_positive_self_affinity"


# -- through the engine ----------------------------------------------------------------------------
def test_one_group_with_every_task_is_two_plain_steps():
    net = Net(k=3)
    twin = copy.deepcopy(net)
    mto = mto_for(net, warmup_steps=0)
    mto.method.affinity = np.ones((3, 3))  # every task helps every other: one group
    info = mto.step(net.losses)
    assert info.sequential.groups == [["t0", "t1", "t2"], ["t0", "t1", "t2"]]
    assert info.weights.tolist() == [2.0, 2.0, 2.0]
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sum(twin.losses().values()).backward()
        opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def conflicting_net() -> Net:
    """Two tasks pulling the shared encoder in opposite directions."""
    net = Net(k=2, seed=1)
    y = torch.randn(12, 1, dtype=F64)
    net.ys = [y, -y]
    with torch.no_grad():
        net.heads[1].weight.copy_(net.heads[0].weight)
        net.heads[1].bias.copy_(net.heads[0].bias)
    return net


@pytest.mark.parametrize("attribution", ["definition", "released_code"])
def test_a_step_that_hurts_a_task_gives_negative_affinity(attribution):
    net = conflicting_net()
    mto = mto_for(net, lr=0.05, affinity_decay=1.0, seed=0, attribution=attribution)
    probe = copy.deepcopy(net)
    info = mto.step(net.losses)
    first, second = (int(g[0][1]) for g in info.sequential.groups)
    affinity = np.array(info.sequential.affinity)
    # replay the first group's step on a copy to know what it did to both losses
    opt = torch.optim.SGD(probe.parameters(), lr=0.05)
    before = {k: v.item() for k, v in probe.losses().items()}
    opt.zero_grad()
    probe.losses()[f"t{first}"].backward()
    opt.step()
    after = {k: v.item() for k, v in probe.losses().items()}
    assert after[f"t{first}"] < before[f"t{first}"]
    assert after[f"t{second}"] > before[f"t{second}"]
    expected = 1 - after[f"t{second}"] / before[f"t{second}"]
    if attribution == "definition":  # credited to the group that stepped
        assert affinity[first, second] == pytest.approx(expected)
        assert expected < 0
        assert affinity[first, first] > 0
        assert affinity[second, first] < 0
        assert affinity[second, second] > 0
    else:  # the released loop credits the first step's effect to the second group
        assert affinity[second, first] == pytest.approx(
            1 - after[f"t{first}"] / before[f"t{first}"]
        )
        assert affinity[second, second] == 0.0  # its own loss rose: not recorded
        assert np.all(affinity[first] == 0.0)


def test_inactive_heads_are_skipped_or_moved_by_momentum():
    counts, orders = {}, {}
    for mode in ("skip", "momentum"):
        net = Net(k=3)
        mto = mto_for(net, optimizer=torch.optim.Adam, lr=1e-2, inactive_heads=mode, seed=0)
        orders[mode] = [int(g[0][1]) for g in mto.step(net.losses).sequential.groups]
        mto.step(net.losses)
        counts[mode] = [int(mto.optimizer.state[h.weight]["step"]) for h in net.heads]
    assert counts["skip"] == [2, 2, 2]  # each singleton group once per batch
    # "momentum", as the released code under torch 1.13: a head gets zero gradients (Adam steps
    # it) only once it has been updated, so in the first batch the head of the j-th group
    # visited takes 3 - j steps; in the second batch every sub-step touches every head
    assert counts["momentum"] == [3 - orders["momentum"].index(t) + 3 for t in range(3)]
    assert sorted(counts["momentum"]) == [4, 5, 6]


def test_warmup_then_groups_from_affinity_and_state_round_trip():
    net = Net(k=3, seed=2)
    mto = mto_for(net, warmup_steps=3, affinity_decay=0.2, seed=5)
    hows = [mto.step(net.losses).extras["grouping"] for _ in range(6)]
    assert hows[:3] == ["warmup"] * 3
    assert all(h != "warmup" for h in hows[3:])
    twin = copy.deepcopy(net)
    twin_mto = mto_for(twin, warmup_steps=3, affinity_decay=0.2, seed=5)
    twin_mto.load_state_dict(copy.deepcopy(mto.state_dict()))
    for _ in range(3):
        a, b = mto.step(net.losses), twin_mto.step(twin.losses)
        assert a.extras == b.extras
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_negative_losses_and_bad_options_are_refused():
    net = Net(k=2)
    mto = mto_for(net)
    with pytest.raises(ValueError, match="selective_groups: the affinity needs loss"):
        mto.step(lambda: {k: v - 10 for k, v in net.losses().items()})
    with pytest.raises(ValueError, match="attribution"):
        mtopt.make("selective_groups", attribution="poster")
    with pytest.raises(ValueError, match="affinity_decay"):
        mtopt.make("selective_groups", affinity_decay=0.0)
