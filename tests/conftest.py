"""Test-wide settings."""

import os

# libgomp's default spin-wait stalls every Numba parallel region for a whole scheduler
# slice when another process is runnable (the normal state of a 2-core CI box).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
