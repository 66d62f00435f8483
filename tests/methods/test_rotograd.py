"""RotoGrad: rotations, rotation loss, magnitude homogenisation, the engine contract
(``task_input``, the method's parameter group, state) and a cross-check with the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtopt
from mtopt.methods.rotograd import (
    magnitude_weights,
    rotate,
    rotation_loss,
    rotation_matrices,
    rotograd_target,
)

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Net:
    """A tanh encoder and K linear regression heads, float64."""

    def __init__(self, k: int = 3, d: int = 6, seed: int = 0, batch: int = 16) -> None:
        torch.manual_seed(seed)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, d), torch.nn.Tanh()).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(d, 1).double() for _ in range(k)])
        self.x = torch.randn(batch, 5, dtype=F64)
        self.ys = [torch.randn(batch, 1, dtype=F64) * (i + 1) for i in range(k)]

    def parameters(self):
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def losses(self, task_input=None) -> mtopt.Losses:
        z = self.encoder(self.x)
        out = {}
        for i, head in enumerate(self.heads):
            zi = z if task_input is None else task_input(z, f"t{i}")
            out[f"t{i}"] = torch.nn.functional.mse_loss(head(zi), self.ys[i])
        return mtopt.Losses(out, features=z)


def mto_for(net: Net, lr: float = 0.05, optimizer=torch.optim.SGD, **hp):
    opt = optimizer(net.parameters(), lr=lr)
    return mtopt.MultiTaskOptimizer(opt, "rotograd", shared=net.encoder.parameters(), **hp)


# -- the pieces ------------------------------------------------------------------------------------
@pytest.mark.parametrize("parametrization", ["expm", "cayley"])
@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4), m=st.integers(1, 7), seed=seeds)
def test_rotations_are_special_orthogonal(parametrization, k, m, seed):
    A = torch.randn(k, m, m, dtype=F64, generator=gen(seed)) * 3
    R = rotation_matrices(A, parametrization)
    eye = torch.eye(m, dtype=F64).expand(k, m, m)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(k, dtype=F64))
    zero = torch.zeros(k, m, m, dtype=F64)
    torch.testing.assert_close(rotation_matrices(zero, parametrization), eye)
    if parametrization == "cayley":  # (I - S)^{-1}(I + S) by its definition
        lower = torch.tril(A, -1)
        skew = lower - lower.transpose(1, 2)
        torch.testing.assert_close((eye - skew) @ R, eye + skew)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 3), seeds)
def test_rotate_turns_the_first_m_channels_only(m, extra, seed):
    g = gen(seed)
    z = torch.randn(4, m + extra, 3, dtype=F64, generator=g)  # (B, D, spatial)
    R = rotation_matrices(torch.randn(m, m, dtype=F64, generator=g))
    out = rotate(z, R)
    for b in range(4):
        for s in range(3):
            torch.testing.assert_close(out[b, :m, s], R @ z[b, :m, s])
    torch.testing.assert_close(out[:, m:], z[:, m:], rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), seeds)
def test_target_is_the_mean_unit_direction_scaled_to_the_mean_norm(k, seed):
    r = torch.randn(k, 3, 4, dtype=F64, generator=gen(seed))
    r = r * torch.rand(k, 1, 1, dtype=F64, generator=gen(seed + 1)).add(0.1)
    v = rotograd_target(r)
    unit = r / r.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(v, unit.mean(0) * r.mean(0).norm())
    same = r[:1].expand(k, 3, 4)  # identical gradients: the target is that gradient
    torch.testing.assert_close(rotograd_target(same), r[0])


def test_cayley_rotations_train_like_the_exponential_ones():
    """Both parametrisations start at I, keep R orthogonal and reduce the rotation loss."""
    results = {}
    for parametrization in ("expm", "cayley"):
        net = Net(k=3)
        mto = mto_for(net, optimizer=torch.optim.Adam, lr=1e-2, parametrization=parametrization)
        first = mto.step(lambda: net.losses(mto.task_input)).weights  # noqa: B023
        for _ in range(15):
            mto.step(lambda: net.losses(mto.task_input))  # noqa: B023
        R = mto.method.rotations()
        eye = torch.eye(6, dtype=F64).expand(3, 6, 6)
        torch.testing.assert_close(R.transpose(1, 2) @ R, eye, atol=1e-12, rtol=0)
        assert (R - eye).abs().max() > 1e-3
        results[parametrization] = first
    # the first step does not depend on the parametrisation (R = I, magnitudes only)
    torch.testing.assert_close(results["expm"], results["cayley"])
    with pytest.raises(ValueError, match="parametrization"):
        mtopt.make("rotograd", parametrization="qr")


def test_rotation_loss_gradient_matches_finite_differences():
    g = gen(3)
    target = torch.randn(5, 4, 2, dtype=F64, generator=g)
    rotated = torch.randn(3, 5, 4, 2, dtype=F64, generator=g)
    A = torch.randn(3, 3, 3, dtype=F64, generator=g, requires_grad=True)
    for parametrization in ("expm", "cayley"):
        assert torch.autograd.gradcheck(
            lambda a, p=parametrization: rotation_loss(rotation_matrices(a, p), target, rotated),
            (A,),
        )
    # zero when every rotated task gradient already equals the rotated target
    R = rotation_matrices(A.detach())
    aligned = torch.einsum("kij,bj...->kbi...", R, target[:, :3])
    assert rotation_loss(R, target, torch.cat([aligned, rotated[:, :, 3:]], 2)) < 1e-24


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), seeds)
def test_every_task_contributes_the_common_norm(k, seed):
    g = gen(seed)
    norms = torch.rand(k, dtype=F64, generator=g).mul(5).add(1e-3)
    initial = torch.rand(k, dtype=F64, generator=g).mul(5).add(1e-3)
    w, c = magnitude_weights(norms, initial)
    torch.testing.assert_close(w * norms, c.expand(k))
    rho = norms / initial
    torch.testing.assert_close(c, (rho / rho.sum() * norms).sum())
    _, c0 = magnitude_weights(norms, norms)  # at the start: ρ = 1, C = mean norm
    torch.testing.assert_close(c0, norms.mean())


# -- through the engine ----------------------------------------------------------------------------
def test_single_task_keeps_the_identity_and_passes_its_gradient():
    net = Net(k=1)
    twin = copy.deepcopy(net)
    mto = mto_for(net, optimizer=torch.optim.Adam, lr=1e-2)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for _ in range(5):
        mto.step(lambda: net.losses(mto.task_input))
        opt.zero_grad()
        twin.losses().losses["t0"].backward()
        for a, b in zip(net.encoder.parameters(), twin.encoder.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        opt.step()
    torch.testing.assert_close(mto.method.rotations()[0], torch.eye(6, dtype=F64))


@pytest.mark.parametrize("homogenize", [True, False])
def test_first_step_encoder_gradient(homogenize):
    """At step 0 (R = I, ρ = 1) the encoder gets Σ_k C ∇ℓ_k / n_k with C = mean n_k, or the
    plain sum without magnitude homogenisation (the reference's RotateOnly)."""
    net = Net(k=3)
    out = net.losses()
    z, losses = out.features, list(out.losses.values())
    r = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
    n = torch.stack([ri.norm() for ri in r])
    w = n.mean() / n if homogenize else torch.ones(3, dtype=F64)
    shared = list(net.encoder.parameters())
    combined = sum(wi * ri for wi, ri in zip(w, r, strict=True))
    expected = torch.autograd.grad(z, shared, grad_outputs=combined)
    mto = mto_for(net, homogenize_magnitude=homogenize)
    info = mto.step(lambda: net.losses(mto.task_input))
    torch.testing.assert_close(info.weights, w)
    for p, e in zip(shared, expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_rotations_train_stay_orthogonal_and_feed_the_heads():
    net = Net(k=3)
    mto = mto_for(net, optimizer=torch.optim.Adam, lr=1e-2, rotation_size=4)
    assert len(mto.optimizer.param_groups) == 1  # the rotations appear at the first step
    for _ in range(25):
        info = mto.step(lambda: net.losses(mto.task_input))
        assert info.extras["rotation_loss"] >= 0
    group = mto.optimizer.param_groups[-1]
    assert len(mto.optimizer.param_groups) == 2
    assert group["lr"] == pytest.approx(1e-3)
    assert group["weight_decay"] == 0.0
    assert group["params"][0] is mto.method.generator
    R = mto.method.rotations()
    eye = torch.eye(4, dtype=F64).expand(3, 4, 4)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye, atol=1e-12, rtol=0)
    assert (R - eye).abs().max() > 1e-3  # they moved
    z = net.encoder(net.x).detach()
    for i in range(3):
        torch.testing.assert_close(mto.task_input(z, f"t{i}"), rotate(z, R[i]))
        torch.testing.assert_close(mto.task_input(z, i), rotate(z, R[i]))
    with pytest.raises(KeyError, match="unknown task"):
        mto.task_input(z, "nope")


def test_multitask_model_uses_task_input():
    from mtopt.problems.base import MultiTaskModel

    net = Net(k=2)
    model = MultiTaskModel(net.encoder, {"t0": net.heads[0], "t1": net.heads[1]})
    twist = {"t0": lambda z: z * 2, "t1": lambda z: -z}
    z, out = model(net.x, lambda z, name: twist[name](z))
    torch.testing.assert_close(out["t0"], net.heads[0](2 * z))
    torch.testing.assert_close(out["t1"], net.heads[1](-z))


def test_burn_in_records_the_norms_again():
    net = Net(k=2)
    mto = mto_for(net, burn_in_period=2)
    recorded = []
    for _ in range(4):
        mto.step(lambda: net.losses(mto.task_input))
        recorded.append(mto.method.initial_norms.clone())
    torch.testing.assert_close(recorded[0], recorded[1], rtol=0, atol=0)
    assert not torch.equal(recorded[1], recorded[2])
    torch.testing.assert_close(recorded[2], recorded[3], rtol=0, atol=0)


def test_normalize_losses_divides_heads_and_encoder_by_the_first_losses():
    net = Net(k=2)
    twin = copy.deepcopy(net)
    mto = mto_for(net, normalize_losses=True)
    first = mto.step(lambda: net.losses(mto.task_input))
    plain = mto_for(twin)
    second = plain.step(lambda: twin.losses(plain.task_input))
    scale = 1 / torch.tensor(list(first.losses.values()), dtype=F64)
    # the heads get ∇(ℓ_k / ℓ_k⁰); the encoder keeps its direction, and its common norm C is
    # taken over the normalised gradients (C = mean_k n_k/ℓ_k⁰ at step 0 instead of mean_k n_k)
    for i in range(2):
        for a, b in zip(net.heads[i].parameters(), twin.heads[i].parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad * scale[i])
    ratio = first.extras["common_norm"] / second.extras["common_norm"]
    torch.testing.assert_close(first.weights, second.weights * ratio)
    norms = second.extras["common_norm"] / second.weights
    assert first.extras["common_norm"] == pytest.approx(float((norms * scale).mean()))
    for a, b in zip(net.encoder.parameters(), twin.encoder.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad * ratio)

    zero = Net(k=2)
    mto = mto_for(zero, normalize_losses=True)

    def closure():
        out = zero.losses(mto.task_input)
        out.losses["t1"] = out.losses["t1"] * 0
        return out

    with pytest.raises(ValueError, match="must be > 0"):
        mto.step(closure)


def test_state_dict_resumes_exactly():
    net = Net(k=3)
    mto = mto_for(net, optimizer=torch.optim.Adam, lr=1e-2, burn_in_period=3)
    for _ in range(2):
        mto.step(lambda: net.losses(mto.task_input))
    state = copy.deepcopy(mto.state_dict())
    twin = copy.deepcopy(net)
    twin_mto = mto_for(twin, optimizer=torch.optim.Adam, lr=1e-2, burn_in_period=3)
    twin_mto.load_state_dict(state)
    assert len(twin_mto.optimizer.param_groups) == 2
    for _ in range(3):
        mto.step(lambda: net.losses(mto.task_input))
        twin_mto.step(lambda: twin.losses(twin_mto.task_input))
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(mto.method.generator, twin_mto.method.generator, rtol=0, atol=0)
    # loading into an optimizer that already holds the rotations keeps the same tensor
    held = twin_mto.method.generator
    twin_mto.load_state_dict(copy.deepcopy(mto.state_dict()))
    assert twin_mto.method.generator is held


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="rotation_size"):
        mtopt.make("rotograd", rotation_size=0)
    with pytest.raises(ValueError, match="rotation_lr_scale"):
        mtopt.make("rotograd", rotation_lr_scale=0.0)
    net = Net(k=2, d=6)
    mto = mto_for(net, rotation_size=7)
    with pytest.raises(ValueError, match="exceeds the representation's 6 channels"):
        mto.step(lambda: net.losses())
    flat = Net(k=2)
    mto = mto_for(flat)

    def one_dim():
        z = flat.encoder(flat.x).sum(1)
        return mtopt.Losses({"a": z.pow(2).mean(), "b": (z - 1).pow(2).mean()}, features=z)

    with pytest.raises(ValueError, match="batch and a channel dimension"):
        mto.step(one_dim)


