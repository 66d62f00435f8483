"""QM9, offline: from the ``qm9pack`` wheel on PyPI (or a folder with its CSV files).

Source
------
QM9 (Ramakrishnan, Dral, Rupp & von Lilienfeld, "Quantum chemistry structures and properties of
134 kilo molecules", Sci. Data 1, 140022 (2014), doi:10.1038/sdata.2014.22; data CC0) holds
133,885 molecules computed at the B3LYP/6-31G(2df,p) level. Like PyG's ``QM9`` (and therefore
Nash-MTL's benchmark) we use the 130,831 molecules left once the 3,054 that failed the authors'
consistency check are removed; ``qm9pack`` ships exactly those.

The data come from the PyPI wheel ``qm9pack==1.0.3`` (MIT licence, by R. Ramakrishnan, QM9's first
author; ``https://github.com/raghurama123/qm9pack``). Importing that package fails with recent
setuptools (it needs ``pkg_resources``) and installing it would pull in pandas, so the wheel is
only fetched with ``pip download --no-deps`` and its CSV members are read with :mod:`zipfile`.
The wheel's and the members' sha256 are verified before parsing.

Resolution order (:func:`load_qm9`):

1. A user folder with ``qm9_part1.csv``, ``qm9_part2.csv``, ``qm9_part3.csv`` (the wheel's
   ``qm9pack/data`` members, or CSVs in the same format): the ``data_dir`` argument or
   ``$MTOPT_DATA``. Parsed on every call (nothing is cached).
2. mtopt's cache (``$MTOPT_CACHE`` or ``~/.cache/mtopt``): ``qm9.npz``, written on first fetch
   with its sha256 in ``qm9.npz.sha256`` and checked on every load (a damaged, unverified or
   older-format cache is moved aside and re-derived, see :mod:`mtopt.problems.cache`).
3. The wheel, fetched into ``<cache>/wheels`` by ``pip download --no-deps qm9pack==1.0.3``,
   parsed once (about half a minute) and cached as ``qm9.npz``. A cached wheel whose sha256 does
   not match is moved aside and downloaded once more.

CSV format (``qm9pack/data/qm9_part{1,2,3}.csv``, 43,610 + 43,611 + 43,610 rows, ascending
``Index``; comma-separated with double-quoted list fields; one header row). Columns:

============================= ==================================================================
``XYZ_file``                  original file name, ``"dsgdb9nsd_000001.xyz"``
``Index``                     GDB-9 index, 1 … 133,885 (3,054 missing)
``SMILES``, ``InChi``         strings (unused)
``N_atoms``                   number of atoms, 3 … 29
``Stoichiometry``             ``"[nH,nC,nN,nO,nF]"`` (checked against ``Elements``)
``Elements``                  ``"['C','H','H','H','H']"``, in the order of the coordinates
``XYZ_Ang``                   ``"[[x,y,z],...]"`` in Å (B3LYP-relaxed geometry)
``Mulliken_pop``              per-atom Mulliken charges, e (unused)
``Harmonic_Freq_cmi``         harmonic frequencies, cm⁻¹ (unused)
``RotA_GHz`` … ``RotC_GHz``   rotational constants, GHz (unused)
``Dipole_debye``              μ, D
``Polarizability_bohr3``      α, a₀³
``HOMO_au``, ``LUMO_au``      ε_HOMO, ε_LUMO, Hartree
``HOMO_LUMO_gap_au``          Δε, Hartree (unused: not one of the 11 tasks)
``R2_bohr2``                  ⟨R²⟩, a₀²
``ZPVE_au``                   zero-point vibrational energy, Hartree
``InternalEnergy_0K_au``      U0, total energy, Hartree
``InternalEnergy_298K_au``    U at 298.15 K, Hartree
``Enthalphy_298K_au``         H at 298.15 K, Hartree (sic: "Enthalphy")
``GibbsFreeEnergy_298K_au``   G at 298.15 K, Hartree
``Heatcapacity_Cv_cal_mol_K`` c_v at 298.15 K, cal/(mol K)
============================= ==================================================================

Numbers appear as ``-0.0126981359``, ``0.`` / ``18.`` (trailing dot) and ``2.1997E-6``; the
original QM9 ``.xyz`` files write exponents Mathematica-style (``2.1997*^-6``), which
:func:`parse_number` also accepts. (qm9pack's CSVs hold no ``*^`` any more: 151 coordinates carry
``E`` exponents instead.)

Targets
-------
The 11 targets are stored in PyG's units (``torch_geometric/datasets/qm9.py``,
``HAR2EV = 27.211386246``), in Gama & Grassi's order (PyG indices 0, 1, 2, 3, 5, 6, 12,
13, 14, 15, 11); see :data:`TARGETS`:

* ``mu`` = ``Dipole_debye`` (D); ``alpha`` = ``Polarizability_bohr3`` (a₀³);
  ``r2`` = ``R2_bohr2`` (a₀²); ``cv`` = ``Heatcapacity_Cv_cal_mol_K`` (cal/mol/K): unchanged.
* ``homo``, ``lumo``, ``zpve`` = the Hartree columns × 27.211386246 (eV).
* ``u0_atom``, ``u298_atom``, ``h298_atom``, ``g298_atom`` (atomisation energies, eV) =
  (total energy in Hartree − Σ over the atoms of the free-atom reference energy of the same
  quantity, :data:`ATOMREF_HARTREE`) × 27.211386246. They are negative (e.g. methane:
  U0_atom = (−40.47893 − (−37.846772 − 4·0.500273)) Ha = −0.631066 Ha = −17.17218 eV).

The reference energies are QM9's ``atomref`` table (Ramakrishnan et al. 2014, figshare file
"Atomref: Reference thermochemical energies of H, C, N, O, F atoms", figshare article 1057643;
B3LYP/6-31G(2df,p), Hartree). All 20 values were checked against PyG's ``atomrefs`` (eV,
targets 7-10 in ``torch_geometric/datasets/qm9.py``, pyg-team/pytorch_geometric): ours
× 27.211386246 match them to within 2.3·10⁻⁵ eV (relative 8·10⁻⁹, a slightly different
Hartree→eV factor on PyG's side). PyG itself takes the atomisation energies from DeepChem's
``gdb9.sdf.csv`` (kcal/mol, × 0.04336414 eV per kcal/mol; 627.509 kcal/mol per Hartree, judging
by methane); computed from the Hartree totals as here they agree to about 10⁻⁶ eV (methane:
−17.1721807 eV here, −395.999594594 kcal/mol × 0.04336414 = −17.1721819 eV in PyG).
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtopt.problems import cache as cache_files
from mtopt.problems.cache import CacheFile
from mtopt.problems.mnist_data import load_by_resolution_order
from mtopt.problems.pypi import download_wheel

QM9PACK_REQUIREMENT = "qm9pack==1.0.3"
QM9PACK_WHEEL_GLOB = "qm9pack-1.0.3-*.whl"
QM9PACK_WHEEL_SHA256 = "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0"
#: CSV members of the wheel and their sha256.
QM9PACK_MEMBERS = {
    "qm9pack/data/qm9_part1.csv": (
        "19f0a5d595462d52cd82eef3370f3e9eb55a1f52cb14985657200349568deff3"
    ),
    "qm9pack/data/qm9_part2.csv": (
        "2bca113fdc0b28a13563c80ed9b240e934f3da6c64c64fe74ddb4f0f36036e61"
    ),
    "qm9pack/data/qm9_part3.csv": (
        "9c5efb5733d2af149db8d95d36ff198b4ffed12d9f7b344220a1e5877d5c6a43"
    ),
}
CSV_NAMES = tuple(Path(member).name for member in QM9PACK_MEMBERS)
N_MOLECULES = 130_831
MAX_ATOMS = 29
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
#: Hartree → eV (CODATA 2018; PyG's ``HAR2EV``).
HARTREE_TO_EV = 27.211386246
#: Free-atom reference energies (Hartree) of U0, U(298.15 K), H(298.15 K), G(298.15 K): QM9's
#: atomref table (figshare article 1057643), keyed by atomic number.
ATOMREF_HARTREE: dict[str, dict[int, float]] = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063163, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
}
_CACHE_NAME = "qm9.npz"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Target:
    """One regression target: where it comes from and its units.

    ``stored = (csv value − Σ atomref) × to_stored`` (``atomref`` None: nothing subtracted) in
    ``unit`` (PyG's); metrics report ``stored × report_factor`` in ``report_unit``.
    """

    name: str
    column: str
    unit: str
    to_stored: float
    atomref: str | None
    report_factor: float
    report_unit: str


TARGETS: tuple[Target, ...] = (
    Target("mu", "Dipole_debye", "D", 1.0, None, 1.0, "D"),
    Target("alpha", "Polarizability_bohr3", "a0^3", 1.0, None, 1.0, "a0^3"),
    Target("homo", "HOMO_au", "eV", HARTREE_TO_EV, None, 1000.0, "meV"),
    Target("lumo", "LUMO_au", "eV", HARTREE_TO_EV, None, 1000.0, "meV"),
    Target("r2", "R2_bohr2", "a0^2", 1.0, None, 1.0, "a0^2"),
    Target("zpve", "ZPVE_au", "eV", HARTREE_TO_EV, None, 1000.0, "meV"),
    Target("u0_atom", "InternalEnergy_0K_au", "eV", HARTREE_TO_EV, "U0", 1000.0, "meV"),
    Target("u298_atom", "InternalEnergy_298K_au", "eV", HARTREE_TO_EV, "U", 1000.0, "meV"),
    Target("h298_atom", "Enthalphy_298K_au", "eV", HARTREE_TO_EV, "H", 1000.0, "meV"),
    Target("g298_atom", "GibbsFreeEnergy_298K_au", "eV", HARTREE_TO_EV, "G", 1000.0, "meV"),
    Target("cv", "Heatcapacity_Cv_cal_mol_K", "cal/mol/K", 1.0, None, 1.0, "cal/mol/K"),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)


@dataclass(frozen=True)
class Molecule:
    """One parsed CSV row: atomic numbers, positions (Å) and the 11 targets (PyG units)."""

    index: int
    z: np.ndarray
    pos: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class QM9Arrays:
    """QM9 as padded per-molecule arrays, sorted by GDB-9 index.

    ``z`` (N, 29) int8 atomic numbers (0 = padding, real atoms first), ``pos`` (N, 29, 3)
    float32 positions in Å (0 for padding), ``n_atoms`` (N,) int8, ``targets`` (N, 11) float64
    in the units of :data:`TARGETS`, ``index`` (N,) int32 GDB-9 indices. ``cache_file``: the
    verified cache file they were read from or written to (``None`` otherwise).
    """

    z: np.ndarray
    pos: np.ndarray
    n_atoms: np.ndarray
    targets: np.ndarray
    index: np.ndarray
    source: str
    cache_file: CacheFile | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    def validate(self) -> None:
        n = len(self)
        shapes = {
            "z": (self.z, (n, MAX_ATOMS), np.int8),
            "pos": (self.pos, (n, MAX_ATOMS, 3), np.float32),
            "n_atoms": (self.n_atoms, (n,), np.int8),
            "targets": (self.targets, (n, len(TARGETS)), np.float64),
            "index": (self.index, (n,), np.int32),
        }
        for key, (array, shape, dtype) in shapes.items():
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"QM9 {key} must be {dtype.__name__} {shape}, got {array.shape}")
        if not np.isin(self.z, (0, *ATOMIC_NUMBERS.values())).all():
            raise ValueError("QM9 atomic numbers must be 0 (padding) or one of H, C, N, O, F")
        real = np.arange(MAX_ATOMS)[None, :] < self.n_atoms[:, None]
        if not np.array_equal(self.z > 0, real):
            raise ValueError("QM9 atoms must fill the first n_atoms slots of every molecule")
        if not np.isfinite(self.targets).all() or not np.isfinite(self.pos).all():
            raise ValueError("QM9 targets and positions must be finite")


def parse_number(token: str) -> float:
    """A float from QM9 text: ``-0.5``, ``0.``, ``2.1997E-6`` or Mathematica's ``2.1997*^-6``."""
    return float(token.strip().replace("*^", "e"))


def parse_coordinates(field: str) -> np.ndarray:
    """``"[[x,y,z],...]"`` (Å) → ``(n, 3)`` float64."""
    tokens = field.replace("[", " ").replace("]", " ").split(",")
    values = [parse_number(t) for t in tokens if t.strip()]
    if len(values) % 3:
        raise ValueError(f"coordinates do not come in triples: {field[:80]!r}")
    return np.asarray(values, dtype=np.float64).reshape(-1, 3)


def parse_elements(field: str) -> list[str]:
    """``"['C','H','H']"`` → ``["C", "H", "H"]``."""
    symbols = [s.strip(" '\"") for s in field.strip().strip("[]").split(",")]
    return [s for s in symbols if s]


def atomisation_hartree(total: float, z: np.ndarray, kind: str) -> float:
    """``total`` (Hartree) minus the free-atom references of ``kind`` (U0, U, H or G)."""
    refs = ATOMREF_HARTREE[kind]
    return total - sum(refs[int(a)] for a in z)


def parse_row(row: dict[str, str]) -> Molecule:
    """One CSV row (as from :class:`csv.DictReader`) → :class:`Molecule`, with consistency
    checks (atom count, stoichiometry, coordinate shape)."""
    symbols = parse_elements(row["Elements"])
    n = int(row["N_atoms"])
    unknown = set(symbols) - set(ATOMIC_NUMBERS)
    if unknown or len(symbols) != n or not 0 < n <= MAX_ATOMS:
        raise ValueError(f"{row['XYZ_file']}: bad elements {symbols} for N_atoms={n}")
    pos = parse_coordinates(row["XYZ_Ang"])
    if pos.shape != (n, 3):
        raise ValueError(f"{row['XYZ_file']}: {pos.shape[0]} positions for {n} atoms")
    stoichiometry = [int(c) for c in row["Stoichiometry"].strip("[]").split(",")]
    if stoichiometry != [symbols.count(e) for e in ELEMENTS]:
        raise ValueError(f"{row['XYZ_file']}: stoichiometry {stoichiometry} ≠ {symbols}")
    z = np.array([ATOMIC_NUMBERS[s] for s in symbols], dtype=np.int64)
    targets = np.empty(len(TARGETS), dtype=np.float64)
    for k, target in enumerate(TARGETS):
        value = parse_number(row[target.column])
        if target.atomref is not None:
            value = atomisation_hartree(value, z, target.atomref)
        targets[k] = value * target.to_stored
    return Molecule(index=int(row["Index"]), z=z, pos=pos, targets=targets)


def parse_csv(lines: Iterable[str]) -> list[Molecule]:
    """Parse one qm9pack CSV (header included)."""
    reader = csv.DictReader(lines)
    missing = {"Index", "N_atoms", "Elements", "XYZ_Ang", "Stoichiometry"} | {
        t.column for t in TARGETS
    }
    missing -= set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"QM9 CSV lacks the columns {sorted(missing)}")
    return [parse_row(row) for row in reader]


