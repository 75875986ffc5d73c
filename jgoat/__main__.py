"""`python -m jgoat` / `jgoat`: the command line (see jgoat.cli)."""

import sys

from jgoat.cli import main

if __name__ == "__main__":
    sys.exit(main())
