"""Prompt templates: several paraphrases, one chosen deterministically per sample.

Every template ends with "Answer:"; the answer is the exact target title, tokenised after a
space (see `rosepo.model.tokenize`).
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


def stable_int(*parts: object) -> int:
    """A 64-bit integer from the sha256 of the parts; stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def choose_template(sample_id: str, seed: int) -> int:
    """Index of the template for a sample, from its id and the seed."""
    return stable_int("template", seed, sample_id) % len(TEMPLATES)


def render_prompt(template_id: int, history_titles: list[str], candidate_titles: list[str]) -> str:
    """Render a template with quoted titles (quotes keep commas inside titles unambiguous)."""
    return TEMPLATES[template_id].format(
        history=", ".join(f'"{t}"' for t in history_titles),
        candidates=", ".join(f'"{t}"' for t in candidate_titles),
    )
