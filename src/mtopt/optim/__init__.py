"""Base optimizers for multi-task training: Muon (with its AdamW group) and an APT-capable Adam.

The APT options (``apt=True``, ``preserve``) are EXPERIMENTAL: a reconstruction of Zhou et al.
(arXiv 2604.08939) from its abstract only; see :mod:`mtopt.optim.apt`.
"""

from mtopt.optim.adam import Adam
from mtopt.optim.muon import Muon, muon_param_groups, newton_schulz

__all__ = ["Adam", "Muon", "muon_param_groups", "newton_schulz"]
