"""Write the configuration reference (docs/configuration.md) from `rosepo.config` itself: one
section per config dataclass, its docstring, and for each key its type or choices, bounds (the
field's `Range`), default and the ``#:`` comment above the field.

    python -m tools.config_reference > docs/configuration.md

tests/test_config_reference.py fails, naming that command, when the committed file differs.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from rosepo import config
from rosepo.config import Range, RunConfig, TrainConfig

COMMAND = "python -m tools.config_reference > docs/configuration.md"

INTRO = f"""\
# Configuration reference

<!-- Generated from rosepo/config.py by `{COMMAND}`:
     edit the comments there, not this file. -->

A run is configured by one YAML file (`configs/` holds examples) and `key=value` overrides with
dotted keys, e.g. `rosepo run --config configs/ml100k-tiny.yaml align.beta=0.2`. A key left out
keeps its default below. The config is checked when it is loaded, before any work starts: an
unknown key, a wrong type, a value out of bounds or settings that cannot work together stop the
command with one line naming the key and what it expects.
`rosepo config show --config FILE [key=value ...]` prints the resolved config as YAML.

Types: *list* is a YAML list, *mapping* a YAML mapping; *one of* lists the accepted values.
"""


def class_comments(source: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Class name -> (its docstring, field name -> the ``#:`` comment lines right above the field)."""
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                i, above = stmt.lineno - 2, []
                while i >= 0 and lines[i].strip().startswith("#:"):
                    above.insert(0, lines[i].strip()[2:].strip())
                    i -= 1
                fields[stmt.target.id] = " ".join(above)
        out[node.name] = (ast.get_docstring(node) or "", fields)
    return out


def markdown(text: str) -> str:
    """reStructuredText's ````literal```` as Markdown's ```literal```."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def inline(value: Any) -> str:
    """``value`` as one line of YAML, as a config file or a ``key=value`` override writes it."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).removesuffix(
        "...\n").strip()


def type_text(tp: Any) -> str:
    """The type or choices of an annotation, then its `Range` bounds: ``int >= 0 (0 = all)``."""
    bounds = []
    if typing.get_origin(tp) is Annotated:
        tp, *bounds = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        text = "one of " + ", ".join(f"`{inline(c)}`" for c in typing.get_args(tp))
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):  # bool | None: "bool or null"
        text = " or ".join("null" if a is type(None) else type_text(a) for a in typing.get_args(tp))
    else:
        text = {tuple: "list", dict: "mapping"}.get(tp, getattr(tp, "__name__", str(tp)))
    return " ".join([text, *(b.text().removeprefix("must be ") for b in bounds if isinstance(b, Range))])


def table(cls: type, prefix: str, fields: list, comments: dict) -> list[str]:
    """The Markdown table of ``fields`` of ``cls``; a field's comment is the first one found up
    its class hierarchy (an override without a comment keeps the base class's)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in fields:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        note = next((comments[k.__name__][1][f.name] for k in cls.__mro__
                     if comments.get(k.__name__, ("", {}))[1].get(f.name)), "")
        cells = (f"`{prefix}{f.name}`", type_text(hints[f.name]), f"`{inline(value)}`", markdown(note))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def render() -> str:
    """The whole of docs/configuration.md."""
    comments = class_comments(Path(config.__file__).read_text(encoding="utf-8"))
    hints = typing.get_type_hints(RunConfig)
    sections = [f for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]
    top = [f for f in dataclasses.fields(RunConfig) if f not in sections]
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    out = [INTRO, "Sections: [top level](#top-level) · " + " · ".join(f"[`{f.name}`](#{f.name})" for f in sections),
           "", "## Top level", "", markdown(comments["RunConfig"][0]), "",
           *table(RunConfig, "", top, comments)]
    for f in sections:
        cls = hints[f.name]
        fields = dataclasses.fields(cls)
        out += ["", f"## `{f.name}`", "", f"`{cls.__name__}`: {markdown(comments[cls.__name__][0])}", ""]
        if issubclass(cls, TrainConfig):
            out += [*table(cls, f.name + ".", [x for x in fields if x.name not in shared], comments), "",
                    f"**Training loop** (`TrainConfig`, the same keys in `sft` and `align`): "
                    f"{markdown(comments['TrainConfig'][0])}", "",
                    *table(cls, f.name + ".", [x for x in fields if x.name in shared], comments)]
        else:
            out += table(cls, f.name + ".", fields, comments)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
