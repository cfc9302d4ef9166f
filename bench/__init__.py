"""rosepo's benchmarks: ``python -m bench NAME [options]`` (``make bench`` runs them all).

At their defaults they take minutes and their numbers depend on the machine; the test suite runs
each at a tiny size and checks the shape of what it prints (``tests/bench/test_bench_smoke.py``).
Results and how they were obtained are recorded in ``BENCHMARKS.md``.
"""
