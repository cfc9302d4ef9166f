"""Label noise: flipping pairs on purpose, the false negatives the data has, and the ROC AUC that
says how well ε finds either; values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rosepo.pairs.noise import false_negatives, flip_labels, later_positions, roc_auc


def _row(k: int) -> dict:
    return {"pair_id": f"u{k}:000005:self_hard", "chosen": f"T{k}", "rejected": [f"R{k}", f"S{k}"],
            "chosen_index": 0, "rejected_index": [1, 2], "oracle_chosen": 2.0, "oracle_rejected": [-1.0, -2.0],
            "ref_chosen_logp": -0.5, "ref_rejected_logp": [-3.0, -4.0], "chosen_ids": [7, 2],
            "rejected_ids": [[8, 2], [9, 2]], "strategy": "self_hard"}


def test_flip_labels_swaps_exactly_the_share_asked_and_everything_of_each_answer():
    rows = [_row(k) for k in range(10)]
    out = flip_labels(rows, 0.3, seed=0)
    flipped = [r for r in out if r["flipped"]]
    assert len(flipped) == 3 and [r["pair_id"] for r in out] == [r["pair_id"] for r in rows]
    k = int(flipped[0]["pair_id"][1:].split(":")[0])
    assert flipped[0] | {"flipped": False} == {
        **_row(k), "chosen": f"R{k}", "rejected": [f"T{k}", f"S{k}"], "chosen_index": 1, "rejected_index": [0, 2],
        "oracle_chosen": -1.0, "oracle_rejected": [2.0, -2.0], "ref_chosen_logp": -3.0,
        "ref_rejected_logp": [-0.5, -4.0], "chosen_ids": [8, 2], "rejected_ids": [[7, 2], [9, 2]], "flipped": False}
    assert all(r == {**rows[i], "flipped": False} for i, r in enumerate(out) if not r["flipped"])
    # Seeded by pair id: the same pairs in any order; another seed, other pairs; rate 0, none.
    again = flip_labels(rows[::-1], 0.3, seed=0)
    assert {r["pair_id"] for r in again if r["flipped"]} == {r["pair_id"] for r in flipped}
    assert {r["pair_id"] for r in flip_labels(rows, 0.3, seed=1) if r["flipped"]} != {r["pair_id"] for r in flipped}
    assert not any(r["flipped"] for r in flip_labels(rows, 0.0, seed=0))


def test_false_negatives_are_rejected_items_the_user_consumes_later():
    """User u consumes A at positions 3 and 5, B at 4, C at 6 (the targets of its samples).
    At position 4 a rejected A is consumed later (at 5); at position 5 it is not (5 is not later);
    C at 6 is later than 5. Prepared LLaRA samples hold no position: unknown."""
    later = later_positions(["u:000003", "u:000004", "u:000005", "u:000006", "train:0000001"],
                            ["u", "u", "u", "u", "train:0000001"], ["A", "B", "A", "C", "X"])
    assert later == {"u": {"A": 5, "B": 4, "C": 6}}
    assert false_negatives("u:000004", "u", ["A"], later) is True
    assert false_negatives("u:000005", "u", ["A"], later) is False
    assert false_negatives("u:000005", "u", ["B", "C"], later) is True
    assert false_negatives("train:0000001", "train:0000001", ["X"], later) is None


def test_roc_auc_by_hand():
    """Positives score 0.35 and 0.8, negatives 0.1 and 0.4: of the 4 (positive, negative) pairs the
    positive is higher in 3 (0.35 < 0.4 is the miss), AUC 0.75. A tie counts a half; one class
    alone has no AUC."""
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.2], [True, False, False]) == pytest.approx(0.75)  # (0.5 tie + 1) / 2
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))
