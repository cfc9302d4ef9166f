"""Evaluation metrics: parsing free-text answers, ranking and popularity metrics.

Protocol of LLaRA / S-DPO: the model reads a user's history and C candidate titles (C = 20) and
answers with one title by greedy decoding. An answer is *valid* when it names exactly one
candidate, and *correct* when that candidate is the target; HR@1 counts correct answers over all
answers, so invalid answers count as misses.

Pure Python and numpy, so this imports anywhere; every function is a pure function of its inputs.
Keys carry no ``eval/`` prefix; the caller adds it (generation and ranking both report ``hr@1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from rosepo.data.titles import title_key
from rosepo.errors import ConfigError, DataError


def _occurrences(haystack: str, needle: str) -> list[tuple[int, int]]:
    """Every ``(start, end)`` span of ``needle`` in ``haystack``, overlapping ones included."""
    spans, start = [], haystack.find(needle)
    while start != -1:
        spans.append((start, start + len(needle)))
        start = haystack.find(needle, start + 1)
    return spans


def _named(answer: str, titles: Sequence[str]) -> list[int]:
    """Indices of the normalised ``titles`` named in the normalised ``answer`` (span rule)."""
    spans = {i: _occurrences(answer, t) for i, t in enumerate(titles) if t}
    every = [span for found in spans.values() for span in found]

    def covered(s: int, e: int) -> bool:
        # Containment is transitive, so testing against every longer occurrence (named or not)
        # is the same as testing against the occurrences of named longer titles.
        return any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2 in every)

    return [i for i, found in spans.items() if any(not covered(s, e) for s, e in found)]


def named_candidates(answer: str, candidate_titles: list[str]) -> list[int]:
    """Indices (ascending) of the candidates whose title the answer names.

    Definition. Answer and titles are normalised first by `rosepo.data.titles.title_key`, the one
    identity of titles in rosepo: runs of whitespace collapse to one space, the ends are
    stripped, and both are case-folded (``str.casefold``). A title *occurs*
    wherever it is a substring of the answer; there is no word-boundary test, as in LLaRA's
    ``title.lower() in answer.lower()``. A candidate is *named* when at least one of its
    occurrences does not lie entirely inside the span of an occurrence of a strictly longer
    candidate title.

    Why the span rule: with candidates "Heat" and "Heat and Dust", the answer "Heat and Dust"
    contains both titles, yet it names one film; plain substring matching (LLaRA) would call it
    ambiguous and hence invalid. The answer "Heat" names only "Heat", and "Heat and Dust, or
    Heat" names both (the second "Heat" lies outside the longer title's span).

    Empty titles are never named. Two candidates with the same normalised title are both named
    whenever one is, so such an answer is never valid.
    """
    return _named(title_key(answer), [title_key(t) for t in candidate_titles])


def parse_answer(answer: str, candidate_titles: list[str], target_index: int) -> dict:
    """Judge one answer against its candidates (see `named_candidates` for "named").

    Returns ``valid`` (exactly one candidate named), ``correct`` (valid and the one named is
    ``candidate_titles[target_index]``), ``named_none`` (no candidate named) and
    ``named_index`` (the index of the one named candidate when valid, else -1).
    Raises `DataError` when ``target_index`` is not an index of ``candidate_titles``.
    """
    if not 0 <= target_index < len(candidate_titles):
        raise DataError(f"target_index {target_index} is outside the "
                        f"{len(candidate_titles)} candidates")
    named = named_candidates(answer, candidate_titles)
    valid = len(named) == 1
    return {
        "valid": valid,
        "correct": valid and named[0] == target_index,
        "named_none": not named,
        "named_index": named[0] if valid else -1,
    }


def generation_metrics(answers: list[str], candidate_titles_list: list[list[str]],
                       target_indices: list[int],
                       catalog_titles: Iterable[str] | None = None) -> dict:
    """Metrics of N free-text answers, each judged by `parse_answer`.

    - ``valid_ratio``: valid answers / N.
    - ``hr@1``: correct answers / N (an invalid answer is a miss).
    - ``hr@1_valid``: correct answers / valid answers; 0.0 when no answer is valid.
    - ``hallucination/no_candidate``: answers naming no candidate / N.
    - ``hallucination/out_of_candidates``: answers that name no candidate but do name a catalog
      title that is not one of that answer's candidate titles, / N. "Name" is as in
      `named_candidates` (case-insensitive substring, whitespace normalised; the span rule cannot
      change whether *some* title is named, only which). NaN when ``catalog_titles`` is None.
      A subset of ``hallucination/no_candidate``.
    - ``hallucination/out_of_catalog``: answers that name no title of the catalog at all (an
      invented title, or no title), / N: the rest of ``hallucination/no_candidate``. NaN when
      ``catalog_titles`` is None.
    - ``n``: N.

    Raises `DataError` when N is 0, the three lists differ in length, or a target index is out
    of range.
    """
    n = len(answers)
    if n == 0:
        raise DataError("no answers to evaluate")
    if not len(candidate_titles_list) == len(target_indices) == n:
        raise DataError(f"{n} answers, {len(candidate_titles_list)} candidate lists and "
                        f"{len(target_indices)} targets: they must be aligned one per sample")
    catalog = None
    if catalog_titles is not None:
        catalog = list(dict.fromkeys(t for t in map(title_key, catalog_titles) if t))
    valid = correct = none = outside = 0
    for answer, titles, target in zip(answers, candidate_titles_list, target_indices):
        parsed = parse_answer(answer, titles, target)
        valid += parsed["valid"]
        correct += parsed["correct"]
        none += parsed["named_none"]
        if parsed["named_none"] and catalog is not None:
            text, own = title_key(answer), {title_key(t) for t in titles}
            outside += any(t in text for t in catalog if t not in own)
    return {
        "valid_ratio": valid / n,
        "hr@1": correct / n,
        "hr@1_valid": correct / valid if valid else 0.0,
        "hallucination/no_candidate": none / n,
        "hallucination/out_of_candidates": outside / n if catalog is not None else math.nan,
        "hallucination/out_of_catalog": (none - outside) / n if catalog is not None else math.nan,
        "n": n,
    }


def target_ranks(scores: np.ndarray, target_indices: Sequence[int]) -> np.ndarray:
    """1-based rank of each row's target, ties counted against it (see `ranking_metrics`)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(target_indices)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise DataError(f"scores must be (N, C) and targets (N,); got {scores.shape} and "
                        f"{targets.shape}")
    if targets.size and not (np.issubdtype(targets.dtype, np.integer)
                             and targets.min() >= 0 and targets.max() < scores.shape[1]):
        raise DataError(f"target indices must be integers in [0, {scores.shape[1]})")
    if np.isnan(scores).any():
        raise DataError("scores contain NaN")
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    # ">=" counts the target itself once, which is the "1 +".
    return (scores >= target_scores).sum(axis=1)


