"""Titles: their one notion of identity, MovieLens normalisation as the LLM-rec literature (LLaRA,
S-DPO) does it, and the check that a catalog's titles are distinct under that identity."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from rosepo.errors import DataError

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_ARTICLE = re.compile(r"^(?P<body>.*), (?P<art>The|A|An)$")
_WHITESPACE = re.compile(r"\s+")


def title_key(title: str) -> str:
    """The identity of a title: runs of whitespace collapsed to one space, the ends stripped,
    case-folded (``str.casefold``). Two titles with one key are one title everywhere: the samples
    stage (catalogs and LLaRA imports are checked against it), evaluation's answer parsing
    (`rosepo.eval.metrics`) and ``rosepo recommend``'s lookup.

    >>> title_key("  Cape   FEAR ") == title_key("cape fear")
    True
    """
    return _WHITESPACE.sub(" ", title).strip().casefold()


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


def check_distinct(items: Iterable[tuple[str, str, str, int | None]], remedy: str) -> None:
    """Refuse two items whose titles are one under `title_key`: ``items`` are ``(item id, title,
    file, row)``; an id seen again with the same title is the same item. The `DataError` names
    the second item's file and row, both ids, both titles, where the first was, and ``remedy``."""
    def named(item: str, title: str) -> str:  # LLaRA's items are their titles
        return repr(title) if item == title else f"item {item!r} titled {title!r}"

    first: dict[str, tuple] = {}
    for item, title, file, row in items:
        seen = first.setdefault(title_key(title), (item, title, file, row))
        if seen[0] != item:
            where = f"file {seen[2]}" + (f", row {seen[3]}" if seen[3] is not None else "")
            raise DataError(f"{named(item, title)} and {named(*seen[:2])} ({where}) are one title once case and "
                            f"spacing are ignored (rosepo.data.titles.title_key); {remedy}", file=file, row=row)


_YEAR_OF = re.compile(r"\((\d{4})\)\s*$")


def title_year(raw: str) -> str:
    """The trailing " (YYYY)" of a raw MovieLens title, or "" when it has none."""
    m = _YEAR_OF.search(raw.strip())
    return m[1] if m else ""


@dataclass(frozen=True)
class Listings:
    """What `movielens_listings` did to a catalog: ``merged`` maps each id of a film listed more
    than once to the film's id; ``dated`` holds the ids whose title got its year back."""

    merged: dict = field(default_factory=dict)
    dated: tuple = ()


def _id_order(item: str) -> tuple:
    """Smallest first: digit ids by their number, then the others by their text."""
    return (0, int(item), item) if item.isascii() and item.isdigit() else (1, 0, item)


def movielens_listings(ids: list[str], titles: list[str], years: list[str]) -> tuple[dict[str, str], Listings]:
    """MovieLens titles (normalised: `normalize_title` drops the year, as LLaRA does) made distinct
    under `title_key`, with each id's release year (``years``, "" when unknown):

    - ids with one title and one year are one film listed more than once (ML-100K lists 18 films
      twice, e.g. "Chasing Amy (1997)" as 246 and 268): merged into the smallest id
      (`Listings.merged`; the samples stage remaps their events, `rosepo.data.readers.merge_listings`);
    - titles that still collide are different films of one name ("Cape Fear" of 1962 and of 1991):
      each gets its year back, ``"Cape Fear (1962)"`` (`Listings.dated`; a film with no year keeps
      the bare title).

    Returns the title of every id kept (in input order) and the `Listings`.
    """
    films: dict[str, dict[str, list[str]]] = {}
    for item, title, year in zip(ids, titles, years):
        films.setdefault(title_key(title), {}).setdefault(year or "", []).append(item)
    merged, dated = {}, []
    for by_year in films.values():
        for listed in by_year.values():
            film = min(listed, key=_id_order)
            merged.update((item, film) for item in listed if item != film)
        if len(by_year) > 1:
            dated += [min(listed, key=_id_order) for year, listed in by_year.items() if year]
    out = {item: title for item, title in zip(ids, titles) if item not in merged}
    years_of = dict(zip(ids, years))
    for item in dated:
        out[item] = f"{out[item]} ({years_of[item]})"
    return out, Listings(merged, tuple(sorted(dated, key=_id_order)))
