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

from rosepo.config import (COLUMN_NAMES, STRATEGY_NAMES, DataFormat, Domain, Dtype, Embedder, Loss, PromptStyle,
                           Range, RunConfig, Split, TimestampUnit, config_hash, load_config, set_dotted)
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
    assert load_config() == RunConfig().validate()  # validation fills the stages' use_gpu from the run's
    cfg = load_config(REPO / "configs" / "ml100k-tiny.yaml")
    assert isinstance(cfg, RunConfig)


def test_file_then_overrides_and_coercion(tmp_path):
    """Overrides win over the file; int -> float and list -> tuple are the only conversions."""
    path = write(tmp_path, "align:\n  beta: 0.2\n  eps_max: 0.25\ndata:\n  split: [0.5, 0.25, 0.25]\n")
    cfg = load_config(path, ["align.beta=1", "data.split=[1, 0, 0]", "data.split=[0.5, 0.3, 0.2]",
                             "sft.num_workers=3"])
    assert cfg.align.beta == 1.0 and isinstance(cfg.align.beta, float)
    assert cfg.align.eps_max == 0.25
    assert cfg.data.split == (0.5, 0.3, 0.2)
    assert cfg.sft.num_workers == 3


@pytest.mark.parametrize("text", ["", "# nothing\n", "\n  \n# a\n\n", "\ufeff"])
def test_empty_file_refused(tmp_path, text):
    """A file with no settings once ran the defaults (downloading MovieLens, building samples):
    most likely the wrong file, or one not saved yet. Leaving out --config runs the defaults."""
    with pytest.raises(ConfigError, match=r"config file .*run\.yaml holds no settings .*leave out --config"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text,message", [
    ("align:\n  beta: 0.1\nsft:\n  epochs: 1\nalign:\n  loss: dpo\n", "key 'align' appears twice (lines 1 and 5)"),
    ("# run\nalign:\n  beta: 0.1\n  loss: dpo\n  beta: 0.3\n", "key 'align.beta' appears twice (lines 3 and 5)"),
    ("data:\n  columns: {user_id: u, user_id: v}\n", "key 'data.columns.user_id' appears twice (lines 2 and 2)"),
    ("data:\n  llara:\n    - a: 1\n      a: 2\n", "key 'data.llara[0].a' appears twice (lines 3 and 4)"),
])
def test_duplicate_keys_refused_naming_the_key_and_both_lines(tmp_path, text, message):
    """A key given twice once loaded with the later value, the earlier dropped without a word."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config file {path}: {message}; keep one"


def test_duplicate_key_exits_2_through_the_cli(tmp_path, capsys):
    from rosepo.cli import main

    path = write(tmp_path, "align:\n  beta: 0.1\n  beta: 0.3\n")
    assert main(["data", "build", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"rosepo: error: config file {path}: key 'align.beta' appears twice (lines 2 and 3); keep one"


def test_utf8_bom_config_file(tmp_path):
    """A YAML saved with a byte-order mark (Windows editors) loads: PyYAML drops the mark."""
    assert load_config(write(tmp_path, "\ufeffalign:\n  beta: 0.2\n")).align.beta == 0.2


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
    ("model.item_embeddings=bert", "model.item_embeddings"),
])
def test_impossible_values(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_item_tokens_refuse_an_online_reference():
    with pytest.raises(ConfigError, match="config key 'align.reference'.*projector being trained"):
        load_config(None, ["model.item_embeddings=sasrec", "align.reference=online"])
    assert load_config(None, ["model.item_embeddings=sasrec"]).model.item_embeddings == "sasrec"


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


@pytest.mark.parametrize("name,match", [("missing.yaml", "does not exist"), (".", "is a directory")])
def test_config_path_not_a_file(tmp_path, name, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / name)


# --- issue 19: every value that once failed a later stage is refused at load -------------------


@pytest.mark.parametrize("overrides,key,expected", [
    (["data.split=[1, 0, 0]"], "data.split", "none may be empty"),    # once refused by the oracle, trained
    (["data.split=[0, 0.5, 0.5]"], "data.split", "none may be empty"),
    (["data.format=llara-json", "data.llara={train: t.json, valid: v.json}"], "data.llara",  # once after the oracle
     "every split"),
    (["align.strategies=[random]"], "align.strategies", "self_hard, semantic, popularity"),  # once at align
    (["pairs.strategies={self_hard: 1, semantic: 0}", "align.strategies=[semantic]"], "align.strategies",
     "ratio > 0: self_hard)"),
    (["model.lora_target_modules=[q_proj, qkv]"], "model.lora_target_modules", "lm_head"),  # once at the model stage
    # A decoy has no answer label: without the candidate or oracle term nothing would train it.
    (["sft.decoys=1", "sft.candidate_weight=0", "sft.oracle_weight=0"], "sft.decoys", "sft.candidate_weight > 0"),
    (["sft.max_steps=0", "sft.max_epochs=4"], "sft.max_epochs", "needs sft.max_steps > 0"),
    (["align.max_epochs=2"], "align.max_epochs", "needs align.max_steps > 0"),
])
def test_checks_that_need_only_the_config_refuse_at_load(overrides, key, expected):
    """Checks that once fired in a later stage but need only the config."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"config key '{key}'" in str(e.value) and expected in str(e.value), str(e.value)
    if key == "model.lora_target_modules":  # a pretrained model's layers are checked at the model stage
        load_config(None, overrides + ["model.name_or_path=some/model"])


