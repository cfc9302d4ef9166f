"""Typed, documented configuration: one dataclass per stage, one `RunConfig` holding them.

Loaded from YAML (``yaml.safe_load``) and then ``key=value`` overrides with dotted keys
(``align.beta=0.2``). Unknown keys, wrong types and out-of-range values raise `ConfigError`
with the key and the remedy, at load time, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosepo.errors import ConfigError

#: Names of the rejected-sampling strategies (`rosepo.pairs.strategies.STRATEGIES`) and of the
#: trained methods of ``rosepo compare`` (`rosepo.experiments.methods.METHODS`), in their order:
#: config checks them at load time without importing the layers above it (tests/test_layering.py
#: keeps the lists equal).
STRATEGY_NAMES = ("self_hard", "semantic", "popularity", "random")
METHOD_NAMES = ("dpo", "cdpo", "sdpo", "rosepo", "rosepo-self_hard", "rosepo-semantic", "rosepo-popularity",
                "rosepo-no-smoothing", "rosepo-constant-eps")


@dataclass
class DataConfig:
    """Where interactions come from and how samples are cut from them."""

    #: ``movielens-100k`` (fetched), ``ml100k-raw`` (u.data/u.item), ``recbole`` (.inter/.item),
    #: ``parquet``, ``csv`` or ``llara-json`` (prepared samples).
    format: str = "movielens-100k"
    #: Folder for fetched data sets and the default input location.
    data_dir: str = "data"
    #: Input paths: interactions file and catalog file (ignored for ``movielens-100k``).
    interactions: str = ""
    catalog: str = ""
    #: Column mapping for csv/parquet input: canonical name -> name in the file.
    columns: dict = field(default_factory=dict)
    #: Field delimiter for ``csv`` (``"\t"`` for TSV).
    delimiter: str = ","
    #: Longest history kept (oldest dropped first).
    max_history: int = 10
    #: Windows with fewer history items are dropped.
    min_history: int = 3
    #: Candidates per sample, the target included.
    num_candidates: int = 20
    #: Fractions of users in train/valid/test.
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    #: Keep only the last N windows per user in train (0 = all); valid/test keep their last window.
    max_train_windows_per_user: int = 0
    #: Windows kept per valid/test user (the last ones).
    eval_windows_per_user: int = 5
    #: Prompt wording (`rosepo.data.prompts`): ``paraphrase`` (three quoted-list sentences) or
    #: ``list`` (one title per line; the shortest prompt, the tiny default's choice).
    prompt_style: str = "paraphrase"
    #: ``llara-json`` input: split name -> JSON file of prepared samples.
    llara: dict = field(default_factory=dict)
    #: Policies that are choices, off by default, counted in the manifest when used.
    drop_duplicates: bool = False
    drop_unknown_items: bool = False
    #: Ray Data parallelism of the grouping step (None lets Ray choose). Does not change output.
    num_partitions: int = 4


@dataclass
class ModelConfig:
    """The policy LLM: a local HF folder / hub name, or the built-in tiny Llama."""

    #: ``tiny`` builds a small Llama from config with a tokenizer trained on the data's text.
    name_or_path: str = "tiny"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 4096
    max_position_embeddings: int = 1024
    #: ``lora`` or ``full``.
    finetune: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    #: Train the embeddings and LM head too when the base model is built from scratch.
    modules_to_save: tuple = ()
    #: ``float32``, ``bfloat16`` (GPU) or ``auto`` (bf16 on GPU, fp32 on CPU).
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    #: Built-in tiny model only: every catalog title is one whole-word token of the tokenizer,
    #: so the model answers by choosing one token (item tokens, as in ID-based LLM recommenders)
    #: instead of copying a title token by token. A pretrained model's tokenizer is used as is.
    title_tokens: bool = False
    #: Built-in tiny model with title tokens: ``random`` embeddings, or ``sasrec``: the oracle's
    #: item vectors added to the title tokens' embeddings (a hybrid item token; the oracle then
    #: trains before the model is built).
    title_init: str = "random"
    #: Longest prompt in tokens; longer prompts are refused at tokenisation.
    max_prompt_tokens: int = 512
    max_answer_tokens: int = 48


@dataclass
class TrainConfig:
    """What SFT and alignment share: the distributed loop, optimiser and checkpoints."""

    #: ``lora`` or ``full``; "" inherits ``model.finetune``.
    finetune: str = ""
    num_workers: int = 2
    use_gpu: bool = False
    #: CPUs per Ray Train worker.
    cpus_per_worker: float = 1.0
    #: Path of a DeepSpeed JSON template, or "" for the package's ``rosepo/train/deepspeed/zero{stage}.json``.
    deepspeed_config: str = ""
    zero_stage: int = 2
    offload: bool = False
    micro_batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    #: Stop after this many optimiser steps (0 = epochs decide).
    max_steps: int = 0
    #: Checkpoint every N optimiser steps (0 = only at the end).
    checkpoint_every: int = 0
    max_failures: int = 0
    seed: int = 0
    #: Log to TensorBoard under the run's storage path.
    tensorboard: bool = True

    def model_config(self, model: "ModelConfig") -> "ModelConfig":
        """The model config this stage trains with: ``model`` with this stage's ``finetune``, if set."""
        return dataclasses.replace(model, finetune=self.finetune or model.finetune)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the true next item."""

    #: Train samples used: a seeded random slice (``seed``) of the users' windows (0 = all).
    max_samples: int = 0
    #: Weight of the candidate-set term: -log of the probability mass that the answer's first
    #: token puts on the candidates' first tokens (`rosepo.train.sft`). 0 = plain SFT.
    candidate_weight: float = 0.0


@dataclass
class OracleConfig:
    """The SASRec preference oracle (and conventional baseline).

    Defaults tuned on MovieLens-100K (75k train samples): 4 epochs on one worker take about
    35 s of CPU and give HR@1 ~0.43 on the 20-candidate valid/test sets (random: 0.05).
    Dropout 0: at 4 epochs nothing overfits, and dropout costs 30% of the step time on CPU.
    """

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.0
    max_len: int = 10
    epochs: int = 4
    batch_size: int = 512
    learning_rate: float = 3e-3
    num_workers: int = 1
    seed: int = 0
    #: AdamW weight decay.
    weight_decay: float = 0.0
    #: Slice of train samples used, a seeded random subset (0 = all).
    max_samples: int = 0


@dataclass
class PairsConfig:
    """Preference pairs: rejected sampling and personalised smoothing."""

    #: Mix of rejected-sampling strategies by ratio (per-sample assignment).
    strategies: dict = field(default_factory=lambda: {"self_hard": 1.0, "semantic": 1.0, "popularity": 1.0})
    #: ``assign``: one strategy per sample by ratio; ``all``: one pair per strategy per sample.
    mix: str = "assign"
    #: Rejected items per pair (K > 1 for multi-negative losses).
    num_negatives: int = 1
    #: Popularity sampling exponent; 0 picks the most popular non-target candidate.
    popularity_alpha: float = 0.0
    #: Use the SFT model's greedy answer for self_hard when it is a valid wrong title.
    self_hard_greedy: bool = False
    #: ``minilm`` (needs the embed extra) or ``tfidf``.
    embedder: str = "minilm"
    #: Valid samples turned into held-out pairs (eval metrics during alignment and Tune).
    eval_samples: int = 64
    #: Ray Data actors scoring with the SFT model.
    num_actors: int = 2
    batch_size: int = 32
    max_samples: int = 0
    seed: int = 0


@dataclass
class AlignConfig(TrainConfig):
    """Smoothed preference optimisation on the pairs."""

    #: ``rosepo``, ``dpo``, ``cdpo``, ``sdpo``, ``sdpo_smoothed`` or ``ipo``.
    loss: str = "rosepo"
    beta: float = 0.1
    #: How ε per pair is made for rosepo / sdpo_smoothed: ``personalized`` (from the oracle's scores,
    #: see rosepo.pairs.smoothing), ``constant`` (eps_constant) or ``none``. cdpo always uses
    #: eps_constant, dpo/sdpo/ipo ε = 0. Lives here, not in pairs, so that Tune can search it
    #: without rebuilding pairs.
    smoothing: str = "personalized"
    smoothing_lambda: float = 1.0
    smoothing_tau: float = 1.0
    eps_max: float = 0.3
    eps_constant: float = 0.1
    #: Weight of the NLL-on-chosen regulariser.
    sft_weight: float = 0.0
    #: ``precomputed`` (from pair rows) or ``online`` (adapter disabled).
    reference: str = "precomputed"
    prefix_sharing: bool = True
    learning_rate: float = 5e-4
    #: Evaluate on the held-out pairs every N steps (0 = only before and after training).
    eval_every: int = 0
    #: Valid samples (the first N distinct samples of the held-out pairs) also scored as
    #: recommendations at each evaluation: ``eval/rank/...`` (candidates ranked by the policy's
    #: answer log-likelihood) and, below ZeRO-3, ``eval/hr@1`` / ``eval/valid_ratio`` of greedy
    #: answers. 0 = off. Cost: one scoring pass and one greedy decoding of the slice.
    eval_rec_samples: int = 32
    #: Longest greedy answer of that evaluation, in tokens (the eval stage's ``eval.max_new_tokens``
    #: for its own evaluation).
    eval_max_new_tokens: int = 32
    #: Train only on the pairs of these rejected-sampling strategies (empty = all pairs). With
    #: ``pairs.mix: all`` every sample has one pair per strategy, so Tune can search the mix
    #: without rebuilding pairs.
    strategies: tuple = ()


@dataclass
class EvalConfig:
    """Generation and ranking evaluation."""

    split: str = "valid"
    max_samples: int = 0
    max_new_tokens: int = 32
    batch_size: int = 32
    num_actors: int = 2
    constrained: bool = False


@dataclass
class CompareConfig:
    """`rosepo compare`: which methods run, over how many seeds, for how many alignment steps.

    Hyperparameters (β, learning rate, ε_max, ...) are not here: every method trains with the
    run's ``align`` section, chosen on the valid split; see `rosepo.experiments.compare`.
    """

    #: Alignment seeds per trained method: ``align.seed``, ``align.seed + 1``, ... (the LoRA
    #: initialisation and the data order; the pairs are the same for every seed).
    seeds: int = 3
    #: Trained methods to run, names of `METHOD_NAMES` (empty = all). The baselines
    #: (random, most_popular, sasrec, sft) always run, once: they are deterministic.
    methods: tuple = ()
    #: Optimiser steps of every alignment run (``align.max_steps``), the same for every method;
    #: 0 = one epoch over one pair per train sample of the pairs.
    align_steps: int = 0


@dataclass
class RunConfig:
    """A whole rosepo run: every stage's config, and where outputs go."""

    name: str = "ml100k-tiny"
    #: Root of all stage outputs of this run.
    storage: str = "runs"
    #: Ray address: "" starts or joins a local Ray, "auto" joins a running cluster.
    ray_address: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self) -> "RunConfig":
        """Check cross-field constraints; return self. Raises `ConfigError` with the remedy."""
        _check(self.data.min_history >= 1, "data.min_history", "must be >= 1")
        _check(self.data.max_history >= self.data.min_history, "data.max_history",
               "must be >= data.min_history")
        _check(self.data.num_candidates >= 2, "data.num_candidates", "must be >= 2")
        _check(len(self.data.split) == 3 and all(isinstance(x, (int, float)) for x in self.data.split)
               and abs(sum(self.data.split) - 1) < 1e-6
               and all(x >= 0 for x in self.data.split), "data.split",
               "must be three non-negative fractions summing to 1, e.g. [0.8, 0.1, 0.1]")
        _check(self.data.prompt_style in ("paraphrase", "list"), "data.prompt_style",
               "must be 'paraphrase' or 'list'")
        _check(self.model.finetune in ("lora", "full"), "model.finetune", "must be 'lora' or 'full'")
        _check(self.model.title_init in ("random", "sasrec"), "model.title_init", "must be 'random' or 'sasrec'")
        _check(self.model.title_init == "random" or (self.model.name_or_path == "tiny" and self.model.title_tokens),
               "model.title_init", "'sasrec' needs the built-in tiny model with model.title_tokens: true")
        _check(self.sft.candidate_weight >= 0, "sft.candidate_weight", "must be >= 0 (0 = plain SFT)")
        for name in ("sft", "align"):
            t = getattr(self, name)
            _check(t.zero_stage in (0, 1, 2, 3), f"{name}.zero_stage", "must be 0, 1, 2 or 3")
            _check(t.num_workers >= 1, f"{name}.num_workers", "must be >= 1")
            _check(t.micro_batch_size >= 1 and t.grad_accum >= 1, f"{name}.micro_batch_size",
                   "micro_batch_size and grad_accum must be >= 1")
            _check(t.learning_rate > 0, f"{name}.learning_rate", "must be > 0")
            _check(t.finetune in ("", "lora", "full"), f"{name}.finetune", "must be '', 'lora' or 'full'")
        _check(0 <= self.align.eps_max < 0.5, "align.eps_max",
               "must be in [0, 0.5): at 0.5 the loss ignores which item was chosen")
        _check(0 <= self.align.eps_constant < 0.5, "align.eps_constant", "must be in [0, 0.5)")
        _check(self.align.smoothing in ("personalized", "constant", "none"), "align.smoothing",
               "must be 'personalized', 'constant' or 'none'")
        _check(self.align.smoothing_tau > 0, "align.smoothing_tau", "must be > 0")
        _check(self.pairs.mix in ("assign", "all"), "pairs.mix", "must be 'assign' or 'all'")
        _check(1 <= self.pairs.num_negatives < self.data.num_candidates, "pairs.num_negatives",
               "must be >= 1 and below data.num_candidates")
        _check(self.align.loss in ("rosepo", "dpo", "cdpo", "sdpo", "sdpo_smoothed", "ipo"),
               "align.loss", "must be one of rosepo, dpo, cdpo, sdpo, sdpo_smoothed, ipo")
        _check(self.align.beta > 0, "align.beta", "must be > 0")
        _check(self.align.reference in ("precomputed", "online"), "align.reference",
               "must be 'precomputed' or 'online'")
        _check(self.align.eval_rec_samples >= 0, "align.eval_rec_samples", "must be >= 0 (0 = off)")
        _check(self.align.eval_max_new_tokens >= 1, "align.eval_max_new_tokens", "must be >= 1")
        _check(all(isinstance(s, str) and s in STRATEGY_NAMES for s in self.align.strategies), "align.strategies",
               f"must list strategies among {', '.join(STRATEGY_NAMES)} (empty = all pairs)")
        _check(self.compare.seeds >= 1, "compare.seeds", "must be >= 1")
        _check(self.compare.align_steps >= 0, "compare.align_steps", "must be >= 0 (0 = one epoch)")
        unknown = [m for m in self.compare.methods if not isinstance(m, str) or m not in METHOD_NAMES]
        _check(not unknown, "compare.methods", f"names unknown method(s) {', '.join(map(repr, unknown))}; "
               f"methods: {', '.join(METHOD_NAMES)} (empty = all)")
        _check(len(set(self.compare.methods)) == len(self.compare.methods), "compare.methods",
               "names a method twice")
        return self

    def to_dict(self) -> dict:
        """Plain-data form (tuples as lists), for YAML/JSON and hashing."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {message}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert list->tuple and int->float."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: expected {tp}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping of {tp.__name__} fields")
        return _build(tp, value, key + ".")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)  # YAML keys may be ints, None...
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys in {prefix or 'the top level'}: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict, key: str, value: Any, *, create: bool = True) -> None:
    """Set ``data[a][b] = value`` for ``key = "a.b"``. Missing sections are created when
    ``create``; otherwise a key that is not already in ``data`` raises `ConfigError`."""
    parts = str(key).strip().split(".")
    if not all(parts):
        raise ConfigError("empty key or key part")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if create else node.get(part)
        if not isinstance(node, dict):
            raise ConfigError(f"{part!r} is not a section")
    if not create and parts[-1] not in node:
        raise ConfigError("not a config key (e.g. align.beta)")
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        try:
            set_dotted(data, key, _parse_scalar(text))
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a `RunConfig` from YAML (or the defaults) plus ``key=value`` overrides, validated."""
    import yaml

    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if data is None:  # an empty file: the defaults ("[]", "0", "false" are refused below)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    apply_overrides(data, list(overrides or []))
    return _build(RunConfig, data).validate()


def config_hash(*parts: Any) -> str:
    """Short stable hash of config sections (dataclasses or plain data), for stage addressing."""
    norm = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def apply_values(cfg: RunConfig, values: dict) -> RunConfig:
    """``cfg`` with dotted-key ``values`` set (keys a `RunConfig` does not have are refused),
    type-checked and validated like a loaded config; `ConfigError` names a bad key."""
    data = cfg.to_dict()
    for key, value in values.items():
        try:
            set_dotted(data, key, value, create=False)
        except ConfigError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    return _build(RunConfig, data).validate()
