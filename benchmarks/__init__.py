"""Benchmarks for vijax: speed against NumPyro SVI and a hand-written JAX loop (the floor).

Run ``python -m benchmarks.bench_core [--quick] [--out DIR]``; see ``benchmarks/README.md``.
"""
