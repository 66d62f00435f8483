"""``python -m mtopt.cli``: the command line (as ``mtopt``)."""

from mtopt.cli import main

raise SystemExit(main())
