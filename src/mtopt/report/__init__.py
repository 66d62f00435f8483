"""Figures and tables from stored run records (matplotlib is an optional extra: ``mtopt[plot]``)."""
