"""Rejected-sampling strategies: which candidates of a prompt become the rejected answers.

Each strategy is a pure function ``(ctx: SampleContext, k: int, rng) -> list[int]`` returning the
indices of ``k`` distinct candidates, never the target. The context carries what the strategies
score with, computed once per sample by the pair builder:

- ``self_hard`` (helpfulness): the SFT model's most likely wrong candidates, by summed answer
  log-likelihood (RosePO §3.2: the model's own confusions are the most informative negatives);
  optionally its greedy answer first when that is a valid wrong candidate.
- ``semantic`` (against semantic hallucination): the wrong candidates most similar to the history
  under a text embedding of the titles.
- ``popularity`` (against popularity bias): the most popular wrong candidates by train count, or,
  with ``alpha > 0``, sampled with probability ∝ count^alpha.
- ``random``: uniform wrong candidates (the DPO baseline of S-DPO / RosePO).

A new strategy is one function added to `STRATEGIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class SampleContext:
    """What strategies see of one sample (all arrays have one entry per candidate)."""

    target: int
    #: SFT (reference) model's summed answer log-likelihood per candidate.
    model_scores: np.ndarray | None = None
    #: Cosine similarity of each candidate title to the history.
    similarity: np.ndarray | None = None
    #: Train-split interaction count per candidate.
    popularity: np.ndarray | None = None
    #: Index of the candidate the model's greedy answer names, or -1.
    greedy: int = -1
    popularity_alpha: float = 0.0
    extra: dict = field(default_factory=dict)


def _top_wrong(values: np.ndarray, target: int, k: int) -> list[int]:
    """Indices of the k largest values except the target; ties broken by lower index."""
    order = np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=np.float64)))
    return [int(i) for i in order if i != target][:k]


def self_hard(ctx: SampleContext, k: int, rng: np.random.Generator) -> list[int]:
    """The model's k most likely wrong candidates (its greedy answer first when it is wrong and valid)."""
    if ctx.model_scores is None:
        raise ValueError("self_hard needs the SFT model's candidate scores")
    ranked = _top_wrong(ctx.model_scores, ctx.target, len(ctx.model_scores))
    if ctx.greedy >= 0 and ctx.greedy != ctx.target:
        ranked = [ctx.greedy] + [i for i in ranked if i != ctx.greedy]
    return ranked[:k]


def semantic(ctx: SampleContext, k: int, rng: np.random.Generator) -> list[int]:
    """The k wrong candidates most similar to the history."""
    if ctx.similarity is None:
        raise ValueError("semantic needs candidate-history similarities")
    return _top_wrong(ctx.similarity, ctx.target, k)


def popularity(ctx: SampleContext, k: int, rng: np.random.Generator) -> list[int]:
    """The k most popular wrong candidates, or (alpha > 0) k drawn ∝ (count + 1)^alpha without replacement."""
    if ctx.popularity is None:
        raise ValueError("popularity needs candidate train counts")
    if ctx.popularity_alpha <= 0:
        return _top_wrong(ctx.popularity, ctx.target, k)
    idx = np.array([i for i in range(len(ctx.popularity)) if i != ctx.target])
    # +1 keeps never-seen items drawable
    w = (np.asarray(ctx.popularity, dtype=np.float64)[idx] + 1.0) ** ctx.popularity_alpha
    return [int(i) for i in rng.choice(idx, size=k, replace=False, p=w / w.sum())]


def random(ctx: SampleContext, k: int, rng: np.random.Generator) -> list[int]:
    """k uniform wrong candidates."""
    n = len(next(a for a in (ctx.model_scores, ctx.similarity, ctx.popularity) if a is not None))
    idx = np.array([i for i in range(n) if i != ctx.target])
    return [int(i) for i in rng.choice(idx, size=k, replace=False)]


STRATEGIES: dict[str, Callable[[SampleContext, int, np.random.Generator], list[int]]] = {
    "self_hard": self_hard,
    "semantic": semantic,
    "popularity": popularity,
    "random": random,
}


def assign_strategy(ratios: dict[str, float], u: float) -> str:
    """Pick a strategy for a sample from a uniform draw ``u`` in [0, 1) and the configured ratios."""
    names = sorted(ratios)
    weights = np.array([ratios[n] for n in names], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"strategy ratios must be >= 0 with a positive sum, got {ratios}")
    edges = np.cumsum(weights / weights.sum())
    return names[int(np.searchsorted(edges, u, side="right").clip(max=len(names) - 1))]
