"""The errors mtopt raises for a user's mistake or a damaged file: one line each, naming the
thing and the fix. The command line prints them without a traceback and exits with status 2
(``mtopt --debug ...`` shows the traceback); library users can catch :class:`MtoptError`.

``ConfigError`` and ``DataError`` are also ``ValueError`` (what a caller of a library function
expects for a bad argument); ``StoreError`` is an ``OSError`` (a file that cannot be used).
"""

from __future__ import annotations


class MtoptError(Exception):
    """Base class: a one-line message meant for the user."""


class ConfigError(MtoptError, ValueError):
    """A bad option, hyperparameter, sweep file or run configuration."""


class DataError(MtoptError, ValueError):
    """A data set that is missing, damaged, or does not match its recorded digest."""


class StoreError(MtoptError, OSError):
    """A run store that cannot be opened, written or read (locked, read-only, corrupt)."""
