"""``mtopt``: train | compare | sweep | report | bench | toy | methods | data.

The CLI owns the terminal (tables, progress bars); the library prints nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from mtopt.cli.parser import build_parser

__all__ = ["build_parser", "main", "user_error"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line. A mistake of the user's (a bad option or file, missing or damaged
    data, an unusable run store) is one line on stderr and exit status 2; ``--debug`` shows the
    traceback instead."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = logging.DEBUG if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("mtopt").setLevel(level)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mtopt: interrupted (finished runs are kept; run the command again to resume)",
              file=sys.stderr)  # fmt: skip
        return 130
    except BrokenPipeError:  # `mtopt methods | head`: the reader left, nothing to report
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter closes it
        return 0
    except Exception as exc:  # anticipated ones become one line; anything else is a bug
        message = user_error(exc)
        if message is None or debug:
            raise
        print(f"mtopt: error: {message}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an anticipated error, ``None`` for a bug (a traceback)."""
    import sqlite3

    from pydantic import ValidationError

    from mtopt.core.hparams import describe_fields
    from mtopt.errors import MtoptError

    if isinstance(exc, ValidationError):
        text = describe_fields(exc)
    elif isinstance(exc, MtoptError | ValueError | FileNotFoundError | NotADirectoryError):
        text = str(exc)
    elif isinstance(exc, PermissionError):
        text = _permission(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    elif isinstance(exc, sqlite3.Error):
        text = f"run store error: {exc} (move the store aside, or use another one)"
    else:
        return None
    return " ".join(text.split()) or type(exc).__name__


def _permission(exc: PermissionError) -> str:
    """A refused read says so (a file there that this user cannot read); otherwise a write was
    refused, and the fix is another folder."""
    import os

    name = exc.filename
    if name is None:
        return f"permission denied: {exc}"
    if os.path.isfile(name) and not os.access(name, os.R_OK):
        return f"permission denied: cannot read {name} (give yourself read access to it)"
    return f"permission denied: {name} (use a folder you can write to)"
