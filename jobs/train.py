"""The whole rosepo pipeline as one Ray job: ``rosepo run`` from a checkout.

    python jobs/train.py --config configs/ml100k-tiny.yaml            # embedded local Ray
    ray job submit --working-dir . -- python jobs/train.py --config configs/ml100k-tiny.yaml

Stages (rosepo/pipeline.py): samples → oracle → model → sft → pairs → align → eval. Each
stage's output is addressed by a hash of the config it depends on, so a rerun — or a
resubmitted job with the same run name — skips finished stages and resumes an interrupted one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a plain checkout too
from rosepo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
