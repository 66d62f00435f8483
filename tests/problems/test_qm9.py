"""QM9: CSV parsing, atomisation energies, splits, invariances, one training step per track.

Everything runs on a synthetic CSV in qm9pack's format (methane, ammonia, water with made-up
coordinates and QM9's published energies) or on random molecules; the last test checks the real
dataset only if it is already cached (`mtopt data fetch qm9`).
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from mtopt import Losses, MultiTaskOptimizer
from mtopt.problems.base import evaluate
from mtopt.problems.mnist_data import cache_dir
from mtopt.problems.qm9 import (
    QM9,
    DenseNNConv,
    MPNNEncoder,
    cached_descriptors,
    coulomb_descriptors,
    molecular_graph,
    pack_atoms,
    split_indices,
    split_order,
)
from mtopt.problems.qm9_data import (
    HARTREE_TO_EV,
    MAX_ATOMS,
    TARGET_NAMES,
    Molecule,
    QM9Arrays,
    load_qm9,
    parse_number,
    read_npz,
    read_qm9pack_wheel,
    stack_molecules,
    write_npz,
)

HEADER = (
    "XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Mulliken_pop,"
    "Harmonic_Freq_cmi,RotA_GHz,RotB_GHz,RotC_GHz,Dipole_debye,Polarizability_bohr3,HOMO_au,"
    "LUMO_au,HOMO_LUMO_gap_au,R2_bohr2,ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,"
    "Enthalphy_298K_au,GibbsFreeEnergy_298K_au,Heatcapacity_Cv_cal_mol_K"
)
# Coordinates are made up (plausible bond lengths); `*^`, `E` exponents and `0.` on purpose.
METHANE = (
    '"dsgdb9nsd_000001.xyz",1,"C","InChI=1S/CH4/h1H4",5,"[4,1,0,0,0]",'
    "\"['C','H','H','H','H']\","
    '"[[0.,0.,1.2*^-5],[0.6291,0.6291,0.6291],[-0.6291,-0.6291,0.6291],'
    '[-0.6291,0.6291,-0.6291],[0.6291,-0.6291,-0.6291]]",'
    '"[-0.53,0.13,0.13,0.13,0.13]","[1341.3,1562.7,3038.3]",157.7,157.7,157.7,'
    "0.,13.21,-0.3877,0.1171,0.5048,35.3641,0.044749,-40.47893,-40.476062,-40.475117,"
    "-40.498597,6.469"
)
AMMONIA = (
    '"dsgdb9nsd_000002.xyz",2,"N","InChI=1S/H3N/h1H3",4,"[3,0,1,0,0]",'
    "\"['N','H','H','H']\","
    '"[[0.,0.,0.1],[0.94,0.,-0.27],[-0.47,0.814,-0.27],[-0.47,-0.814,-0.27]]",'
    '"[-0.7,0.23,0.23,0.23]","[1103.9,1684.1]",293.6,293.5,191.4,'
    "1.6256,9.46,-0.257,0.0829,0.3399,26.1563,0.034358,-56.525887,-56.523026,-56.522082,"
    "-56.544961,6.316"
)
WATER = (
    '"dsgdb9nsd_000003.xyz",3,"O","InChI=1S/H2O/h1H2",3,"[2,0,0,1,0]",'
    "\"['O','H','H']\","
    '"[[0.,0.,0.],[0.7572,0.5865,0.],[-0.7572,0.5865,2.5E-6]]",'
    '"[-0.59,0.29,0.29]","[1671.4,3803.6,3907.7]",799.6,437.9,282.9,'
    "1.8511,6.31,-0.2928,0.0687,0.3615,19.0002,0.021375,-76.404702,-76.401867,-76.400922,"
    "-76.422349,6.002"
)


@pytest.fixture
def csv_dir(tmp_path):
    """Parts 1 and 2 in qm9pack's format, out of index order across the files."""
    (tmp_path / "qm9_part1.csv").write_text(f"{HEADER}\n{METHANE}\n{WATER}\n")
    (tmp_path / "qm9_part2.csv").write_text(f"{HEADER}\n{AMMONIA}\n")
    return tmp_path


