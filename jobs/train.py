"""The whole rosepo pipeline as one Ray job.

    python jobs/train.py --config configs/ml100k-tiny.yaml            # embedded local Ray
    ray job submit --working-dir . -- python jobs/train.py --config configs/ml100k-tiny.yaml

Stages (rosepo/pipeline.py): samples → model → sft → oracle → pairs → align → eval. Each
stage's output is addressed by a hash of the config it depends on, so a rerun — or a
resubmitted job with the same run name — skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a plain checkout too


def main(argv: list[str] | None = None) -> int:
    from rosepo.config import load_config
    from rosepo.errors import RosepoError
    from rosepo.pipeline import GRAPH, run_dir, run_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--force", action="append", default=[], choices=list(GRAPH), help="redo a stage")
    parser.add_argument("--until", choices=list(GRAPH), help="stop after this stage")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from rosepo.train.raysetup import init_ray

        init_ray(cfg.ray_address)
        outs = run_pipeline(cfg, until=args.until, force=tuple(args.force))
    except RosepoError as e:
        print(f"rosepo: error: {e}", file=sys.stderr)
        return 2
    print(f"[rosepo] run folder: {run_dir(cfg)}")
    for stage, path in outs.items():
        print(f"[rosepo]   {stage:8s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
