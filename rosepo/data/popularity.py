"""Item popularity in the train split, which negatives sampling, the most-popular baseline and the
popularity metrics all count the same way."""

from __future__ import annotations

from pathlib import Path

from rosepo.data.samples import read_split


def train_popularity(samples_dir: str | Path) -> dict[str, int]:
    """Interaction count of each item in the train split (each train user's full sequence once).

    Counted from train samples: the items of the longest window per user plus its target are
    not the full sequence, so we count each (user, item) seen as history or target once.
    """
    t = read_split(samples_dir, "train")
    seen: set[tuple[str, str]] = set()
    for u, hist, tgt in zip(t.column("user_id").to_pylist(), t.column("history_item_ids").to_pylist(),
                            t.column("target_item_id").to_pylist()):
        seen.update((u, i) for i in hist)
        seen.add((u, tgt))
    counts: dict[str, int] = {}
    for _, i in seen:
        counts[i] = counts.get(i, 0) + 1
    return counts
