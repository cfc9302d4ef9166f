"""Prompt templates, in two styles; within a style, one template chosen deterministically per sample.

``paraphrase`` (the default): three paraphrased sentences with quoted, comma-separated titles,
for pretrained LLMs, which should not learn one fixed wording. ``list``: one title per line under
``History:`` and ``Candidates:``, no quotes; 37% fewer tokens than ``paraphrase`` with the tiny
model's title tokens (67 against 107 on ML-100K), and unambiguous for any tokenizer, since no
title holds a newline.

Every template ends with "Answer:"; the answer is the exact target title, tokenised after it
(see `rosepo.model.tokenize`).
"""

from __future__ import annotations

import hashlib

TEMPLATES = (
    "The user watched these movies in order: {history}. "
    "Candidates: {candidates}. Which candidate will the user watch next? Answer:",
    "Viewing history, oldest first: {history}. "
    "Choose the one movie the user will watch next from: {candidates}. Answer:",
    "A user has seen {history}. "
    "From the candidates {candidates}, recommend the single next movie. Answer:",
)

LIST_TEMPLATE = "History:\n{history}\nCandidates:\n{candidates}\nAnswer:"

#: ``data.prompt_style`` -> its templates.
STYLES = {"paraphrase": TEMPLATES, "list": (LIST_TEMPLATE,)}


def stable_int(*parts: object) -> int:
    """A 64-bit integer from the sha256 of the parts; stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def choose_template(sample_id: str, seed: int, style: str = "paraphrase") -> int:
    """Index of the template of ``style`` for a sample, from its id and the seed."""
    return stable_int("template", seed, sample_id) % len(STYLES[style])


def render_prompt(template_id: int, history_titles: list[str], candidate_titles: list[str],
                  style: str = "paraphrase") -> str:
    """Render a template: quoted titles for ``paraphrase`` (quotes keep commas inside titles
    unambiguous), one title per line for ``list``."""
    if style == "list":
        return LIST_TEMPLATE.format(history="\n".join(history_titles), candidates="\n".join(candidate_titles))
    return TEMPLATES[template_id].format(
        history=", ".join(f'"{t}"' for t in history_titles),
        candidates=", ".join(f'"{t}"' for t in candidate_titles),
    )
