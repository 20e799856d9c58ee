"""``python -m ContrastiveSegLib``: the command line (see :mod:`ContrastiveSegLib.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
