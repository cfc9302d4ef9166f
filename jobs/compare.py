"""The comparison of every method over seeds as one Ray job: ``rosepo compare`` from a checkout.

    python jobs/compare.py --config configs/ml100k-tiny.yaml [--seeds 3] [--methods dpo,rosepo]
    ray job submit --working-dir . -- python jobs/compare.py --config configs/ml100k-tiny.yaml

The stages before alignment are built once, or reused, through the pipeline; each method × seed
is aligned and evaluated once (a resubmitted job skips finished cells). Results go to
``<storage>/<run name>/compare-<hash>``: table.md, results.json, metrics.png, eps.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a plain checkout too
from rosepo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
