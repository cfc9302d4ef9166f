"""rosepo's benchmarks: ``python -m bench NAME [options]`` (``make bench`` runs them all).

Kept out of the test suite: they take minutes and their numbers depend on the machine.
Results and how they were obtained are recorded in ``BENCHMARKS.md``.
"""
