"""Strategies pick valid wrong candidates; ε follows the documented formula and bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rosepo.pairs.embed import history_similarity, tfidf_embed
from rosepo.pairs.smoothing import eps_summary, personalized_eps, smoothing_eps
from rosepo.pairs.strategies import STRATEGIES, SampleContext, assign_strategy


def ctx(target=2):
    return SampleContext(target=target,
                         model_scores=np.array([-5.0, -1.0, -0.5, -3.0, -1.0]),
                         similarity=np.array([0.1, 0.9, 0.95, 0.3, 0.2]),
                         popularity=np.array([50, 10, 400, 300, 7]))


def test_self_hard_is_argmax_of_wrong_scores():
    # target 2 has the best score -0.5; among the rest -1.0 at 1 and 4 tie: lower index first
    assert STRATEGIES["self_hard"](ctx(), 2, np.random.default_rng(0)) == [1, 4]


def test_self_hard_prefers_wrong_greedy_answer():
    c = ctx()
    c.greedy = 3
    assert STRATEGIES["self_hard"](c, 2, np.random.default_rng(0)) == [3, 1]
    c.greedy = 2  # greedy answer is the target: ignored
    assert STRATEGIES["self_hard"](c, 1, np.random.default_rng(0)) == [1]


def test_semantic_and_popularity_argmax():
    assert STRATEGIES["semantic"](ctx(), 1, np.random.default_rng(0)) == [1]
    assert STRATEGIES["popularity"](ctx(), 2, np.random.default_rng(0)) == [3, 0]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_never_target_distinct(name):
    rng = np.random.default_rng(1)
    for target in range(5):
        c = ctx(target)
        c.popularity_alpha = 1.0
        picks = STRATEGIES[name](c, 3, rng)
        assert len(picks) == len(set(picks)) == 3 and target not in picks and all(0 <= p < 5 for p in picks)


def test_popularity_sampling_follows_counts():
    c = ctx(target=0)
    c.popularity_alpha = 1.0
    rng = np.random.default_rng(0)
    draws = np.bincount([STRATEGIES["popularity"](c, 1, rng)[0] for _ in range(4000)], minlength=5)
    # P(i) ∝ count+1 over {1,2,3,4}: 11, 401, 301, 8 of 721
    assert abs(draws[2] / 4000 - 401 / 721) < 0.03 and draws[0] == 0


def test_assign_strategy_ratios():
    ratios = {"self_hard": 1.0, "semantic": 1.0, "popularity": 2.0}
    # sorted names: popularity [0, .5), self_hard [.5, .75), semantic [.75, 1)
    assert assign_strategy(ratios, 0.0) == "popularity"
    assert assign_strategy(ratios, 0.49) == "popularity"
    assert assign_strategy(ratios, 0.5) == "self_hard"
    assert assign_strategy(ratios, 0.99) == "semantic"
    with pytest.raises(ValueError):
        assign_strategy({"random": 0.0}, 0.3)


def test_personalized_eps_hand_computed():
    """λ=0.6, τ=2, ε_max=0.4; margins (s_c − s_r) = 0, 2, −2, −100.

    0   → σ(0)=0.5      → ε = 0.6·0.5 = 0.3
    2   → σ(1)=0.731059 → ε = 0.6·0.268941 = 0.161365
    −2  → σ(−1)=0.268941→ ε = 0.6·0.731059 = 0.438635 → clipped to 0.4
    −100→ σ≈0           → 0.6 → clipped to 0.4
    """
    eps = personalized_eps(np.array([1.0, 3.0, 0.0, 0.0]), np.array([1.0, 1.0, 2.0, 100.0]),
                           lam=0.6, tau=2.0, eps_max=0.4)
    np.testing.assert_allclose(eps, [0.3, 0.6 * (1 - 1 / (1 + math.exp(-1))), 0.4, 0.4], atol=1e-9)


def test_eps_bounds_and_monotone():
    margins = np.linspace(-20, 20, 201)
    eps = personalized_eps(margins, np.zeros_like(margins), lam=1.0, tau=1.0, eps_max=0.3)
    assert eps.min() >= 0 and eps.max() <= 0.3
    assert np.all(np.diff(eps) <= 0)  # non-increasing in the oracle margin
    with pytest.raises(ValueError):
        personalized_eps(margins, margins, lam=1, tau=1, eps_max=0.5)


def test_eps_multi_negative_uses_mean():
    eps = personalized_eps(np.array([0.0]), np.array([[1.0, -1.0]]), lam=1.0, tau=1.0, eps_max=0.49)
    # mean rejected score 0 → margin 0 → ε = 1·(1 − 0.5) = 0.5, capped at ε_max = 0.49
    np.testing.assert_allclose(eps, [0.49])


def test_modes_and_summary():
    s = np.array([0.0, 1.0])
    assert smoothing_eps("none", s, s, lam=1, tau=1, eps_max=0.3, eps_constant=0.1).tolist() == [0, 0]
    assert smoothing_eps("constant", s, s, lam=1, tau=1, eps_max=0.3, eps_constant=0.1).tolist() == [0.1, 0.1]
    summary = eps_summary(np.arange(11) / 100)
    assert summary == pytest.approx({"mean": 0.05, "p10": 0.01, "p50": 0.05, "p90": 0.09})


def test_tfidf_similarity_prefers_related_titles():
    titles = ["Star Wars", "Return of the Jedi", "The Empire Strikes Back", "Star Trek: Generations",
              "Sense and Sensibility"]
    v = tfidf_embed(titles)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    sim = history_similarity(v[[0]], v[1:])
    assert int(np.argmax(sim)) == 2  # "Star Trek: Generations" shares "Star"


def test_minilm_is_a_real_semantic_embedding():
    from rosepo.pairs.embed import minilm_embed

    titles = ["Star Wars", "The Empire Strikes Back", "Sense and Sensibility", "Toy Story"]
    v = minilm_embed(titles)
    assert v.shape == (4, 384)
    sim = history_similarity(v[[0]], v[1:])
    assert int(np.argmax(sim)) == 0  # the Star Wars sequel, with no word in common


def test_tfidf_over_a_corpus_embeds_a_title_the_same_whatever_is_embedded_with_it():
    """With the IDF over a fixed corpus (the catalogue), a title's vector does not depend on which
    other titles are embedded beside it: so a split's semantic negatives do not move when another
    split's slice does. Without a corpus the IDF is the embedded titles' own."""
    corpus = ["Heat", "Heat and Dust", "Alien", "Aliens", "The Matrix"]
    pair = tfidf_embed(["Heat", "Heat and Dust"], corpus=corpus)
    more = tfidf_embed(["Alien", "Heat", "The Matrix", "Heat and Dust"], corpus=corpus)
    assert float(pair[0] @ pair[1]) == pytest.approx(float(more[1] @ more[3]), abs=1e-6)
    own_pair, own_more = tfidf_embed(["Heat", "Heat and Dust"]), tfidf_embed(["Heat", "Heat and Dust", "Alien"])
    assert float(own_pair[0] @ own_pair[1]) != pytest.approx(float(own_more[0] @ own_more[1]), abs=1e-6)