def stack_molecules(molecules: Sequence[Molecule], source: str) -> QM9Arrays:
    """Padded arrays of :class:`QM9Arrays`, sorted by GDB-9 index (which must be unique)."""
    molecules = sorted(molecules, key=lambda m: m.index)
    indices = np.array([m.index for m in molecules], dtype=np.int64)
    if np.unique(indices).size != indices.size:
        raise ValueError("QM9 CSVs hold a molecule twice")
    n = len(molecules)
    z = np.zeros((n, MAX_ATOMS), dtype=np.int8)
    pos = np.zeros((n, MAX_ATOMS, 3), dtype=np.float32)
    n_atoms = np.zeros(n, dtype=np.int8)
    for i, mol in enumerate(molecules):
        k = mol.z.shape[0]
        z[i, :k] = mol.z
        pos[i, :k] = mol.pos
        n_atoms[i] = k
    arrays = QM9Arrays(
        z=z,
        pos=pos,
        n_atoms=n_atoms,
        targets=np.stack([m.targets for m in molecules]).astype(np.float64),
        index=indices.astype(np.int32),
        source=source,
    )
    arrays.validate()
    return arrays


def load_qm9(
    data_dir: str | Path | None = None, cache: str | Path | None = None, download: bool = True
) -> QM9Arrays:
    """Load QM9 by the resolution order of the module docstring."""
    return load_by_resolution_order(
        data_dir,
        "MTOPT_DATA",
        lambda folder: read_csv_dir(folder) if (folder / CSV_NAMES[0]).exists() else None,
        cache,
        _CACHE_NAME,
        read_npz,
        write_npz,
        lambda root: read_qm9pack_wheel(download_qm9pack(root)) if download else None,
        lambda folder, npz: (
            f"QM9 not found: no {CSV_NAMES[0]} in {folder!s} and no cache at "
            f"{npz}; run `mtopt data fetch qm9`"
        ),
        wanted=f"QM9's CSV files ({', '.join(CSV_NAMES)})",
    )