# -- the reference package ---------------------------------------------------------------------
def test_matches_the_reference_implementation():
    """Same float64 model, SGD, identity initial rotations: ``rotograd.RotoGrad`` (0.1.6) and
    ours give the same encoder and rotations over ten steps, across a burn-in re-recording. The
    reference's rotation loss sums over the batch for (B, D) representations (we average): the
    rotation lr is scaled by B to compensate."""
    rotograd = pytest.importorskip("rotograd")
    k, d, m, batch, lr, scale, burn = 3, 6, 4, 16, 0.05, 0.5, 3
    ours = Net(k=k, d=d, batch=batch)
    ref_net = copy.deepcopy(ours)
    ref = rotograd.RotoGrad(ref_net.encoder, ref_net.heads, m, burn_in_period=burn).double()
    with torch.no_grad():  # geotorch samples a random base rotation: start from I as we do
        for i in range(k):
            getattr(ref.parametrizations, f"rotation_{i}")[0].base.copy_(torch.eye(m, dtype=F64))
    rotations = [p for n, p in ref.named_parameters() if "rotation" in n]
    ref_opt = torch.optim.SGD(
        [{"params": ref_net.parameters()}, {"params": rotations, "lr": lr * scale}], lr=lr
    )
    mto = mto_for(
        ours, lr=lr, rotation_size=m, rotation_lr_scale=scale * batch, burn_in_period=burn
    )
    for _ in range(10):
        ref.train()
        ref_opt.zero_grad()
        preds = ref(ref_net.x)
        mse = torch.nn.functional.mse_loss
        ref.backward([mse(p, y) for p, y in zip(preds, ref_net.ys, strict=True)])
        ref_opt.step()
        mto.step(lambda: ours.losses(mto.task_input))
        for a, b in zip(ours.parameters(), ref_net.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            mto.method.rotations(), torch.stack(ref.rotation).detach(), rtol=1e-10, atol=1e-12
        )
