"""Titles: normalisation as the LLM-rec literature does it, one identity, MovieLens' listings."""

import pytest

from rosepo.data.titles import check_distinct, movielens_listings, normalize_title, title_key
from rosepo.errors import DataError


@pytest.mark.parametrize("raw, expected", [
    ("Toy Story (1995)", "Toy Story"),
    ("Usual Suspects, The (1995)", "The Usual Suspects"),
    ("Little Princess, A (1995)", "A Little Princess"),
    ("American in Paris, An (1951)", "An American in Paris"),
    ("Birdcage, The", "The Birdcage"),
    ("Sex, Lies, and Videotape (1989)", "Sex, Lies, and Videotape"),  # inner comma kept
    ("  Heat   (1995) ", "Heat"),
    ("1-900 (1994)", "1-900"),
    ("Theodore Rex (1995)", "Theodore Rex"),  # 'The' prefix of a word is not an article
])
def test_normalize_title(raw, expected):
    assert normalize_title(raw) == expected


def test_title_key_is_evaluations_rule():
    """One identity of titles: whitespace collapsed, ends stripped, case-folded; the year and
    punctuation count ("Cape Fear (1962)" is not "Cape Fear")."""
    assert title_key("  Movie \t 1 ") == title_key("MOVIE 1") == "movie 1"
    assert title_key("Straße") == title_key("STRASSE")  # casefold, not lower
    assert title_key("Cape Fear (1962)") != title_key("Cape Fear")


def test_movielens_listings_merge_one_film_and_date_namesakes():
    """ML-100K's three "That Darn Cat!": 878 and 1003 (both 1997) are one film listed twice, merged
    into 878; 1444 (1965) is another film, so both remaining titles get their year. "Heat" is
    alone and keeps its bare title; a film with no year keeps the bare title too."""
    ids = ["1003", "878", "1444", "5", "7", "70"]
    titles = ["That Darn Cat!", "That darn cat!", "That Darn Cat!", "Heat", "Crash", "Crash"]
    years = ["1997", "1997", "1965", "1995", "", "1996"]
    kept, listings = movielens_listings(ids, titles, years)
    assert listings.merged == {"1003": "878"}
    assert kept == {"878": "That darn cat! (1997)", "1444": "That Darn Cat! (1965)", "5": "Heat", "7": "Crash",
                    "70": "Crash (1996)"}
    assert listings.dated == ("70", "878", "1444")
    assert len({title_key(t) for t in kept.values()}) == len(kept)


def test_check_distinct_names_both_items_rows_and_the_remedy():
    items = [("1", "Movie 1", "c.csv", 1), ("2", "Other", "c.csv", 2), ("3", "MOVIE  1", "c.csv", 3)]
    with pytest.raises(DataError, match=r"file c\.csv, row 3: item '3' titled 'MOVIE  1' and item '1' titled "
                                        r"'Movie 1' \(file c\.csv, row 1\) are one title .*; do this"):
        check_distinct(items, "do this")
    check_distinct(items[:2] + [("1", "Movie 1", "c.csv", 4)], "")  # one item named again is one item
