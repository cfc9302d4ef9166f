"""Label noise in preference pairs: the noise rosepo adds on purpose, and the noise the data has.

Controlled noise (`flip_labels`, ``pairs.label_noise``): a seeded share of the train pairs gets
chosen and rejected swapped, with everything that belongs to each answer (title, candidate
index, token ids, the oracle's and the reference's scores), so a flipped pair is exactly the pair
a wrong label would have produced. The oracle's scores travel with their items, so on a flipped
pair the oracle usually prefers the "rejected" answer and RosePO's ε is large: how well ε tells
flipped pairs from clean ones (`roc_auc`) is the oracle's worth as a noise detector.

Natural noise (`later_positions`, `false_negatives`): a rejected candidate that the user consumes
later in their own sequence is a false negative, a preference the data itself labels wrongly.

Pure functions of rows and ids; seeded by ``stable_int``, so the same pairs flip on every run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from rosepo.data.prompts import stable_int

#: Fields of a pair row that belong to the chosen answer, and their rejected counterparts (lists,
#: one entry per rejected answer; a flip swaps the chosen one with the first rejected one).
SWAPPED = (("chosen", "rejected"), ("chosen_index", "rejected_index"), ("oracle_chosen", "oracle_rejected"),
           ("ref_chosen_logp", "ref_rejected_logp"), ("chosen_ids", "rejected_ids"))


def flip_labels(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """``rows`` (pair rows) with round(rate · N) of them flipped, the ones with the smallest seeded
    hash of their ``pair_id``; every row gets ``flipped``. Exactly that many, whatever the order."""
    count = round(rate * len(rows))
    order = sorted(rows, key=lambda r: (stable_int("label_noise", seed, r["pair_id"]), r["pair_id"]))
    chosen = {r["pair_id"] for r in order[:count]}
    return [_flip(r) if r["pair_id"] in chosen else {**r, "flipped": False} for r in rows]


def _flip(row: dict) -> dict:
    out = {**row, "flipped": True}
    for one, many in SWAPPED:
        rejected = list(row[many])
        out[one], rejected[0] = rejected[0], row[one]
        out[many] = rejected
    return out


def later_positions(sample_ids: Iterable[str], user_ids: Iterable[str], target_ids: Iterable[str]) -> dict:
    """``user -> {item: the last position at which the user consumes it}`` from the samples of a
    split, whose ids are ``<user>:<position>`` (`rosepo.data.samples`); samples whose ids hold no
    position (prepared LLaRA samples: one per "user") are left out."""
    last: dict[str, dict[str, int]] = {}
    for sample, user, item in zip(sample_ids, user_ids, target_ids):
        position = _position(sample, user)
        if position is not None:
            items = last.setdefault(user, {})
            items[item] = max(items.get(item, -1), position)
    return last


def _position(sample_id: str, user_id: str) -> int | None:
    head, _, tail = sample_id.rpartition(":")
    return int(tail) if head == user_id and tail.isdigit() else None


def false_negatives(sample_id: str, user_id: str, rejected_items: Sequence[str], later: dict) -> bool | None:
    """Whether the user consumes one of ``rejected_items`` after this sample's target (`later_positions`);
    None when the sample's id holds no position."""
    position = _position(sample_id, user_id)
    if position is None:
        return None
    items = later.get(user_id, {})
    return any(items.get(item, -1) > position for item in rejected_items)


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``positive`` rows (ties count a half):
    the probability that a random positive scores above a random negative. NaN without both kinds."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, ties at their mean
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
