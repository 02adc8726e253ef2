"""Throughput and memory benchmarks; results under benchmarks/results/<date>_<card>/."""