def download_qm9pack(cache: Path) -> Path:
    """``pip download --no-deps qm9pack==1.0.3`` into ``cache/wheels`` (~104 MB); returns the
    wheel after checking its sha256 (a damaged one is moved aside and downloaded once more)."""
    return download_wheel(
        QM9PACK_REQUIREMENT,
        cache,
        QM9PACK_WHEEL_GLOB,
        f"Alternatively put {', '.join(CSV_NAMES)} in a folder and set $MTOPT_DATA to it.",
        sha256=QM9PACK_WHEEL_SHA256,
        dataset="qm9",
    )


def read_qm9pack_wheel(wheel: Path) -> QM9Arrays:
    """Parse the CSV members of the qm9pack wheel after verifying their sha256."""
    molecules: list[Molecule] = []
    with zipfile.ZipFile(wheel) as zf:
        for member, expected in QM9PACK_MEMBERS.items():
            blob = zf.read(member)
            digest = hashlib.sha256(blob).hexdigest()
            if digest != expected:
                raise ValueError(
                    f"{wheel.name}:{member} has sha256 {digest}, expected {expected}; "
                    "refusing to parse it"
                )
            molecules += parse_csv(io.StringIO(blob.decode("ascii"), newline=""))
    arrays = stack_molecules(
        molecules, f"{QM9PACK_REQUIREMENT} (sha256 {QM9PACK_WHEEL_SHA256[:12]}…)"
    )
    if len(arrays) != N_MOLECULES:
        raise ValueError(f"{wheel.name} holds {len(arrays)} molecules, expected {N_MOLECULES}")
    return arrays


