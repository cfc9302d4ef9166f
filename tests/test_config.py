"""Config loading refuses every bad key, type, value, override and file with a `ConfigError`
naming the key, and the CLI turns that into one line and exit code 2, before Ray starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from rosepo.config import RunConfig, config_hash, load_config
from rosepo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def dotted_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf key of the config (``align.eps_max`` ...) and its annotated type."""
    keys = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.update(dotted_keys(tp, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = tp
    return keys


KEYS = dotted_keys()


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --- what loads --------------------------------------------------------------------------------


def test_defaults_and_shipped_config_load():
    assert load_config() == RunConfig()
    cfg = load_config(REPO / "configs" / "ml100k-tiny.yaml")
    assert isinstance(cfg, RunConfig)


def test_file_then_overrides_and_coercion(tmp_path):
    """Overrides win over the file; int -> float and list -> tuple are the only conversions."""
    path = write(tmp_path, "align:\n  beta: 0.2\n  eps_max: 0.25\ndata:\n  split: [0.5, 0.25, 0.25]\n")
    cfg = load_config(path, ["align.beta=1", "data.split=[1, 0, 0]", "sft.num_workers=3"])
    assert cfg.align.beta == 1.0 and isinstance(cfg.align.beta, float)
    assert cfg.align.eps_max == 0.25
    assert cfg.data.split == (1, 0, 0)
    assert cfg.sft.num_workers == 3


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == RunConfig()


# --- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("override,named,lists", [
    ("bogus=1", "bogus", "align, compare, data, eval, model, name"),
    ("align.bogus=1", "align.bogus", "eps_max"),
    ("data.columns_=1", "data.columns_", "columns"),
    ("sft.deepspeed.stage=1", "sft.deepspeed", "zero_stage"),
])
def test_unknown_keys_listed_with_the_known_ones(override, named, lists):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert named in str(e.value) and lists in str(e.value)


def test_unknown_keys_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) model\.hiden_size.*hidden_size"):
        load_config(write(tmp_path, "model:\n  hiden_size: 64\n"))


@pytest.mark.parametrize("text,named", [
    ("1: 2\n", "1"),                      # a YAML int key (once a TypeError)
    ("data:\n  1: 2\n  null: 3\n", "data.1"),
    ("~: 1\n", "None"),
])
def test_non_string_keys(tmp_path, text, named):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(write(tmp_path, text))
    assert named in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("sft.num_workers=two", "sft.num_workers"),
    ("sft.num_workers=2.0", "sft.num_workers"),
    ("sft.num_workers=true", "sft.num_workers"),       # a bool is no int here
    ("align.beta=[1, 2]", "align.beta"),
    ("align.beta=fast", "align.beta"),
    ("model.lora_dropout=true", "model.lora_dropout"),
    ("sft.use_gpu=1", "sft.use_gpu"),
    ("sft.use_gpu=yes please", "sft.use_gpu"),
    ("data.split=0.8", "data.split"),
    ("data.columns=[a, b]", "data.columns"),
    ("name=[1]", "name"),
    ("sft=3", "sft"),
    ("model.lora_target_modules={a: 1}", "model.lora_target_modules"),
])
def test_wrong_types(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [
    ("align.eps_max=0.5", "align.eps_max"),
    ("align.eps_max=-0.01", "align.eps_max"),
    ("align.eps_max=.nan", "align.eps_max"),
    ("align.eps_constant=0.5", "align.eps_constant"),
    ("sft.num_workers=0", "sft.num_workers"),
    ("align.num_workers=-1", "align.num_workers"),
    ("sft.zero_stage=5", "sft.zero_stage"),
    ("align.zero_stage=-1", "align.zero_stage"),
    ("sft.learning_rate=0", "sft.learning_rate"),
    ("data.split=[0.5, 0.5, 0.5]", "data.split"),
    ("data.split=[1, 0]", "data.split"),
    ("data.split=[1.2, -0.1, -0.1]", "data.split"),
    ("data.split=[a, b, c]", "data.split"),            # once a TypeError from sum()
    ("data.split=[null, 1, 0]", "data.split"),
    ("data.min_history=0", "data.min_history"),
    ("data.num_candidates=1", "data.num_candidates"),
    ("pairs.num_negatives=20", "pairs.num_negatives"),
    ("model.finetune=qlora", "model.finetune"),
    ("align.loss=kto", "align.loss"),
    ("align.beta=0", "align.beta"),
    ("align.smoothing=fancy", "align.smoothing"),
])
def test_impossible_values(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_eps_max_message_says_why():
    with pytest.raises(ConfigError, match=r"'align\.eps_max' must be in \[0, 0\.5\).*ignores which item"):
        load_config(None, ["align.eps_max=0.5"])


@pytest.mark.parametrize("overrides,match", [
    (["align.beta"], r"override 'align\.beta' is not of the form key=value"),
    (["=1"], r"override '=1': empty key"),
    (["align..beta=1"], r"override 'align\.\.beta=1': empty key"),
    (["align.=1"], r"override 'align\.=1': empty key"),
    (["sft=1", "sft.num_workers=2"], r"override 'sft\.num_workers=2': 'sft' is not a section"),
    (["sft.num_workers.x=1"], r"config key 'sft\.num_workers'"),
])
def test_malformed_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("just a string\n", "expected a mapping at the top level"),
    ("42\n", "expected a mapping at the top level"),
    ("[]\n", "expected a mapping at the top level"),     # once silently the defaults
    ("false\n", "expected a mapping at the top level"),
    ("align: [1, 2\n", "is not valid YAML"),
    ("a: b: c\n", "is not valid YAML"),
    ("align:\n\tbeta: 1\n", "is not valid YAML"),
    (b"align:\n  beta: \xff\xfe\n", "is not valid YAML"),  # not UTF-8 (once a UnicodeDecodeError)
    ("!!python/object/apply:os.system [echo hi]\n", "is not valid YAML"),
    ("sft:\n", r"config key 'sft': expected a mapping"),
])
def test_bad_files(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert "run.yaml" in str(e.value) or "'sft'" in str(e.value)


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_config_path_not_a_file(tmp_path, name):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / name)


