"""Tests of rosepo.eval.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rosepo.errors import ConfigError, DataError
from rosepo.eval.metrics import (
    generation_metrics,
    mean_std,
    named_candidates,
    parse_answer,
    popularity_metrics,
    ranking_metrics,
)

CANDS = ["Heat", "Heat and Dust", "The Matrix", "Toy Story"]


# --- named_candidates / parse_answer -------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("Heat and Dust", [1]),              # "Heat" lies inside the longer title's span
    ("Heat", [0]),                       # the short title alone names only itself
    ("heat   AND\n dust ", [1]),         # case and whitespace runs are normalised
    ("  the MATRIX\t", [2]),
    ("I'd say The Matrix or Toy Story", [2, 3]),   # two titles named
    ("Heat and Dust, or Heat", [0, 1]),  # the second "Heat" lies outside the longer span
    ("Star Wars", []),                   # no candidate
    ("", []),
    ("Heathers", [0]),                   # plain substring, no word boundary (as LLaRA)
])
def test_named_candidates(answer, expected):
    assert named_candidates(answer, CANDS) == expected


def test_named_candidates_nested_three_deep():
    """'Heat' lies in 'Heat and Dust', which lies in 'Heat and Dust II': only the longest counts."""
    cands = ["Heat and Dust", "Heat and Dust II", "Heat"]
    assert named_candidates("Heat and Dust II", cands) == [1]


def test_named_candidates_partial_overlap_names_both():
    """Overlapping occurrences that do not contain one another both count."""
    cands = ["The Matrix", "Matrix Reloaded"]
    assert named_candidates("The Matrix Reloaded", cands) == [0, 1]


def test_named_candidates_title_whitespace_and_duplicates_and_empty():
    assert named_candidates("toy story", ["Toy  Story ", "", "TOY STORY"]) == [0, 2]


@given(st.lists(st.text(alphabet="ab ", min_size=1, max_size=6), min_size=1, max_size=5),
       st.data())
def test_exact_title_is_always_named(titles, data):
    """An answer equal to a candidate's title names that candidate: nothing longer fits in it."""
    i = data.draw(st.integers(0, len(titles) - 1))
    if titles[i].strip():
        assert i in named_candidates(titles[i], titles)


@pytest.mark.parametrize("answer, target, expected", [
    ("Heat and Dust", 1, dict(valid=True, correct=True, named_none=False, named_index=1)),
    ("Heat", 1, dict(valid=True, correct=False, named_none=False, named_index=0)),
    ("The Matrix or Toy Story", 2, dict(valid=False, correct=False, named_none=False,
                                        named_index=-1)),
    ("Star Wars", 0, dict(valid=False, correct=False, named_none=True, named_index=-1)),
])
def test_parse_answer(answer, target, expected):
    assert parse_answer(answer, CANDS, target) == expected


def test_parse_answer_rejects_out_of_range_target():
    with pytest.raises(DataError, match="outside the 4 candidates"):
        parse_answer("Heat", CANDS, 4)


# --- generation_metrics --------------------------------------------------------------------------

ANSWERS = [
    "Heat and Dust",            # valid, correct (target 1)
    "Heat",                     # valid, wrong (target 1)
    "The Matrix or Toy Story",  # two named: invalid
    "Star Wars",                # no candidate; a catalog title outside the candidates
    "I don't know",             # no candidate; no catalog title either
    " THE   matrix ",           # valid, correct (target 2)
]
TARGETS = [1, 1, 2, 0, 0, 2]
CATALOG = ["Heat", "Heat and Dust", "The Matrix", "Toy Story", "star wars", "Alien"]


def test_generation_metrics_hand_computed():
    """valid 3/6; correct 2/6; correct/valid 2/3; none 2/6; outside the candidates 1/6 (Star
    Wars); outside the catalog 1/6 (I don't know)."""
    m = generation_metrics(ANSWERS, [CANDS] * 6, TARGETS, catalog_titles=CATALOG)
    assert m["n"] == 6
    assert m["valid_ratio"] == pytest.approx(0.5)
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@1_valid"] == pytest.approx(2 / 3)
    assert m["hallucination/no_candidate"] == pytest.approx(1 / 3)
    assert m["hallucination/out_of_candidates"] == pytest.approx(1 / 6)
    assert m["hallucination/out_of_catalog"] == pytest.approx(1 / 6)


