"""``python -m numba_hybrid.cli``: the same as the ``numba-hybrid`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
