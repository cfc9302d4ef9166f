"""A small data set cut from MovieLens-100K: the ``--users`` users with the fewest ratings (160:
~2,500 train samples, a thirtieth of the whole), as CSV files read the way rosepo reads
MovieLens-100K (films listed twice merged, namesakes given their year), with the whole catalogue.

    python -m tools.small_movielens /tmp/small          # prints the overrides that read it
    rosepo run --config configs/ml100k-tiny.yaml $(python -m tools.small_movielens /tmp/small)

What the default recipe is measured on for a data set of another size (tests/test_small_data.py,
BENCHMARKS.md). Needs MovieLens-100K in ``data/`` (``rosepo data fetch movielens-100k``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from rosepo.config import DataConfig
from rosepo.data.samples import load_source

REPO = Path(__file__).resolve().parents[1]


def small_movielens(folder: Path, users: int = 160, data_dir: Path = REPO / "data") -> list[str]:
    """Write ``events.csv`` (the ``users`` lightest users' interactions) and ``items.csv`` (the
    catalogue) into ``folder``; returns the config overrides that read them."""
    folder.mkdir(parents=True, exist_ok=True)
    events, catalog, _ = load_source(DataConfig(data_dir=str(data_dir)))
    counts: dict[str, int] = {}
    for user in events.column("user_id").to_pylist():
        counts[user] = counts.get(user, 0) + 1
    keep = set(sorted(counts, key=lambda u: (counts[u], u))[:users])
    with open(folder / "events.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(r for r in zip(*(events.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))
                    if r[0] in keep)
    with open(folder / "items.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    return ["data.format=csv", f"data.interactions={folder / 'events.csv'}", f"data.catalog={folder / 'items.csv'}"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.small_movielens", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--users", type=int, default=160)
    a = p.parse_args(argv)
    print(" ".join(small_movielens(a.folder.resolve(), a.users)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
