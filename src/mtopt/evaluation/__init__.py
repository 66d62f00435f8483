"""Δm, mean rank and friends (METHODS.md §26)."""

from mtopt.evaluation.metrics import average_ranks, delta_m, delta_m_flat, mean_rank

__all__ = ["average_ranks", "delta_m", "delta_m_flat", "mean_rank"]