# --- property: anything in, a RunConfig or a ConfigError out -----------------------------------

VALUES = st.one_of(
    st.integers(-3, 10).map(str), st.integers().map(str), st.floats().map(str),
    st.sampled_from(["true", "false", "null", "~", "", "[]", "{}", "[0.8, 0.1, 0.1]", "[1, 0, 0]", "[a, b, c]",
                     "[1, 2]", "{a: 1}", "{self_hard: 1.0}", "lora", "full", "rosepo", "dpo", "assign", "0.5",
                     "0.29", "1e-3", ".nan", ".inf", "-.inf", "'quoted'", "[", "{", ":", "a: b", "- x",
                     "2020-01-01", "!!python/name:os.system", "!!binary aGk=", "0x1F", "1_000"]),
    st.text(max_size=8))
OTHER_KEYS = st.one_of(st.sampled_from(["sft", "align", "data", "bogus", "align.bogus", "data.split.x", ""]),
                       st.text(max_size=10))
TYPED = {bool: st.sampled_from(["true", "false"]), int: st.integers(0, 64).map(str),
         float: st.floats(0, 1).map(lambda x: f"{x:.3f}"),
         str: st.sampled_from(["lora", "full", "rosepo", "dpo", "sdpo", "assign", "all", "constant", "x", ""]),
         tuple: st.sampled_from(["[0.8, 0.1, 0.1]", "[0.6, 0.2, 0.2]", "[q_proj]", "[]"]),
         dict: st.sampled_from(["{}", "{self_hard: 1.0}", "{user_id: uid}"])}


@st.composite
def override_items(draw) -> dict[str, str]:
    """Mostly real keys with values of their type (so that valid configs come out too), some
    with any value, some unknown keys."""
    items = {}
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)) < 8:
            key = draw(st.sampled_from(sorted(KEYS)))
            typed = draw(st.integers(0, 9)) < 8 and KEYS[key] in TYPED
            items[key] = draw(TYPED[KEYS[key]] if typed else VALUES)
        else:
            items[draw(OTHER_KEYS)] = draw(VALUES)
    return items


@settings(max_examples=int(os.environ.get("ROSEPO_FUZZ_EXAMPLES", "150")), deadline=timedelta(seconds=5))
@given(overrides=override_items(), raw=st.lists(st.text(max_size=12), max_size=1))
def test_random_overrides_give_config_or_config_error(tmp_path_factory, overrides, raw):
    """Any overrides: a validated RunConfig, which survives a YAML round trip unchanged, or a
    ConfigError; never another exception."""
    items = [f"{k}={v}" for k, v in overrides.items()] + raw
    try:
        cfg = load_config(None, items)
    except ConfigError as e:
        event(f"ConfigError: {str(e)[:20]}")
        return
    event("valid")
    assert isinstance(cfg, RunConfig)
    assert cfg.validate() is cfg
    path = tmp_path_factory.mktemp("roundtrip") / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert config_hash(load_config(path)) == config_hash(cfg)


# --- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args,named", [
    (["sft", "bogus.key=1"], "unknown config key(s) bogus;"),
    (["align", "align.eps_max=0.5"], "align.eps_max"),
    (["data", "build", "data.split=[1, 1, 1]"], "data.split"),
    (["eval", "--config", "missing.yaml"], "missing.yaml"),
])
def test_cli_config_error_is_one_line_and_exit_2(tmp_path, args, named):
    """Run in an empty folder: a refused config writes nothing (no runs/, no Ray session) and
    says one line, with no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "rosepo.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rosepo: error:")]
    assert len(errors) == 1 and named in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "Ray" not in proc.stderr, proc.stderr       # e.g. "Started a local Ray instance"
    assert list(tmp_path.iterdir()) == []