def ranking_metrics(scores: np.ndarray, target_indices: Sequence[int],
                    ks: Sequence[int] = (1, 5, 10)) -> dict:
    """HR@k and NDCG@k of candidate scores (N, C) with one relevant candidate per row.

    Rank of the target (1-based), ties counted against it:
    ``rank = 1 + #(others scoring > target) + #(others scoring == target)``. Pessimistic, so a
    model that scores every candidate alike ranks the target last, not first (HR@1 = 0).
    For each k: ``hr@k`` = mean of [rank <= k]; ``ndcg@k`` = mean of 1 / log2(rank + 1) if
    rank <= k else 0 (the ideal DCG of one relevant item is 1). Raises `DataError` on a shape
    mismatch, an out-of-range target, a NaN score or N = 0, and `ConfigError` for a k that is
    not a positive integer.
    """
    ranks = target_ranks(scores, target_indices)
    if ranks.size == 0:
        raise DataError("no rows to rank")
    out = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"ks: {k!r} is not a positive integer")
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    return out


def popularity_metrics(recommended_item_ids: Sequence[str | None],
                       target_item_ids: Sequence[str], train_counts: dict[str, int],
                       head_fraction: float = 0.2) -> dict:
    """Popularity bias of the recommendations, with the targets as reference.

    The catalog is the keys of ``train_counts`` (training interactions per item; items present
    with count 0 belong to it). An item missing from ``train_counts`` counts as 0 and is not in
    the catalog.

    - Popularity percentile of an item = fraction of catalog items whose count is strictly less
      than the item's count (so in [0, 1); the least popular items score 0).
    - Head items: the catalog sorted by (-count, item_id), first ceil(head_fraction * n_items);
      the others are tail items. Sorting by id makes the split deterministic under ties.

    Returns ``pop/percentile_rec`` and ``pop/percentile_target`` (mean percentile),
    ``pop/head_share_rec`` and ``pop/head_share_target`` (share that are head items),
    ``pop/tail_coverage`` (distinct tail items recommended / tail items; NaN when there are no
    tail items) and ``pop/n`` (recommendations counted).

    A None recommendation (an invalid answer) is skipped: the ``*_rec`` metrics are over the
    ``pop/n`` others (NaN when there are none). The ``*_target`` metrics are over every target,
    so they describe the test set alike for every model. Both lists must have one entry per
    sample. Raises `DataError` for an empty catalog, a negative count or misaligned lists, and
    `ConfigError` for ``head_fraction`` outside (0, 1).
    """
    if not 0 < head_fraction < 1:
        raise ConfigError(f"head_fraction must be in (0, 1), got {head_fraction!r}")
    if not train_counts:
        raise DataError("train_counts is empty: the catalog has no items")
    if any(c < 0 for c in train_counts.values()):
        raise DataError("train_counts has a negative count")
    if len(recommended_item_ids) != len(target_item_ids):
        raise DataError(f"{len(recommended_item_ids)} recommendations and "
                        f"{len(target_item_ids)} targets: they must be aligned one per sample")
    n_items = len(train_counts)
    sorted_counts = np.sort(np.fromiter(train_counts.values(), dtype=np.int64, count=n_items))
    ranked = sorted(train_counts, key=lambda item: (-train_counts[item], item))
    # round() first: 0.2 * 15 is 3.0000000000000004 in floating point, whose ceil is 4.
    head = set(ranked[:math.ceil(round(head_fraction * n_items, 9))])
    tail_size = n_items - len(head)

    def percentile(items: list[str]) -> float:
        if not items:
            return math.nan
        counts = [train_counts.get(item, 0) for item in items]
        return float((np.searchsorted(sorted_counts, counts, side="left") / n_items).mean())

    def head_share(items: list[str]) -> float:
        return sum(item in head for item in items) / len(items) if items else math.nan

    recs = [item for item in recommended_item_ids if item is not None]
    targets = list(target_item_ids)
    tail_recommended = {item for item in recs if item in train_counts and item not in head}
    return {
        "pop/percentile_rec": percentile(recs),
        "pop/percentile_target": percentile(targets),
        "pop/head_share_rec": head_share(recs),
        "pop/head_share_target": head_share(targets),
        "pop/tail_coverage": len(tail_recommended) / tail_size if tail_size else math.nan,
        "pop/n": len(recs),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of a metric across seeds.

    The std of a single value is 0.0. Raises `DataError` for no values.
    """
    if len(values) == 0:
        raise DataError("mean_std of no values")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
