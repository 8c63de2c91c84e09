"""``python -m numba_hybrid``: the same as the ``numba-hybrid`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
