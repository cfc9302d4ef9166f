"""Prompt styles: the paraphrased sentences (default) and one title per line."""

from __future__ import annotations

import pytest

from rosepo.config import load_config
from rosepo.data.prompts import STYLES, choose_template, render_prompt
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
