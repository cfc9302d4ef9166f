"""Prompt templates per domain (``data.domain``): the default is the original movie wording."""

from __future__ import annotations

import hashlib

import pytest

from rosepo.config import DataConfig, load_config
from rosepo.data.prompts import DOMAINS, TEMPLATES, check_domain, choose_template, render_prompt
from rosepo.errors import ConfigError


def test_default_domain_is_movies_with_the_original_templates():
    """sha256 of main's TEMPLATES (a939892): samples built with the default config, and so their
    content hash, are unchanged by the domains."""
    assert DataConfig().domain == "movies" and TEMPLATES is DOMAINS["movies"]
    assert hashlib.sha256("\n".join(TEMPLATES).encode()).hexdigest() == \
        "506a51731c55a0aa3c6613f6ebccba1d34a11adc290d43c2f9691f4eb9662b49"


def test_every_domain_has_the_same_number_of_templates_all_ending_with_answer():
    assert {len(t) for t in DOMAINS.values()} == {len(TEMPLATES)}
    assert all(t.endswith("Answer:") for ts in DOMAINS.values() for t in ts)


@pytest.mark.parametrize("domain, word, absent", [("books", "book", "movie"), ("artists", "artist", "movie"),
                                                   ("movies", "movie", "book")])
def test_rendered_prompts_name_the_domain(domain, word, absent):
    for tid in range(len(TEMPLATES)):
        text = render_prompt(tid, ['"A"', "B"], ["C", "D"], domain)
        assert word in text and absent not in text and text.endswith("Answer:")
    assert choose_template("u1:000004", 0) == choose_template("u1:000004", 0)


def test_unknown_domain_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="'data.domain' must be one of movies, books, artists, got 'films'"):
        check_domain("films")
    with pytest.raises(ConfigError, match="data.domain"):
        render_prompt(0, ["A"], ["B"], "films")
    assert load_config(None, ["data.domain=books"]).data.domain == "books"
