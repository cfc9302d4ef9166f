"""Title normalisation as the LLM-rec literature does it."""

import pytest

from rosepo.data.titles import normalize_title


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
