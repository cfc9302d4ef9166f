"""Experiments over whole runs: ``rosepo compare`` (methods, running, report) and ``rosepo tune``
(search, trial, results). They drive the pipeline and start Ray; nothing below imports them."""