def test_tiny_linear_layers_are_the_tiny_models(tiny_model_dir):
    from rosepo.config import TINY_LINEAR_LAYERS
    from rosepo.model.factory import model_linear_layers

    assert sorted(TINY_LINEAR_LAYERS) == model_linear_layers(tiny_model_dir)


@pytest.mark.parametrize("key,value,expected", [
    ("eval.split", "tst", "'train', 'valid', 'test'"),                 # once failed at the eval stage, the last
    ("model.dtype", "fp16", "'auto', 'float32', 'bfloat16'"),          # once at SFT
    ("oracle.hidden_size", 33, "multiple of oracle.num_heads (2)"),    # once at the oracle stage, after SFT
    ("pairs.embedder", "word2vec", "'minilm', 'tfidf'"),               # once at the pairs stage
    ("eval.max_samples", -1, "must be >= 0 (0 = all)"),
    ("align.smoothing_lambda", -1, "must be > 0"),                      # once silently ε ≡ 0
    ("data.format", "xlsx", "'csv', 'parquet', 'llara-json'"),         # once only after Ray started
    ("data.eval_windows_per_user", -1, "must be >= 0 (0 = all)"),      # once kept all windows but the first
    ("data.max_train_windows_per_user", -1, "must be >= 0 (0 = all)"),
    ("model.hidden_size", 36, "even quotient"),                        # head_dim 9: rotary needs pairs
    ("model.max_position_embeddings", 500, "max_prompt_tokens + model.max_answer_tokens (560)"),
    ("sft.offload", True, "needs zero_stage"),                         # with sft.zero_stage=0 below
    ("pairs.strategies", {"self_hard": -1.0}, "ratios >= 0"),
    ("data.delimiter", "::", "one character"),
])
def test_issue_19_values_refused_at_load(tmp_path, key, value, expected):
    """Each value loads from a YAML file and is refused there, naming the key, the value and
    what is expected."""
    data: dict = {"sft": {"zero_stage": 0}} if key == "sft.offload" else {}
    set_dotted(data, key, value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, yaml.safe_dump(data)))
    message = str(e.value)
    assert f"config key '{key}'" in message and expected in message and repr(value) in message, message


@pytest.mark.parametrize("text,key,expected", [
    ("sft:\n  learning_rate: 2e-4\n", "sft.learning_rate", 2e-4),    # YAML reads 2e-4 as a string
    ("align:\n  beta: 1E-1\n", "align.beta", 0.1),
    ("align:\n  beta: 1\n", "align.beta", 1.0),                       # an int for a float
    ("oracle:\n  learning_rate: '3e-3'\n", "oracle.learning_rate", 3e-3),
])
def test_float_fields_take_exponent_strings_and_ints(tmp_path, text, key, expected):
    cfg = load_config(write(tmp_path, text))
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is float
    override = load_config(None, [f"{key}={expected:g}"])
    assert getattr(getattr(override, section), name) == expected


@pytest.mark.parametrize("override", ["align.beta=2e-4x", "align.beta=.inf", "align.beta=nan", "align.beta=1e999",
                                      "sft.learning_rate=-2e-4", "sft.num_workers=2e0"])
def test_float_strings_that_are_not_finite_numbers_refused(override):
    with pytest.raises(ConfigError, match=f"config key '{override.split('=')[0]}'"):
        load_config(None, [override])


def test_name_sets_match_their_registries():
    """config.py holds each set of names (it may not import the modules above it); each
    registry of those modules must hold exactly the same names."""
    from rosepo.data.prompts import DOMAINS, STYLES
    from rosepo.data.readers import FILE_FORMATS, TIMESTAMP_UNITS
    from rosepo.data.samples import SPLITS
    from rosepo.losses import LOSSES
    from rosepo.model.factory import resolve_dtype
    from rosepo.pairs.embed import EMBEDDERS
    from rosepo.pairs.strategies import STRATEGIES
    from rosepo.schema import CATALOG, INTERACTIONS

    assert set(typing.get_args(DataFormat)) == set(FILE_FORMATS) | {"movielens-100k", "llara-json"}
    assert typing.get_args(Split) == SPLITS
    assert set(typing.get_args(TimestampUnit)) == {"auto"} | set(TIMESTAMP_UNITS)
    assert set(typing.get_args(PromptStyle)) == set(STYLES)
    assert set(typing.get_args(Domain)) == set(DOMAINS)
    assert set(typing.get_args(Embedder)) == set(EMBEDDERS)
    assert typing.get_args(Loss) == LOSSES
    assert STRATEGY_NAMES == tuple(STRATEGIES)
    assert set(COLUMN_NAMES) == set(INTERACTIONS.names) | set(CATALOG.names)
    for name in typing.get_args(Dtype):
        resolve_dtype(name, use_gpu=False)
    for name in ("fp16", "float16", "half"):
        with pytest.raises(ConfigError):
            resolve_dtype(name, use_gpu=False)


