"""MovieLens title normalisation as the LLM-rec literature (LLaRA, S-DPO) does it."""

from __future__ import annotations

import re

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(?P<body>.*), (?P<art>The|A|An)$")


def normalize_title(title: str) -> str:
    """Strip a trailing " (YYYY)" and move a trailing ", The" / ", A" / ", An" to the front.

    >>> normalize_title("Usual Suspects, The (1995)")
    'The Usual Suspects'
    """
    t = _YEAR.sub("", title.strip()).strip()
    m = _ARTICLE.match(t)
    if m:
        t = f"{m['art']} {m['body']}"
    return " ".join(t.split())
