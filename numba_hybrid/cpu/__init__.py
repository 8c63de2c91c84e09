"""Numba CPU kernels, one module per op family, and the CPU backend driving them."""
