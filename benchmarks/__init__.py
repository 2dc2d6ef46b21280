"""Benchmark harness for fade: fade beside ProcessPoolExecutor, raw pyzmq and optional peers.

Run ``python benchmarks/bench.py --smoke``; see ``benchmarks/README.md``.
"""