#: Values each key refuses beyond its type and declared constraints: what only a cross-field
#: or structural check catches.
SPECIAL_BAD = {
    "name": ["a/b", "..", ""], "storage": [""], "data.delimiter": ["", "::", "\n", '"'],
    "data.columns": [{"user": "uid"}, {"user_id": ""}], "data.llara": [{"tst": "x.json"}],
    "data.split": [[0.5, 0.5, 0.5], [1, 0], [1, 0, 0]], "data.max_history": [2], "data.interactions": [],
    "pairs.strategies": [{"word2vec": 1.0}, {"self_hard": 0.0}], "align.strategies": [["bogus"]],
    "compare.methods": [["bogus"]], "model.lora_target_modules": [[""], []], "model.modules_to_save": [[1]],
    "pairs.num_negatives": [20], "align.eps_max": [0.5, -0.1], "align.eps_constant": [0.5],
    "oracle.batch_size": [0], "model.num_key_value_heads": [3],
    "pairs.exclude_sft": [True],  # with sft.max_samples 0 (all) nothing is left for the pairs
    "compare.noise_rates": [[0.5], [0.2, 0.2], ["x"]],
}
WRONG_TYPE = {bool: "maybe", bool | None: "maybe", int: "many", float: "fast", str: [1], tuple: 5, dict: [1]}


def bad_values(key: str, tp: typing.Any) -> list:
    """Values ``key`` (annotated ``tp``) must refuse: one of the wrong type, one outside its
    choices or past each of its bounds, NaN and infinity for floats, and `SPECIAL_BAD`."""
    base, bounds = tp, []
    if typing.get_origin(tp) is typing.Annotated:
        base, *bounds = typing.get_args(tp)
    values = list(SPECIAL_BAD.get(key, []))
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        values += ["bogus", [1]] if isinstance(choices[0], str) else [99, -1, "two"]
    else:
        values.append(WRONG_TYPE[base])
    if base is float:
        values += [float("nan"), float("inf")]
    step = 1 if base is int else 0.5
    for b in (b for b in bounds if isinstance(b, Range)):
        values += [b.ge - step] if b.ge is not None else []
        values += [b.gt] if b.gt is not None else []
        values += [b.lt] if b.lt is not None else []
        values += [b.le + step] if b.le is not None else []
    return values


def _annotated_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    keys = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(_annotated_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = hints[f.name]
    return keys


BAD = [(key, value) for key, tp in _annotated_keys().items() for value in bad_values(key, tp)]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_every_key_refuses_its_bad_values(tmp_path, key, value):
    """Every leaf key of the config, each bad value, from a YAML file: a ConfigError naming the
    key (and, for scalars, the value)."""
    data: dict = {}
    set_dotted(data, key, value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, yaml.safe_dump(data)))
    assert f"'{key}'" in str(e.value), str(e.value)
    if not isinstance(value, (list, dict)):
        assert repr(value) in str(e.value), str(e.value)


def test_every_constrained_key_has_a_bad_value_beyond_its_type():
    """The walk above tests every declared choice and bound (a key left out would be untested)."""
    for key, tp in _annotated_keys().items():
        if typing.get_origin(tp) in (typing.Annotated, typing.Literal):
            assert len(bad_values(key, tp)) >= 2, key
    assert {k for k in SPECIAL_BAD if SPECIAL_BAD[k]} <= set(_annotated_keys())


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
         float: st.one_of(st.floats(0, 1).map(lambda x: f"{x:.3f}"), st.sampled_from(["2e-4", "1E-3", "3", "'5e-1'"])),
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


@settings(max_examples=int(os.environ.get("ROSEPO_FUZZ_EXAMPLES", "100")), deadline=timedelta(seconds=5))
@given(overrides=override_items(), bad=st.sampled_from(BAD))
def test_one_bad_value_among_random_overrides_is_named(overrides, bad):
    """Random overrides that load, plus one bad value of any key (`bad_values`): a ConfigError
    naming that key, whatever else is set."""
    key, value = bad
    others = {k: v for k, v in overrides.items() if k != key and not k.startswith(key + ".")
              and not key.startswith(k + ".")}
    items = [f"{k}={v}" for k, v in others.items()]
    try:
        load_config(None, items)
    except ConfigError:
        event("other overrides refused")
        return
    data: dict = {}
    set_dotted(data, key, value)
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    with pytest.raises(ConfigError) as e:
        load_config(None, items + [f"{key}={text}"])
    event("bad value named")
    assert f"'{key}'" in str(e.value), (items, str(e.value))
