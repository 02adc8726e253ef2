"""Fused operations: each file holds Triton kernel(s), launchers, an autograd Function and a
pure-PyTorch ``*_reference`` with the same signature beside it (the CPU path and the tests' oracle)."""
