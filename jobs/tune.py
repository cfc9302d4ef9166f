"""A Ray Tune search over RosePO alignment as one Ray job: ``rosepo tune`` from a checkout.

    python jobs/tune.py --config configs/ml100k-tiny.yaml --search configs/search/rosepo-small.yaml
    python jobs/tune.py --config ... --search ... --resume          # continue an interrupted search
    ray job submit --working-dir . -- python jobs/tune.py --config ... --search ...

The pairs (and the stages before them) are built once, or reused, through the pipeline; every
trial aligns on them (rosepo/experiments/tune.py). Results go to ``<storage>/<run name>/tune``: best.yaml,
trials.csv, trials.md, trials.png, and each trial's TensorBoard logs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a plain checkout too
from rosepo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
