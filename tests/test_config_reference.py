"""docs/configuration.md is tools/config_reference.py's output, and that output documents every
config key: its type, bounds, default and the ``#:`` comment above its field in rosepo/config.py."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rosepo.config import RunConfig
from tools.config_reference import COMMAND, render

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "configuration.md"


def _rows(text: str) -> dict[str, list[str]]:
    """Dotted key -> the cells (type, default, description) of its table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert cells[0] not in rows, f"{cells[0]} documented twice"
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _flat(data: dict) -> dict:
    """A config's plain data by dotted key (the top level's mappings are its sections)."""
    return {f"{name}.{k}" if isinstance(section, dict) else name: v
            for name, section in data.items()
            for k, v in (section.items() if isinstance(section, dict) else [(None, section)])}


def test_the_committed_reference_is_current():
    """The committed file equals the generator's output; the failure says how to regenerate it."""
    text = render()
    committed = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    if committed != text:
        diff = difflib.unified_diff(committed.splitlines(True), text.splitlines(True), "docs/configuration.md",
                                    "generated")
        pytest.fail("docs/configuration.md does not match rosepo/config.py: regenerate it, from the repository "
                    f"root, with\n    {COMMAND}\n" + "".join(list(diff)[:60]))


def test_the_regenerate_command_writes_the_reference():
    """``python -m tools.config_reference``, run from the checkout, prints the reference."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tools.config_reference"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render()


def test_every_key_has_one_row_with_its_default():
    """One row per key of `RunConfig` (sft and align with the training loop's keys), whose default
    cell reads back, as YAML, to the default value."""
    rows = _rows(render())
    defaults = _flat(RunConfig().to_dict())
    assert set(rows) == set(defaults)
    for key, (_, default, _) in rows.items():
        assert yaml.safe_load(default.strip("`")) == defaults[key], key
    assert rows["sft.learning_rate"][1] == "`0.001`" and rows["align.learning_rate"][1] == "`0.0005`"


def test_rows_show_choices_bounds_and_the_fields_comment():
    """Choices of a `Literal`, bounds of a `Range` with its note, the ``#:`` comment in Markdown;
    an inherited field carries its base class's comment in both sections."""
    rows = _rows(render())
    assert rows["align.loss"][0] == "one of `rosepo`, `dpo`, `cdpo`, `sdpo`, `sdpo_smoothed`, `ipo`"
    assert rows["data.max_train_windows_per_user"][0] == "int >= 0 (0 = all)"
    assert rows["model.lora_dropout"][0] == "float >= 0 and < 1"
    assert rows["pairs.eval_samples"][2] == ("Valid samples turned into held-out pairs (eval metrics during "
                                             "alignment and Tune; 0 = all).")
    assert rows["align.reference"][2] == "`precomputed` (from pair rows) or `online` (adapter disabled)."
    for section in ("sft", "align"):
        assert rows[f"{section}.max_grad_norm"][2] == "Gradient clipping norm (0 = no clipping)."
