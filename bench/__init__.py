"""Benchmarks: ``python -m bench kernels|train|sample|all``. Results go to ``bench/results/``."""

__all__: list[str] = []
