"""Contracts and shared math: the Method base class, the registry, gradients, solvers."""