def test_generation_metrics_without_catalog_is_nan():
    m = generation_metrics(ANSWERS, [CANDS] * 6, TARGETS)
    assert math.isnan(m["hallucination/out_of_candidates"]) and math.isnan(m["hallucination/out_of_catalog"])
    assert m["hr@1"] == pytest.approx(1 / 3)


def test_generation_metrics_catalog_title_that_is_a_candidate_elsewhere_counts():
    """'Alien' is a candidate of sample 0 only; naming it in sample 1 is out of candidates."""
    cands = [["Alien", "Heat"], ["Heat", "Toy Story"]]
    m = generation_metrics(["Alien", "Alien"], cands, [0, 0], catalog_titles=["Alien", "Heat"])
    assert m["hr@1"] == pytest.approx(0.5)
    assert m["hallucination/no_candidate"] == pytest.approx(0.5)
    assert m["hallucination/out_of_candidates"] == pytest.approx(0.5)


def test_generation_metrics_no_valid_answer():
    m = generation_metrics(["nothing"], [CANDS], [0])
    assert m["hr@1_valid"] == 0.0 and m["valid_ratio"] == 0.0
    assert m["hallucination/no_candidate"] == 1.0


def test_generation_metrics_rejects_misaligned_or_empty():
    with pytest.raises(DataError, match="aligned"):
        generation_metrics(["Heat"], [CANDS, CANDS], [0])
    with pytest.raises(DataError, match="no answers"):
        generation_metrics([], [], [])


# --- ranking_metrics -----------------------------------------------------------------------------

def test_ranking_metrics_hand_computed():
    """Ranks 2, 1, 5 (all tied: pessimistic, last of 5), 3.

    hr@1 = 1/4, ndcg@1 = 1/4; hr@3 = 3/4, ndcg@3 = (1/log2 3 + 1 + 0 + 1/log2 4) / 4;
    hr@5 = 1, ndcg@5 = (1/log2 3 + 1 + 1/log2 6 + 0.5) / 4.
    """
    scores = np.array([
        [0.1, 0.9, 0.5, 0.3, 0.2],   # target 2: one higher -> rank 2
        [5.0, 4.0, 3.0, 2.0, 1.0],   # target 0 -> rank 1
        [1.0, 1.0, 1.0, 1.0, 1.0],   # target 3: four ties -> rank 5
        [0.3, 0.9, 0.8, 0.1, 0.0],   # target 0: two higher -> rank 3, 1/log2(4) = 0.5
    ])
    m = ranking_metrics(scores, [2, 0, 3, 0], ks=(1, 3, 5))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["hr@3"] == pytest.approx(0.75)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 + 0 + 0.5) / 4)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(6) + 0.5) / 4)
    assert set(m) == {"hr@1", "ndcg@1", "hr@3", "ndcg@3", "hr@5", "ndcg@5"}


def test_ranking_ties_count_against_target():
    """[0.9, 0.5, 0.5, 0.5], target 2: 1 higher + 2 tied others -> rank 4, ndcg@5 = 1/log2 5."""
    m = ranking_metrics(np.array([[0.9, 0.5, 0.5, 0.5]]), [2], ks=(3, 5))
    assert m["hr@3"] == 0.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(5))
    assert ranking_metrics(np.array([[0.5, 0.5, 0.1]]), [0], ks=(1, 2))["hr@1"] == 0.0


def test_ranking_metrics_default_ks_and_k_beyond_candidates():
    m = ranking_metrics(np.array([[0.0, 1.0]]), [0])
    assert m["hr@1"] == 0.0 and m["hr@5"] == 1.0 and m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_ranking_metrics_rejects_bad_input():
    with pytest.raises(DataError, match="NaN"):
        ranking_metrics(np.array([[np.nan, 1.0]]), [0])
    with pytest.raises(DataError, match="target indices"):
        ranking_metrics(np.array([[0.0, 1.0]]), [2])
    with pytest.raises(DataError, match="shape|\\(N, C\\)"):
        ranking_metrics(np.array([0.0, 1.0]), [0])
    with pytest.raises(ConfigError, match="positive integer"):
        ranking_metrics(np.array([[0.0, 1.0]]), [0], ks=(0,))