def read_csv_dir(folder: Path) -> QM9Arrays:
    """Parse the qm9pack CSVs in ``folder`` (``qm9_part1.csv`` and any of parts 2 and 3)."""
    molecules: list[Molecule] = []
    for name in CSV_NAMES:
        path = folder / name
        if path.exists():
            with path.open(newline="", encoding="ascii") as fh:
                molecules += parse_csv(fh)
    return stack_molecules(molecules, f"CSV files in {folder}")


def write_npz(path: Path, arrays: QM9Arrays) -> CacheFile:
    """Cache the arrays (compressed, written atomically, sha256 recorded in the sidecar)."""
    return cache_files.write_file(
        path,
        lambda fh: np.savez_compressed(
            fh,
            z=arrays.z,
            pos=arrays.pos,
            n_atoms=arrays.n_atoms,
            targets=arrays.targets,
            index=arrays.index,
            target_names=np.array(TARGET_NAMES),
            version=np.array(_CACHE_VERSION),
            source=np.array(arrays.source),
        ),
    )


def read_npz(path: Path) -> QM9Arrays:
    """Read a cache written by :func:`write_npz` (no pickles); ``ValueError`` for another
    format version (the loader then moves it aside and re-derives it)."""
    with np.load(path, allow_pickle=False) as npz:
        if int(npz["version"]) != _CACHE_VERSION or tuple(npz["target_names"]) != TARGET_NAMES:
            raise ValueError(f"{path} was written by another mtopt version")
        arrays = QM9Arrays(
            z=npz["z"],
            pos=npz["pos"],
            n_atoms=npz["n_atoms"],
            targets=npz["targets"],
            index=npz["index"],
            source=f"{npz['source']} (cached at {path})",
        )
    arrays.validate()
    return arrays
