"""Δm, mean rank and friends (the protocol of Gama & Grassi 2025; ``docs/protocol.md``)."""

from mtopt.evaluation.metrics import average_ranks, delta_m, delta_m_flat, mean_rank

__all__ = ["average_ranks", "delta_m", "delta_m_flat", "mean_rank"]
