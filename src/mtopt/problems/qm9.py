"""QM9: 11 molecular-property regression tasks (Gama & Grassi's configuration), two model tracks.

Data: :mod:`mtopt.problems.qm9_data` (130,831 molecules, targets in PyG's units). Tasks, in the
paper's order: ``mu`` (D), ``alpha`` (a₀³), ``homo``, ``lumo`` (eV), ``r2`` (a₀²), ``zpve``
(eV), ``u0_atom``, ``u298_atom``, ``h298_atom``, ``g298_atom`` (atomisation energies, eV),
``cv`` (cal/mol/K).

* Targets are standardised with the mean and (unbiased) standard deviation over the *whole*
  dataset, all splits included, as in Nash-MTL's code. Loss per task: MSE between the head's
  output and the standardised target. Metric per task: ``mae``, the mean absolute error of the
  de-standardised prediction in the reported units (lower is better): × 1000 for ``homo``,
  ``lumo``, ``zpve`` and the four atomisation energies (meV), the stored unit otherwise.
* Split: ``torch.randperm(130831, generator=torch.Generator().manual_seed(0))`` orders the
  molecules (sorted by GDB-9 index beforehand); test = the first 10,000, val = the next 10,000,
  train = the remaining 110,831 (in that shuffled order, so ``split.subset(n)`` — the trainer's
  ``--train-subset`` — is a random sample of the training molecules).

Tracks (problems ``qm9/mlp`` and ``qm9/gnn``):

* ``mlp``: an MLP on 35 per-molecule descriptors computed once (and cached beside the data):
  the eigenvalues of the Coulomb matrix (Rupp et al., PRL 108, 058301 (2012): ``M_ii = ½ Z_i^2.4``,
  ``M_ij = Z_i Z_j / |R_i − R_j|`` with distances in bohr), sorted by decreasing magnitude and
  zero-padded to 29, the numbers of H, C, N, O, F atoms and the number of atoms; all invariant
  to the order of the atoms. Descriptors are standardised with the training split's mean/std.
  Encoder: Linear 35→256, ReLU, dropout, Linear 256→64, ReLU (the shared features); heads
  Linear 64→1.
* ``gnn``: the MPNN of Gilmer et al. (2017) as configured by Nash-MTL / PyG's ``nn_conv`` QM9
  example, in plain PyTorch on padded molecules (≤ 29 atoms) with dense message passing:
  Linear 11→64 + ReLU; 3 rounds of NNConv (edge network Linear 5→128, ReLU, Linear 128→64·64;
  mean aggregation; root weight and bias) + ReLU + GRU; Set2Set (3 steps) → 128; dropout;
  Linear 128→64 + ReLU = the shared features; heads Linear 64→1. The graph is complete (every
  ordered pair of distinct atoms, PyG's ``Complete`` transform) unless ``cutoff`` (Å) keeps only
  the pairs closer than it. ``batch["x"]`` is one ``(B, 29, 4)`` float tensor ``[Z, x, y, z]``
  (Å; ``Z = 0`` marks padding, which may sit anywhere).

  PyG's 11 node features (H/C/N/O/F one-hot, atomic number, aromatic, sp/sp²/sp³, number of
  attached H) and 4 bond-type one-hots come from RDKit; without RDKit, and from the geometry
  alone, we use instead (:func:`molecular_graph`):

  - node (11): H/C/N/O/F one-hot (5); atomic number (1); one-hot of the number of covalently
    bonded neighbours 1, 2, 3, ≥ 4 (4; a geometric stand-in for sp/sp²/sp³ and aromaticity);
    number of bonded H atoms (1, as PyG's ``num_hs``);
  - edge (5): covalently bonded flag (the union of PyG's four bond-type one-hots); Gaussian
    expansions ``exp(−(d − μ)² / (2 · 0.5²))`` of the distance ``d`` (Å) at μ = 1, 2, 3 Å (3);
    ``d`` itself (1, as PyG's ``Distance(norm=False)``).

  Two atoms are bonded when ``d < 1.25 · (r_i + r_j)`` with the covalent radii of Cordero et al.
  (Dalton Trans. 2008, 2832): H 0.31, C 0.76, N 0.71, O 0.66, F 0.57 Å.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtopt.problems import cache as cache_files
from mtopt.problems.base import Batch, Metric, MultiTaskModel, Problem, Split, TaskSpec
from mtopt.problems.mnist_data import cache_dir
from mtopt.problems.qm9_data import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    MAX_ATOMS,
    TARGETS,
    QM9Arrays,
    Target,
    load_qm9,
)
from mtopt.problems.registry import register_problem

TRACKS = ("mlp", "gnn")
N_TEST = 10_000
N_VAL = 10_000
SPLIT_SEED = 0
BOHR_PER_ANGSTROM = 1 / 0.529177210903
#: Covalent radii (Å) by atomic number (Cordero et al. 2008); 0 elsewhere.
COVALENT_RADII = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
BOND_TOLERANCE = 1.25
RBF_CENTRES = (1.0, 2.0, 3.0)  # Å
RBF_WIDTH = 0.5  # Å
N_NODE_FEATURES = 11
N_EDGE_FEATURES = 5
N_DESCRIPTORS = MAX_ATOMS + len(ELEMENTS) + 1
_DESCRIPTOR_CACHE = "qm9_descriptors_cm_v1.npz"
_Z_TO_SLOT = torch.full((10,), -1, dtype=torch.long)
_Z_TO_SLOT[[1, 6, 7, 8, 9]] = torch.arange(5)
_RADIUS = torch.zeros(10)
_RADIUS[list(COVALENT_RADII)] = torch.tensor(list(COVALENT_RADII.values()))


# --------------------------------------------------------------------------- splits and targets


def split_order(n: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """The shuffled order of ``n`` molecules: ``torch.randperm`` with its own generator seeded
    ``seed``. It equals the permutation PyG's ``dataset.shuffle()`` draws when that is the first
    draw after ``torch.manual_seed(seed)`` (whether Nash-MTL's runs drew it first is not
    checked here)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def split_indices(
    n: int, n_test: int = N_TEST, n_val: int = N_VAL, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Molecule indices of the splits: test = first ``n_test`` of :func:`split_order`, val = the
    next ``n_val``, train = the rest."""
    if n_test < 1 or n_val < 1 or n_test + n_val >= n:
        raise ValueError(f"cannot split {n} molecules into {n_test} test, {n_val} val and train")
    order = split_order(n, seed)
    return {
        "train": order[n_test + n_val :],
        "val": order[n_test : n_test + n_val],
        "test": order[:n_test],
    }


class TargetScaler:
    """Per-target mean and std (float64, stored units), set once the data are loaded."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def fit(self, targets: np.ndarray) -> None:
        self.mean = torch.from_numpy(targets.mean(axis=0))
        std = targets.std(axis=0, ddof=1) if targets.shape[0] > 1 else np.ones(targets.shape[1])
        self.std = torch.from_numpy(np.where(std > 0, std, 1.0))

    def standardise(self, targets: np.ndarray) -> Tensor:
        mean, std = self._stats()
        return ((torch.from_numpy(targets) - mean) / std).float()

    def unstandardise(self, pred: Tensor, k: int) -> Tensor:
        """Prediction of target ``k`` (standardised) → stored units, float64."""
        mean, std = self._stats()
        return pred.double() * std[k] + mean[k]

    def _stats(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("QM9 targets are not loaded yet: call problem.splits() first")
        return self.mean, self.std


def make_task(k: int, target: Target, scaler: TargetScaler) -> TaskSpec:
    """Task ``k``: MSE on the standardised target; MAE in the reported units."""

    def loss(pred: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(pred.reshape(-1), batch["y"][:, k])

    def mae_sum(pred: Tensor, batch: Batch) -> Tensor:
        error = scaler.unstandardise(pred.reshape(-1), k) - batch["target"][:, k]
        return error.abs().sum() * target.report_factor

    return TaskSpec(
        name=target.name,
        loss=loss,
        metrics=(Metric("mae", lower_is_better=True, batch_sum=mae_sum),),
        loss_type="regression",
    )


# --------------------------------------------------------------------------- MLP track


def coulomb_descriptors(z: np.ndarray, pos: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``(N, 35)`` float32 descriptors: the 29 Coulomb-matrix eigenvalues (atomic units, sorted
    by decreasing magnitude, zero for padding), the H/C/N/O/F counts, the atom count.

    ``z`` (N, 29) atomic numbers with 0 for padding (anywhere), ``pos`` (N, 29, 3) in Å.
    """
    out = np.zeros((z.shape[0], N_DESCRIPTORS), dtype=np.float32)
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk].astype(np.float64)
        rc = pos[start : start + chunk].astype(np.float64) * BOHR_PER_ANGSTROM
        dist = np.linalg.norm(rc[:, :, None] - rc[:, None], axis=-1)
        dist[dist == 0] = np.inf  # the diagonal (and padding): no off-diagonal term
        cm = zc[:, :, None] * zc[:, None] / dist
        np.einsum("nii->ni", cm)[...] = 0.5 * zc**2.4
        eig = np.linalg.eigvalsh(cm)
        eig = np.take_along_axis(eig, np.argsort(-np.abs(eig), axis=1, kind="stable"), axis=1)
        eig[np.arange(MAX_ATOMS)[None, :] >= (zc > 0).sum(1)[:, None]] = 0.0  # padding: exact 0
        counts = np.stack([(zc == ATOMIC_NUMBERS[e]).sum(1) for e in ELEMENTS], axis=1)
        atoms = (zc > 0).sum(1, keepdims=True)
        out[start : start + chunk] = np.concatenate([eig, counts, atoms], axis=1)
    return out


def _fingerprint(data: QM9Arrays) -> str:
    digest = hashlib.sha256(data.z.tobytes())
    digest.update(data.pos.tobytes())
    return digest.hexdigest()


def cached_descriptors(data: QM9Arrays, folder: Path | None) -> np.ndarray:
    """:func:`coulomb_descriptors` of ``data``, cached in ``folder`` (keyed by the data's
    sha256; recomputed when they differ; the file's own sha256 is recorded and checked, see
    :mod:`mtopt.problems.cache`). ``folder=None``: no cache."""
    if folder is None:
        return coulomb_descriptors(data.z, data.pos)
    path = folder / _DESCRIPTOR_CACHE
    fingerprint = _fingerprint(data)
    hit = cache_files.read_file(path, _read_descriptors)
    if hit.value is not None and hit.value[0] == fingerprint:
        return hit.value[1]
    descriptors = coulomb_descriptors(data.z, data.pos)
    cache_files.write_file(
        path,
        lambda fh: np.savez(fh, descriptors=descriptors, fingerprint=np.array(fingerprint)),
    )
    return descriptors


def _read_descriptors(path: Path) -> tuple[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return str(npz["fingerprint"]), npz["descriptors"]


class MLPEncoder(nn.Sequential):
    """Descriptors (B, 35) → shared features (B, 64)."""

    def __init__(self, dropout: float = 0.0, hidden: int = 256, out: int = 64) -> None:
        super().__init__(
            nn.Linear(N_DESCRIPTORS, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out),
            nn.ReLU(),
        )


# --------------------------------------------------------------------------- GNN track


def pack_atoms(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``(N, 29, 4)`` float32 ``[Z, x, y, z]``: the GNN's ``batch["x"]``."""
    return np.concatenate([z[..., None].astype(np.float32), pos.astype(np.float32)], axis=-1)


@dataclass(frozen=True)
class MolecularGraph:
    """Dense padded graphs: ``node`` (B, N, 11), ``edge`` (B, N, N, 5), ``adj`` (B, N, N) bool
    (message pairs j → i, no self loops), ``mask`` (B, N) bool (real atoms)."""

    node: Tensor
    edge: Tensor
    adj: Tensor
    mask: Tensor


def molecular_graph(x: Tensor, cutoff: float | None = None) -> MolecularGraph:
    """Node and edge features of packed molecules ``x`` (B, N, 4) (see the module docstring)."""
    z = x[..., 0].round().long()
    pos = x[..., 1:].double()
    mask = z > 0
    dist = (pos[:, :, None] - pos[:, None]).pow(2).sum(-1).sqrt()
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=x.device)
    pair = mask[:, :, None] & mask[:, None] & ~eye
    adj = pair if cutoff is None else pair & (dist < cutoff)
    radius = _RADIUS.to(x.device, torch.float64)[z]
    bonded = pair & (dist < BOND_TOLERANCE * (radius[:, :, None] + radius[:, None]))
    degree = bonded.sum(-1)
    n_h = (bonded & (z == 1)[:, None, :]).sum(-1)
    slot = _Z_TO_SLOT.to(x.device)[z]
    features = [
        (slot[..., None] == torch.arange(5, device=x.device)).double(),  # H C N O F one-hot
        z[..., None].double(),  # atomic number
        (degree.clamp(max=4)[..., None] == torch.arange(1, 5, device=x.device)).double(),
        n_h[..., None].double(),  # bonded H atoms
    ]
    node = torch.cat(features, dim=-1) * mask[..., None]
    centres = torch.tensor(RBF_CENTRES, dtype=torch.float64, device=x.device)
    rbf = torch.exp(-((dist[..., None] - centres) ** 2) / (2 * RBF_WIDTH**2))
    edge = torch.cat([bonded[..., None].double(), rbf, dist[..., None]], dim=-1) * adj[..., None]
    return MolecularGraph(node=node.to(x.dtype), edge=edge.to(x.dtype), adj=adj, mask=mask)


class DenseNNConv(nn.Module):
    """PyG's ``NNConv(C, C, edge_net, aggr="mean")`` on dense padded graphs:

    ``out_i = root(h_i) + mean_{j: adj[i, j]} h_j · W(e_ij)``, ``W(e) = edge_net(e).view(C, C)``,
    with ``edge_net`` = Linear(5→K), ReLU, Linear(K→C·C). Computed without forming the per-edge
    C×C matrices: with ``u_ij = ReLU(L1 e_ij)`` and the last layer's weight ``A`` and bias ``b``,
    ``Σ_j h_j · W(e_ij) = Σ_{k,c} (Σ_j u_ij[k] h_j[c]) A[(c, o), k] + (Σ_j h_j) · b`` (the same
    numbers with about 4× fewer operations than PyG's per-edge matrices on complete graphs).
    Outputs are computed for the real atoms only, ``real = graph.mask.nonzero(as_tuple=True)``.
    """

    def __init__(self, channels: int = 64, edge_features: int = 5, edge_hidden: int = 128) -> None:
        super().__init__()
        self.channels = channels
        self.edge_net = nn.Sequential(
            nn.Linear(edge_features, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, channels**2)
        )
        self.root = nn.Linear(channels, channels)

    def edge_hidden(self, graph: MolecularGraph, real: tuple[Tensor, Tensor]) -> Tensor:
        """``u`` of the docstring for the real atoms ``i``, zero off the graph: ``(R, K, N)``."""
        u = self.edge_net[1](self.edge_net[0](graph.edge[real])) * graph.adj[real][..., None]
        return u.transpose(1, 2)

    def forward(
        self, h: Tensor, hidden: Tensor, graph: MolecularGraph, real: tuple[Tensor, Tensor]
    ) -> Tensor:
        """``h`` (B, N, C) padded node states → ``(R, C)`` outputs of the real atoms."""
        c = h.shape[-1]
        last = cast(nn.Linear, self.edge_net[2])  # Sequential's item is typed as a Module
        k = last.in_features
        weight = last.weight.view(c, c, k).permute(2, 0, 1).reshape(k * c, c)  # [(k, c), o]
        neighbours = h[real[0]]  # (R, N, C): the states of each real atom's molecule
        mixed = torch.bmm(hidden, neighbours).reshape(-1, k * c)  # Σ_j u_ij[k] h_j[c]
        adj = graph.adj[real].to(h.dtype)  # (R, N)
        summed = torch.bmm(adj[:, None, :], neighbours).squeeze(1)  # Σ_j h_j
        messages = mixed @ weight + summed @ last.bias.view(c, c)
        degree = adj.sum(-1, keepdim=True).clamp(min=1)
        return messages / degree + self.root(h[real])


class DenseSet2Set(nn.Module):
    """PyG's ``Set2Set(C, processing_steps)`` over the real atoms of padded molecules."""

    def __init__(self, channels: int = 64, steps: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.steps = steps
        self.lstm = nn.LSTMCell(2 * channels, channels)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b = h.shape[0]
        state = (h.new_zeros(b, self.channels), h.new_zeros(b, self.channels))
        q_star = h.new_zeros(b, 2 * self.channels)
        for _ in range(self.steps):
            state = self.lstm(q_star, state)
            q = state[0]
            scores = (h * q[:, None]).sum(-1).masked_fill(~mask, float("-inf"))
            attention = torch.softmax(scores, dim=1)
            q_star = torch.cat([q, (attention[..., None] * h).sum(1)], dim=-1)
        return q_star


class MPNNEncoder(nn.Module):
    """Packed molecules (B, 29, 4) → shared features (B, 64) (Gilmer et al.'s MPNN)."""

    def __init__(
        self,
        dropout: float = 0.0,
        channels: int = 64,
        rounds: int = 3,
        set2set_steps: int = 3,
        cutoff: float | None = None,
        eval_chunk: int = 250,
    ) -> None:
        super().__init__()
        self.rounds = rounds
        self.cutoff = cutoff
        self.eval_chunk = eval_chunk
        self.lin0 = nn.Linear(N_NODE_FEATURES, channels)
        self.conv = DenseNNConv(channels, N_EDGE_FEATURES, 128)
        self.gru = nn.GRUCell(channels, channels)
        self.set2set = DenseSet2Set(channels, set2set_steps)
        self.dropout = nn.Dropout(dropout)
        self.lin1 = nn.Linear(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and x.shape[0] > self.eval_chunk:  # bound eval memory
            return torch.cat([self(part) for part in x.split(self.eval_chunk)])
        x = x[:, (x[..., 0] > 0).any(0)]  # drop the slots that are padding in every molecule
        graph = molecular_graph(x, self.cutoff)
        # the mask is (B, N): its nonzero indices are a pair
        real = cast(tuple[Tensor, Tensor], graph.mask.nonzero(as_tuple=True))
        h_real = F.relu(self.lin0(graph.node[real]))  # (R, C): node states of the real atoms
        hidden = self.conv.edge_hidden(graph, real)
        for _ in range(self.rounds):
            m = F.relu(self.conv(self._pad(h_real, graph, real), hidden, graph, real))
            h_real = self.gru(m, h_real)
        pooled = self.set2set(self._pad(h_real, graph, real), graph.mask)
        return F.relu(self.lin1(self.dropout(pooled)))

    @staticmethod
    def _pad(h_real: Tensor, graph: MolecularGraph, real: tuple[Tensor, Tensor]) -> Tensor:
        b, n = graph.mask.shape
        return h_real.new_zeros(b, n, h_real.shape[-1]).index_put(real, h_real)


# --------------------------------------------------------------------------- the problem


def _identity(batch: Batch) -> Batch:
    return batch


@register_problem("qm9", TRACKS)
class QM9(Problem):
    """QM9 with the ``mlp`` or ``gnn`` model track (see the module docstring).

    ``data_dir``/``cache``/``download``: as :func:`mtopt.problems.qm9_data.load_qm9`;
    ``qm9``: arrays to use instead (tests); ``n_test``/``n_val``/``split_seed``: the split;
    ``train_size``: keep only the first molecules of the (shuffled) training split;
    ``cutoff``: GNN distance cutoff in Å (None: complete graph).
    """

    def __init__(
        self,
        track: str = "mlp",
        data_dir: str | Path | None = None,
        cache: str | Path | None = None,
        download: bool = True,
        n_test: int = N_TEST,
        n_val: int = N_VAL,
        split_seed: int = SPLIT_SEED,
        train_size: int | None = None,
        cutoff: float | None = None,
        qm9: QM9Arrays | None = None,
    ) -> None:
        if track not in TRACKS:
            raise ValueError(f"unknown QM9 track {track!r}; valid: {list(TRACKS)}")
        self.track = track
        self.name = f"qm9/{track}"
        self.scaler = TargetScaler()
        self.tasks = tuple(make_task(k, t, self.scaler) for k, t in enumerate(TARGETS))
        self.data_dir = data_dir
        self.cache = Path(cache) if cache is not None else None
        self.download = download
        self.n_test, self.n_val, self.split_seed = n_test, n_val, split_seed
        self.train_size = train_size
        self.cutoff = cutoff
        self._data = qm9
        self._injected = qm9 is not None
        self._splits: dict[str, Split] | None = None

    def data(self) -> QM9Arrays:
        if self._data is None:
            self._data = load_qm9(self.data_dir, self.cache, self.download)
        return self._data

    def inputs(self, data: QM9Arrays, train: np.ndarray) -> np.ndarray:
        """``x`` of every molecule: standardised descriptors (mlp) or packed atoms (gnn)."""
        if self.track == "gnn":
            return pack_atoms(data.z, data.pos)
        folder = None if self._injected else (self.cache or cache_dir())
        descriptors = cached_descriptors(data, folder).astype(np.float64)
        mean = descriptors[train].mean(axis=0)
        std = descriptors[train].std(axis=0)
        return ((descriptors - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)

    def splits(self) -> dict[str, Split]:
        if self._splits is None:
            data = self.data()
            indices = split_indices(len(data), self.n_test, self.n_val, self.split_seed)
            if self.train_size is not None:
                indices["train"] = indices["train"][: self.train_size]
            self.scaler.fit(data.targets)
            x = self.inputs(data, indices["train"])
            y = self.scaler.standardise(data.targets)
            self._splits = {
                name: Split(
                    {
                        "x": torch.from_numpy(x[idx]),
                        "y": y[idx],
                        "target": torch.from_numpy(data.targets[idx]),
                        "index": torch.from_numpy(data.index[idx].astype(np.int64)),
                    },
                    _identity,
                )
                for name, idx in indices.items()
            }
        return self._splits

    def make_model(
        self, tasks: Sequence[str] | None = None, dropout: float = 0.0
    ) -> MultiTaskModel:
        names = self.model_tasks(tasks)
        encoder: nn.Module = (
            MPNNEncoder(dropout, cutoff=self.cutoff) if self.track == "gnn" else MLPEncoder(dropout)
        )
        return MultiTaskModel(encoder, {name: nn.Linear(64, 1) for name in names})