# --- popularity_metrics --------------------------------------------------------------------------

# Sorted counts: 0 0 5 5 10 20 30 30 40 50, so the percentile (share strictly below) is
# a .9, b .8, c .6, d .6, e .5, f .4, g .2, h .2, i 0, j 0; "z" is not in the catalog (0).
COUNTS = {"a": 50, "b": 40, "c": 30, "d": 30, "e": 20, "f": 10, "g": 5, "h": 5, "i": 0, "j": 0}
RECS = ["a", "c", None, "g", "g", "z"]
POP_TARGETS = ["b", "d", "e", "i", "j", "a"]


def test_popularity_metrics_hand_computed():
    """Head = ceil(0.2 * 10) = 2 items {a, b}; tail = the other 8.

    recs counted: a c g g z (None skipped) -> n 5; percentile (.9+.6+.2+.2+0)/5 = .38;
    head share 1/5; tail items recommended {c, g} -> coverage 2/8 (z is not in the catalog).
    targets: percentile (.8+.6+.5+0+0+.9)/6 = 2.8/6; head share {b, a} 2/6.
    """
    m = popularity_metrics(RECS, POP_TARGETS, COUNTS)
    assert m["pop/n"] == 5
    assert m["pop/percentile_rec"] == pytest.approx(0.38)
    assert m["pop/percentile_target"] == pytest.approx(2.8 / 6)
    assert m["pop/head_share_rec"] == pytest.approx(0.2)
    assert m["pop/head_share_target"] == pytest.approx(1 / 3)
    assert m["pop/tail_coverage"] == pytest.approx(0.25)


def test_popularity_head_ties_broken_by_item_id():
    """head_fraction .3 -> 3 head items; c and d tie at 30, c sorts first: head {a, b, c}.

    recs a c g g z: head share 2/5; tail {d..j} has 7 items, g recommended -> 1/7.
    """
    m = popularity_metrics(RECS, POP_TARGETS, COUNTS, head_fraction=0.3)
    assert m["pop/head_share_rec"] == pytest.approx(0.4)
    assert m["pop/head_share_target"] == pytest.approx(1 / 3)
    assert m["pop/tail_coverage"] == pytest.approx(1 / 7)


def test_popularity_head_size_is_not_inflated_by_float_error():
    """0.2 * 15 == 3.0000000000000004 in floats; the head must still have 3 items, not 4."""
    counts = {f"i{k:02d}": 100 - k for k in range(15)}   # i00 most popular
    m = popularity_metrics(["i03"], ["i02"], counts)
    assert m["pop/head_share_rec"] == 0.0 and m["pop/head_share_target"] == 1.0
    assert m["pop/tail_coverage"] == pytest.approx(1 / 12)


def test_popularity_all_invalid():
    m = popularity_metrics([None, None], ["a", "j"], COUNTS)
    assert m["pop/n"] == 0
    assert math.isnan(m["pop/percentile_rec"]) and math.isnan(m["pop/head_share_rec"])
    assert m["pop/tail_coverage"] == 0.0
    assert m["pop/percentile_target"] == pytest.approx(0.45)


def test_popularity_rejects_bad_input():
    with pytest.raises(ConfigError, match="head_fraction"):
        popularity_metrics(["a"], ["a"], COUNTS, head_fraction=1.0)
    with pytest.raises(DataError, match="empty"):
        popularity_metrics(["a"], ["a"], {})
    with pytest.raises(DataError, match="negative"):
        popularity_metrics(["a"], ["a"], {"a": -1})
    with pytest.raises(DataError, match="aligned"):
        popularity_metrics(["a"], ["a", "b"], COUNTS)


# --- mean_std ------------------------------------------------------------------------------------

def test_mean_std():
    """[1, 2, 3, 4]: mean 2.5, sample variance (2.25+.25+.25+2.25)/3 = 5/3."""
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5) and std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(DataError):
        mean_std([])