def synthetic_arrays(n: int = 40, seed: int = 0) -> QM9Arrays:
    """Random molecules of 3-12 atoms on a jittered 1.2 Å grid (no two atoms closer than ~1 Å)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.2
    molecules = []
    for i in range(n):
        k = int(rng.integers(3, 13))
        heavy = rng.choice([6, 7, 8, 9], size=int(rng.integers(1, k)))
        z = np.concatenate([heavy, np.ones(k - heavy.size, dtype=np.int64)])
        pos = grid[rng.permutation(len(grid))[:k]] + rng.normal(0, 0.05, (k, 3))
        targets = rng.normal(0, 1, len(TARGET_NAMES)) * np.arange(1, 12) + np.arange(11)
        molecules.append(Molecule(index=i + 1, z=z, pos=pos, targets=targets))
    return stack_molecules(molecules, "synthetic")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "value"),
    [("-0.0126981359", -0.0126981359), ("0.", 0.0), ("18.", 18.0), ("2.1997E-6", 2.1997e-6),
     ("1.2*^-5", 1.2e-5), ("-3.5*^2", -350.0)],
)  # fmt: skip
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value, rel=1e-15, abs=0)


def test_parse_rows_atoms_coordinates_and_atomisation_energies(csv_dir):
    data = load_qm9(csv_dir)
    assert len(data) == 3
    np.testing.assert_array_equal(data.index, [1, 2, 3])  # sorted across files
    np.testing.assert_array_equal(data.n_atoms, [5, 4, 3])
    np.testing.assert_array_equal(data.z[0, :6], [6, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(data.z[1, :5], [7, 1, 1, 1, 0])
    np.testing.assert_array_equal(data.z[2, :4], [8, 1, 1, 0])
    assert data.z.shape == (3, MAX_ATOMS)
    assert data.pos.shape == (3, MAX_ATOMS, 3)
    assert data.pos[0, 0, 2] == np.float32(1.2e-5)  # Mathematica exponent
    assert data.pos[2, 2, 2] == np.float32(2.5e-6)  # E exponent
    np.testing.assert_allclose(data.pos[0, 4], [0.6291, -0.6291, -0.6291], rtol=1e-7)
    assert not data.pos[0, 5:].any()
    assert not data.pos[2, 3:].any()

    t = dict(zip(TARGET_NAMES, data.targets[0], strict=True))  # methane, by hand:
    u0_atom_hartree = -40.47893 - (-37.846772 + 4 * -0.500273)  # = -0.631066 Ha
    assert u0_atom_hartree == pytest.approx(-0.631066, abs=1e-9)
    assert t["u0_atom"] == pytest.approx(-0.631066 * 27.211386246, rel=1e-12)
    assert t["u0_atom"] == pytest.approx(-17.17218, abs=1e-5)
    assert t["homo"] == pytest.approx(-0.3877 * HARTREE_TO_EV, rel=1e-12)
    assert t["zpve"] == pytest.approx(0.044749 * HARTREE_TO_EV, rel=1e-12)
    assert (t["mu"], t["alpha"], t["r2"], t["cv"]) == (0.0, 13.21, 35.3641, 6.469)
    water_g = dict(zip(TARGET_NAMES, data.targets[2], strict=True))["g298_atom"]
    assert water_g == pytest.approx((-76.422349 + 75.079532 + 2 * 0.510927) * 27.211386246)


def test_parse_rejects_inconsistent_rows(tmp_path):
    bad = METHANE.replace('"[4,1,0,0,0]"', '"[3,1,0,0,0]"')
    (tmp_path / "qm9_part1.csv").write_text(f"{HEADER}\n{bad}\n")
    with pytest.raises(ValueError, match="stoichiometry"):
        load_qm9(tmp_path)
    (tmp_path / "qm9_part1.csv").write_text(f"{HEADER}\n{METHANE.replace(',5,', ',6,', 1)}\n")
    with pytest.raises(ValueError, match="N_atoms=6"):
        load_qm9(tmp_path)


def test_npz_cache_round_trip(csv_dir, tmp_path):
    data = load_qm9(csv_dir)
    write_npz(tmp_path / "qm9.npz", data)
    again = load_qm9(data_dir=None, cache=tmp_path, download=False)
    for key in ("z", "pos", "n_atoms", "targets", "index"):
        np.testing.assert_array_equal(getattr(again, key), getattr(data, key))
        assert getattr(again, key).dtype == getattr(data, key).dtype
    assert read_npz(tmp_path / "qm9.npz").source.startswith("CSV files in")
    with pytest.raises(FileNotFoundError, match="mtopt data fetch qm9"):
        load_qm9(data_dir=None, cache=tmp_path / "empty", download=False)


def test_wheel_with_other_content_is_refused(tmp_path):
    wheel = tmp_path / "qm9pack-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for part in (1, 2, 3):
            zf.writestr(f"qm9pack/data/qm9_part{part}.csv", f"{HEADER}\n{METHANE}\n")
    with pytest.raises(ValueError, match="sha256"):
        read_qm9pack_wheel(wheel)


# --------------------------------------------------------------------------- splits and metrics


def test_split_sizes_disjoint_and_deterministic():
    parts = split_indices(1000, n_test=100, n_val=150, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 750, "val": 150, "test": 100}
    np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(1000))
    again = split_indices(1000, n_test=100, n_val=150, seed=0)
    for name in parts:
        np.testing.assert_array_equal(parts[name], again[name])
    assert not np.array_equal(parts["test"], split_indices(1000, 100, 150, seed=1)["test"])
    order = split_order(1000, 0)
    np.testing.assert_array_equal(parts["test"], order[:100])
    np.testing.assert_array_equal(parts["val"], order[100:250])
    # pinned: the order of the real benchmark (torch.randperm(130831) seeded 0)
    assert split_order(130_831, 0)[:6].tolist() == [84748, 34780, 111673, 64915, 44291, 3268]
    with pytest.raises(ValueError, match="cannot split"):
        split_indices(100, 50, 50)


def test_standardised_targets_and_mae_in_reported_units():
    data = synthetic_arrays(30)
    problem = QM9("mlp", qm9=data, n_test=5, n_val=5)
    splits = problem.splits()
    y_all = torch.cat([splits[s].arrays["y"] for s in ("train", "val", "test")])
    torch.testing.assert_close(y_all.double().mean(0), torch.zeros(11, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # fmt: skip
    torch.testing.assert_close(y_all.double().std(0), torch.ones(11, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # fmt: skip
    batch = next(splits["val"].batches(5))
    std = data.targets.std(axis=0, ddof=1)
    factors = [1, 1, 1000, 1000, 1, 1000, 1000, 1000, 1000, 1000, 1]
    for k, spec in enumerate(problem.tasks):
        mae = spec.metrics[0]
        exact = batch["y"][:, k : k + 1]
        assert float(mae.batch_sum(exact, batch)) == pytest.approx(0.0, abs=1e-4 * factors[k])
        off = float(mae.batch_sum(exact + 0.5, batch)) / 5
        assert off == pytest.approx(0.5 * std[k] * factors[k], rel=1e-5)
        assert float(spec.loss(exact + 0.5, batch)) == pytest.approx(0.25, rel=1e-5)


def test_metrics_need_loaded_data():
    problem = QM9("mlp", qm9=synthetic_arrays(20), n_test=4, n_val=4)
    batch = {"y": torch.zeros(2, 11), "target": torch.zeros(2, 11, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match="splits"):
        problem.tasks[0].metrics[0].batch_sum(torch.zeros(2, 1), batch)


# --------------------------------------------------------------------------- descriptors


def test_coulomb_descriptors_values_and_units():
    z = np.zeros((1, MAX_ATOMS), dtype=np.int8)
    pos = np.zeros((1, MAX_ATOMS, 3), dtype=np.float32)
    z[0, :2] = 1
    pos[0, 1, 0] = 0.529177210903  # 1 bohr: M = [[0.5, 1], [1, 0.5]]
    d = coulomb_descriptors(z, pos)[0]
    np.testing.assert_allclose(d[:3], [1.5, -0.5, 0.0], atol=1e-6)
    np.testing.assert_array_equal(d[MAX_ATOMS:], [2, 0, 0, 0, 0, 2])


def test_descriptors_invariant_to_atom_order():
    data = synthetic_arrays(12, seed=3)
    rng = np.random.default_rng(0)
    perm = np.stack([rng.permutation(MAX_ATOMS) for _ in range(len(data))])  # padding moves too
    z_perm = np.take_along_axis(data.z, perm, axis=1)
    pos_perm = np.take_along_axis(data.pos, perm[..., None], axis=1)
    original = coulomb_descriptors(data.z, data.pos)
    np.testing.assert_allclose(
        coulomb_descriptors(z_perm, pos_perm), original, rtol=1e-5, atol=1e-9
    )
    pos_swap = data.pos.copy()
    pos_swap[:, [0, 1]] = pos_swap[:, [1, 0]]  # moving atoms (not relabelling) changes it
    assert not np.allclose(coulomb_descriptors(data.z, pos_swap), original, rtol=1e-3)


def test_descriptor_cache_follows_the_data(tmp_path):
    data = synthetic_arrays(6)
    first = cached_descriptors(data, tmp_path)
    assert (tmp_path / "qm9_descriptors_cm_v1.npz").exists()
    np.testing.assert_array_equal(cached_descriptors(data, tmp_path), first)
    other = synthetic_arrays(6, seed=1)
    np.testing.assert_array_equal(
        cached_descriptors(other, tmp_path), coulomb_descriptors(other.z, other.pos)
    )


# --------------------------------------------------------------------------- GNN


def test_graph_features_of_methane(csv_dir):
    data = load_qm9(csv_dir)
    x = torch.from_numpy(pack_atoms(data.z, data.pos))
    graph = molecular_graph(x)
    node, edge, adj = graph.node[0], graph.edge[0], graph.adj[0]
    assert graph.mask[0].sum() == 5
    assert adj.sum() == 5 * 4
    torch.testing.assert_close(node[0], torch.tensor([0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4.0]))
    torch.testing.assert_close(node[1], torch.tensor([1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0.0]))
    assert not node[5:].any()
    assert not edge[5:].any()
    assert not edge[:, 5:].any()
    assert edge[0, 1, 0] == 1
    assert edge[1, 2, 0] == 0
    assert edge[0, 1, 4] == pytest.approx(0.6291 * 3**0.5, rel=1e-5)
    near = molecular_graph(x, cutoff=1.5)  # keeps the four C–H pairs (both directions)
    assert near.adj[0].sum() == 8


def test_dense_nnconv_matches_the_per_edge_formula():
    torch.manual_seed(0)
    conv = DenseNNConv(channels=6, edge_features=5, edge_hidden=7).double()
    x = torch.from_numpy(pack_atoms(*_zpos(synthetic_arrays(3)))).double()
    graph = molecular_graph(x)
    h = torch.randn(3, MAX_ATOMS, 6, dtype=torch.float64) * graph.mask[..., None]
    real = graph.mask.nonzero(as_tuple=True)
    out = conv(h, conv.edge_hidden(graph, real), graph, real)
    assert out.shape == (int(graph.mask.sum()), 6)
    for r, (b, i) in enumerate(zip(*[t.tolist() for t in real], strict=True)):
        msgs = [
            h[b, j] @ conv.edge_net(graph.edge[b, i, j]).view(6, 6)
            for j in torch.nonzero(graph.adj[b, i]).flatten().tolist()
        ]
        expected = torch.stack(msgs).mean(0) + conv.root(h[b, i])
        torch.testing.assert_close(out[r], expected)


def test_gnn_invariant_to_atom_order():
    torch.manual_seed(0)
    encoder = MPNNEncoder().eval()
    data = synthetic_arrays(5, seed=2)
    x = torch.from_numpy(pack_atoms(data.z, data.pos))
    perm = torch.stack([torch.randperm(MAX_ATOMS) for _ in range(5)])  # padding interleaved
    x_perm = torch.gather(x, 1, perm[..., None].expand(-1, -1, 4))
    with torch.no_grad():
        z, z_perm = encoder(x), encoder(x_perm)
    assert z.shape == (5, 64)
    torch.testing.assert_close(z_perm, z, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and it does look at the geometry
        x_moved = x.clone()
        x_moved[:, 0, 1:] += 0.5
        assert not torch.allclose(encoder(x_moved), z, atol=1e-4)


def _zpos(data: QM9Arrays) -> tuple[np.ndarray, np.ndarray]:
    return data.z, data.pos


# --------------------------------------------------------------------------- training smoke


@pytest.mark.parametrize("track", ["mlp", "gnn"])
def test_one_training_step_per_track(track):
    torch.manual_seed(0)
    problem = QM9(track, qm9=synthetic_arrays(40), n_test=8, n_val=8)
    splits = problem.splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    model = problem.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mto = MultiTaskOptimizer(
        optimizer,
        "unitary",
        shared=model.encoder.parameters(),
        tasks=problem.task_names,
        loss_types=[t.loss_type for t in problem.tasks],
    )
    batch = next(splits["train"].batches(12, True, torch.Generator().manual_seed(0)))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def closure():
        z, outputs = model(batch["x"], mto.task_input)
        return Losses({t.name: t.loss(outputs[t.name], batch) for t in problem.tasks}, features=z)

    info = mto.step(closure)
    assert set(info.losses) == set(TARGET_NAMES)
    assert all(np.isfinite(v) and v > 0 for v in info.losses.values())
    after = model.state_dict()
    assert not torch.equal(before["heads.cv.weight"], after["heads.cv.weight"])
    changed = [
        k for k in before if k.startswith("encoder.") and not torch.equal(before[k], after[k])
    ]
    assert len(changed) == sum(1 for k in before if k.startswith("encoder."))
    metrics = evaluate(model, problem, splits["val"], task_input=mto.task_input)
    assert set(metrics) == set(TARGET_NAMES)
    assert all(np.isfinite(m["mae"]) and m["mae"] > 0 for m in metrics.values())


# --------------------------------------------------------------------------- the real data


@pytest.mark.skipif(
    not (cache_dir() / "qm9.npz").exists(), reason="QM9 not cached (`mtopt data fetch qm9`)"
)
def test_real_dataset_size_splits_and_methane():
    data = load_qm9(download=False)
    assert len(data) == 130_831
    assert data.n_atoms.max() == 29
    assert data.index[0] == 1
    assert data.index[-1] == 133_885
    parts = split_indices(len(data))
    assert {k: len(v) for k, v in parts.items()} == {
        "train": 110_831,
        "val": 10_000,
        "test": 10_000,
    }
    methane = dict(zip(TARGET_NAMES, data.targets[0], strict=True))
    assert methane["u0_atom"] == pytest.approx(-0.631066 * 27.211386246, rel=1e-12)
    np.testing.assert_array_equal(data.z[0, :5], [6, 1, 1, 1, 1])
