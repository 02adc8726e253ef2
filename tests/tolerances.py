"""The tests' name for the one tolerance table (mixedae_fast/tolerances.py, which the benchmarks'
correctness checks read too)."""
from mixedae_fast.tolerances import TABLE, tol  # noqa: F401
