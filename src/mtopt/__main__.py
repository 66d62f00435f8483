"""``python -m mtopt`` (and ``torchrun ... -m mtopt train ...``): the command line."""

import sys

from mtopt.cli import main

sys.exit(main())
