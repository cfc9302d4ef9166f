"""``python -m rosepo``: the ``rosepo`` command, where the console script is not installed (a
checkout on ``PYTHONPATH``, as on an offline GPU machine)."""

import sys

from rosepo.cli import main

sys.exit(main())
