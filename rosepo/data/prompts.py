"""Prompt templates, in two styles and per domain; one template chosen deterministically per sample.

``paraphrase`` (the default): three paraphrased sentences with quoted, comma-separated titles,
for pretrained LLMs, which should not learn one fixed wording. ``list``: one title per line under
``History:`` and ``Candidates:``, no quotes; 37% fewer tokens than ``paraphrase`` with the tiny
model's title tokens (67 against 107 on ML-100K), and unambiguous for any tokenizer, since no
title holds a newline.

``data.domain`` names what the items are ("movies", "books", "artists"), so that a paraphrase
prompt over a music catalog does not ask which movie the user will watch (``list`` names no
domain). Every domain has as many templates as the others, so a sample's template index does
not depend on the domain, and the movie templates are the original ones: the default samples
are byte for byte what they were.

Every template ends with "Answer:"; the answer is the exact target title, tokenised after it
with no space (see `rosepo.model.tokenize`).
"""

from __future__ import annotations

import hashlib

from rosepo.errors import ConfigError

DOMAINS: dict[str, tuple[str, ...]] = {
    "movies": (
        "The user watched these movies in order: {history}. "
        "Candidates: {candidates}. Which candidate will the user watch next? Answer:",
        "Viewing history, oldest first: {history}. "
        "Choose the one movie the user will watch next from: {candidates}. Answer:",
        "A user has seen {history}. "
        "From the candidates {candidates}, recommend the single next movie. Answer:",
    ),
    "books": (
        "The user read these books in order: {history}. "
        "Candidates: {candidates}. Which candidate will the user read next? Answer:",
        "Reading history, oldest first: {history}. "
        "Choose the one book the user will read next from: {candidates}. Answer:",
        "A user has read {history}. "
        "From the candidates {candidates}, recommend the single next book. Answer:",
    ),
    "artists": (
        "The user listened to these artists in order: {history}. "
        "Candidates: {candidates}. Which candidate will the user listen to next? Answer:",
        "Listening history, oldest first: {history}. "
        "Choose the one artist the user will listen to next from: {candidates}. Answer:",
        "A user has listened to {history}. "
        "From the candidates {candidates}, recommend the single next artist. Answer:",
    ),
}
#: The default domain's paraphrase templates.
TEMPLATES = DOMAINS["movies"]

LIST_TEMPLATE = "History:\n{history}\nCandidates:\n{candidates}\nAnswer:"

#: ``data.prompt_style`` -> its templates (of the default domain; every domain has as many).
STYLES = {"paraphrase": TEMPLATES, "list": (LIST_TEMPLATE,)}


def check_domain(domain: str) -> None:
    """Refuse a ``data.domain`` that has no templates, naming the ones that do."""
    if domain not in DOMAINS:
        raise ConfigError(f"config key 'data.domain' must be one of {', '.join(DOMAINS)}, got {domain!r}")


def stable_int(*parts: object) -> int:
    """A 64-bit integer from the sha256 of the parts; stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def choose_template(sample_id: str, seed: int, style: str = "paraphrase") -> int:
    """Index of the template of ``style`` for a sample, from its id and the seed."""
    return stable_int("template", seed, sample_id) % len(STYLES[style])


def render_prompt(template_id: int, history_titles: list[str], candidate_titles: list[str],
                  style: str = "paraphrase", domain: str = "movies") -> str:
    """Render a template: quoted titles for ``paraphrase`` in the wording of ``domain`` (quotes
    keep commas inside titles unambiguous), one title per line for ``list``."""
    check_domain(domain)
    if style == "list":
        return LIST_TEMPLATE.format(history="\n".join(history_titles), candidates="\n".join(candidate_titles))
    return DOMAINS[domain][template_id].format(
        history=", ".join(f'"{t}"' for t in history_titles),
        candidates=", ".join(f'"{t}"' for t in candidate_titles),
    )
