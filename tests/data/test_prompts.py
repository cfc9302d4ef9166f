"""Prompt styles (the paraphrased sentences, the default, and one title per line) and domains
(``data.domain``: the default is the original movie wording)."""

from __future__ import annotations

import hashlib

import pytest

from rosepo.config import DataConfig, load_config
from rosepo.data.prompts import DOMAINS, STYLES, TEMPLATES, check_domain, choose_template, render_prompt
from rosepo.errors import ConfigError


def test_paraphrase_style_quotes_titles_in_the_chosen_sentence():
    assert render_prompt(0, ["Heat", "Fargo"], ["Toy Story", "Heat and Dust"]) == (
        'The user watched these movies in order: "Heat", "Fargo". Candidates: "Toy Story", '
        '"Heat and Dust". Which candidate will the user watch next? Answer:')
    assert {choose_template(f"u:{i}", 0) for i in range(50)} == {0, 1, 2}


def test_list_style_puts_one_title_per_line():
    assert render_prompt(0, ["Heat", "Fargo"], ["Toy Story", "Heat and Dust"], "list") == (
        "History:\nHeat\nFargo\nCandidates:\nToy Story\nHeat and Dust\nAnswer:")
    assert {choose_template(f"u:{i}", 0, "list") for i in range(50)} == {0}
    assert set(STYLES) == {"paraphrase", "list"}


def test_list_style_keeps_every_title_one_token_with_title_tokens():
    """With the tiny model's title tokens, each title of a list prompt is matched whole: the
    title-token ids of the prompt are exactly its history then its candidates, in order."""
    from rosepo.model.factory import train_tokenizer

    titles = ["Heat", "Heat and Dust", "Fargo", "Toy Story", "Dust", "And Then There Were None"]
    prompts = [render_prompt(0, h, c, "list") for h, c in [
        (["Heat", "Dust"], ["Heat and Dust", "Fargo"]),
        (["And Then There Were None", "Heat"], ["Toy Story", "Dust"])]]
    tok = train_tokenizer(prompts * 5, 300, titles)
    ids = set(tok.convert_tokens_to_ids(titles))
    for p, want in zip(prompts, [["Heat", "Dust", "Heat and Dust", "Fargo"],
                                 ["And Then There Were None", "Heat", "Toy Story", "Dust"]]):
        got = [i for i in tok(p, add_special_tokens=False)["input_ids"] if i in ids]
        assert got == tok.convert_tokens_to_ids(want)


def test_unknown_prompt_style_is_refused_at_load_time():
    with pytest.raises(ConfigError, match="data.prompt_style"):
        load_config(None, ["data.prompt_style=short"])


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
        text = render_prompt(tid, ['"A"', "B"], ["C", "D"], "paraphrase", domain)
        assert word in text and absent not in text and text.endswith("Answer:")
    assert choose_template("u1:000004", 0) == choose_template("u1:000004", 0)


def test_unknown_domain_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="'data.domain' must be one of movies, books, artists, got 'films'"):
        check_domain("films")
    with pytest.raises(ConfigError, match="data.domain"):
        render_prompt(0, ["A"], ["B"], "paraphrase", "films")
    assert load_config(None, ["data.domain=books"]).data.domain == "books"


def test_list_style_is_the_same_in_every_domain():
    assert {render_prompt(0, ["A"], ["B"], "list", d) for d in DOMAINS} == {"History:\nA\nCandidates:\nB\nAnswer:"}
