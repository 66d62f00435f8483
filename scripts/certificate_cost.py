"""Time each inner solver's certificate check alone (the check after the solve), per call, at K.

    OMP_NUM_THREADS=1 python scripts/certificate_cost.py [--k 11] [--repeat 2000]

The inputs are a random K-task Gram matrix (40 columns) and each solver's own answer on it; the
time is the median of ``--repeat`` calls of the check, on one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mtopt.core import ball_maxmin as bm
from mtopt.core import equal_projection
from mtopt.core.min_norm import min_norm_residual, min_norm_weights
from mtopt.core.qp import box_lower_qp_batch, kkt_residual


def _time(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> int:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    k = args.k
    G = rng.normal(size=(k, 40)) * np.exp(rng.normal(size=(k, 1)))
    M = G @ G.T
    rows = []
    w = min_norm_weights(M).weights
    rows.append(("min-norm KKT (mgda, mgda_ub, edm, cdtt)", lambda: min_norm_residual(M, w)))
    res = bm.ball_maxmin(M, 0.5)
    b = M.sum(1) / k
    n0 = float(np.sqrt(b.sum() / k))
    rows.append(("CAGrad duality gap", lambda: bm._gap(M, b, n0, 0.5 * n0, res.weights, res.dual)))
    nash = sys.modules["mtopt.methods.nash_mtl"]
    alpha = nash.nash_weights(M).alpha
    active = np.ones(k, dtype=bool)
    rows.append(("Nash-MTL max abs(α(Mα) − 1)", lambda: nash._residual(M, alpha, active)))
    wi, _, _ = equal_projection.imtl_g_weights(torch.from_numpy(M))
    wi = wi.numpy()
    rows.append(("IMTL-G projection spread", lambda: equal_projection._status_and_spread(M, wi)))
    aligned = sys.modules["mtopt.methods.aligned_mtl"]
    mt = torch.from_numpy(M / M.diagonal().max())
    vals, vecs = torch.linalg.eigh(mt)
    rows.append(("Aligned-MTL eigh backward error", lambda: aligned._eigh_residual(mt, vals, vecs)))
    tr = M / np.trace(M) + 1e-4 * np.eye(k)
    qp = box_lower_qp_batch(tr, np.diag(np.full(k, 1.0 / k)))
    neg_q = -(np.diag(np.full(k, 1.0 / k)) @ tr)
    x = qp.solutions - np.diag(np.full(k, 1.0 / k))
    rows.append(("UPGrad KKT residual (K QPs)", lambda: kkt_residual(tr, neg_q, x)))
    print(f"K = {k}, median µs per check over {args.repeat} calls:")
    for name, fn in rows:
        print(f"  {name:45s} {_time(fn, args.repeat):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
