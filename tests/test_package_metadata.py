"""What a user takes the package's terms and citation from: LICENSE, CITATION.cff and
pyproject.toml agree, and each is well formed."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: sha256 of the Apache License 2.0 as apache.org publishes it (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_the_apache_2_text_under_the_authors_copyright():
    """LICENSE is one copyright line, then the standard Apache-2.0 text unchanged; pyproject and
    CITATION.cff name the same license."""
    head, text = (REPO / "LICENSE").read_text(encoding="utf-8").split("\n", 1)
    assert head == "Copyright 2026 The rosepo authors"
    assert hashlib.sha256(text.encode()).hexdigest() == APACHE_2_SHA256
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))["license"] == "Apache-2.0"


def test_citation_cff_is_cff_1_2_0_with_the_rosepo_paper():
    """CITATION.cff parses as YAML with CFF 1.2.0's required keys (cff-version as a string, message,
    title, authors each a person or an entity), and references the RosePO paper on arXiv."""
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert all(isinstance(cff[key], str) and cff[key].strip() for key in ("message", "title"))
    assert cff["authors"] and all("family-names" in a or "name" in a for a in cff["authors"])
    (paper,) = [r for r in cff["references"] if r["title"].startswith("RosePO:")]
    assert paper["type"] == "article" and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]] == ["Liao", "He", "Xie", "Wu", "Yuan", "Sun", "Kang", "Wang"]
    assert paper["doi"] == "10.48550/arXiv.2410.12519" and paper["url"] == "https://arxiv.org/abs/2410.12519"


def test_python_version_floor_is_the_same_for_pip_and_ruff():
    """``requires-python`` (3.11: the pinned pandas needs it) and ruff's target version agree."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
