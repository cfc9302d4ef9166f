"""Typed, documented configuration: one dataclass per stage, one `RunConfig` holding them.

Loaded from YAML (`read_yaml`: PyYAML's safe loader, refusing a key given twice) and then
``key=value`` overrides with dotted keys (``align.beta=0.2``). Unknown keys, wrong types and
out-of-range values raise `ConfigError` with the key, the value and what is expected, at load
time, before any work starts.

Where the checks live: a field's own constraint is declared on its annotation, as a `Literal`
of its choices or an ``Annotated[..., Range(...)]`` of its bounds; `RunConfig.validate` walks
every field for those and then checks what spans several fields. The name sets below are the one
source of each set of choices. The modules that implement them (readers, dtypes, embedders,
strategies, losses) sit above config in the layering, so config cannot import their registries;
tests/test_config.py checks that every registry holds exactly these names.

The ``#:`` comment above a field is its documentation: docs/configuration.md is generated from
these classes (``python -m tools.config_reference > docs/configuration.md``; a test keeps it current).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from rosepo.errors import ConfigError

#: ``data.format``: the fetched ``movielens-100k``, the file formats of `rosepo.data.readers.FILE_FORMATS`,
#: and ``llara-json`` (prepared samples).
DataFormat = Literal["movielens-100k", "ml100k-raw", "recbole", "csv", "parquet", "llara-json"]
#: ``data.prompt_style``: `rosepo.data.prompts.STYLES`.
PromptStyle = Literal["paraphrase", "list"]
#: ``data.domain``: `rosepo.data.prompts.DOMAINS`.
Domain = Literal["movies", "books", "artists"]
#: ``data.timestamp_unit``: ``auto`` or a key of `rosepo.data.readers.TIMESTAMP_UNITS`.
TimestampUnit = Literal["auto", "s", "ms", "us", "ns"]
#: Splits of a samples folder (`rosepo.data.samples.SPLITS`).
Split = Literal["train", "valid", "test"]
#: ``model.dtype``: the names `rosepo.model.factory.resolve_dtype` knows. No float16: the
#: DeepSpeed config rosepo writes trains in bfloat16 or float32 only.
Dtype = Literal["auto", "float32", "bfloat16"]
#: ``pairs.embedder``: `rosepo.pairs.embed.EMBEDDERS`.
Embedder = Literal["minilm", "tfidf"]
#: ``align.loss``: `rosepo.losses.LOSSES`.
Loss = Literal["rosepo", "dpo", "cdpo", "sdpo", "sdpo_smoothed", "ipo"]
#: Rejected-sampling strategies (`rosepo.pairs.strategies.STRATEGIES`).
STRATEGY_NAMES = ("self_hard", "semantic", "popularity", "random")
#: Trained methods of ``rosepo compare`` (`rosepo.experiments.methods.METHODS`), in their order.
METHOD_NAMES = ("dpo", "cdpo", "sdpo", "rosepo", "rosepo-self_hard", "rosepo-semantic", "rosepo-popularity",
                "rosepo-no-smoothing", "rosepo-constant-eps")
#: The sections with a ``use_gpu`` of their own, which the run's ``use_gpu`` fills when unset.
GPU_STAGES = ("oracle", "sft", "pairs", "align", "eval")
#: Names of the linear layers of the built-in tiny Llama (`rosepo.model.factory.linear_layer_names`),
#: the names ``model.lora_target_modules`` may give it.
TINY_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
#: Canonical column names ``data.columns`` may map (`rosepo.schema`).
COLUMN_NAMES = ("user_id", "item_id", "timestamp", "title")


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, checked by `RunConfig.validate`: ``ge <= x``, ``gt < x``,
    ``x < lt``, ``x <= le`` (each when given); ``note`` says what a special value means."""

    ge: float | None = None
    gt: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""

    def contains(self, x: Any) -> bool:
        """Whether ``x`` is a number (not a bool, not NaN) within the bounds."""
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
            return False
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))

    def text(self) -> str:
        """The bounds in words, e.g. ``must be >= 0 (0 = all)``."""
        parts = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        return "must be " + " and ".join(parts) + (f" ({self.note})" if self.note else "")


Count = Annotated[int, Range(ge=0)]
AllOrCount = Annotated[int, Range(ge=0, note="0 = all")]
Positive = Annotated[int, Range(ge=1)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Dropout = Annotated[float, Range(ge=0, lt=1)]
#: Seeds feed NumPy generators, which refuse negative seeds, and torch, which takes at most 64 bits.
Seed = Annotated[int, Range(ge=0, lt=2**63)]


@dataclass
class DataConfig:
    """Where interactions come from and how samples are cut from them."""

    #: ``movielens-100k`` (fetched), ``ml100k-raw`` (u.data/u.item), ``recbole`` (.inter/.item),
    #: ``parquet``, ``csv`` or ``llara-json`` (prepared samples).
    format: DataFormat = "movielens-100k"
    #: Folder for fetched data sets and models, and the default input location.
    data_dir: str = "data"
    #: What the items are, for the prompt templates: ``movies``, ``books`` or ``artists``
    #: (`rosepo.data.prompts.DOMAINS`).
    domain: Domain = "movies"
    #: Interactions input (ignored for ``movielens-100k``): a file, a folder or a glob, local or a
    #: ``pyarrow.fs`` URI.
    interactions: str = ""
    #: Catalog input, the items and their titles (ignored for ``movielens-100k``).
    catalog: str = ""
    #: Column mapping for csv/parquet input: canonical name -> name in the file.
    columns: dict = field(default_factory=dict)
    #: Field delimiter for ``csv`` (``"\t"`` for TSV): one character, not a quote or line break.
    delimiter: str = ","
    #: Unit of integer timestamps: ``s``, ``ms``, ``us`` or ``ns`` (converted to whole seconds), or
    #: ``auto``: kept as given, each file's in the one unit their magnitudes imply (|t| < 1e11: s,
    #: < 1e14: ms, < 1e17: us, else ns; dates after 1973); a file that mixes units, or files of
    #: one input in two units, refused. Arrow timestamp and date columns and ISO-8601 text carry
    #: their own unit (`rosepo.data.readers.TimestampUnit`).
    timestamp_unit: TimestampUnit = "auto"
    #: Longest history kept (oldest dropped first).
    max_history: Positive = 10
    #: Windows with fewer history items are dropped.
    min_history: Positive = 3
    #: Candidates per sample, the target included.
    num_candidates: Annotated[int, Range(ge=2)] = 20
    #: Fractions of users in train/valid/test.
    split: tuple = (0.8, 0.1, 0.1)
    #: Seed of the split of users, the candidates drawn and the prompt templates chosen.
    seed: Seed = 0
    #: Keep only the last N windows per user in train (0 = all).
    max_train_windows_per_user: AllOrCount = 0
    #: Windows kept per valid/test user, the last ones (0 = all).
    eval_windows_per_user: AllOrCount = 5
    #: Prompt wording (`rosepo.data.prompts`): ``paraphrase`` (three quoted-list sentences) or
    #: ``list`` (one title per line; the shortest prompt, the tiny default's choice).
    prompt_style: PromptStyle = "paraphrase"
    #: ``llara-json`` input: split name -> JSON file of prepared samples.
    llara: dict = field(default_factory=dict)
    #: Drop repeated (user, item, timestamp) events instead of refusing the data; the manifest
    #: counts what was dropped.
    drop_duplicates: bool = False
    #: Drop events whose item is not in the catalog instead of refusing the data; the manifest
    #: counts what was dropped.
    drop_unknown_items: bool = False
    #: Ray Data partitions of the grouping step, at least (large inputs get more). Does not change
    #: the output.
    num_partitions: Positive = 4


@dataclass
class ModelConfig:
    """The policy LLM: a local HF folder / hub name, or the built-in tiny Llama."""

    #: ``tiny`` builds a small Llama from config with a tokenizer trained on the data's text.
    name_or_path: str = "tiny"
    #: The tiny model's width (a pretrained model has its own shape: the next six keys are ignored).
    hidden_size: Positive = 128
    #: The tiny model's MLP width.
    intermediate_size: Positive = 256
    #: The tiny model's layers.
    num_hidden_layers: Positive = 2
    #: The tiny model's attention heads: a divisor of ``hidden_size`` with an even head size.
    num_attention_heads: Positive = 4
    #: The tiny model's key/value heads (grouped-query attention): a divisor of ``num_attention_heads``.
    num_key_value_heads: Positive = 2
    #: Largest vocabulary of the tiny model's tokenizer, trained on the samples' text (a small
    #: corpus may give fewer tokens).
    vocab_size: Positive = 4096
    #: The tiny model's longest sequence: at least ``max_prompt_tokens`` + ``max_answer_tokens``.
    max_position_embeddings: Positive = 1024
    #: ``lora`` or ``full``.
    finetune: Literal["lora", "full"] = "lora"
    #: LoRA rank.
    lora_r: Positive = 16
    #: LoRA scaling numerator: the update is scaled by ``lora_alpha / lora_r``.
    lora_alpha: Positive = 32
    #: Dropout on the LoRA path's input.
    lora_dropout: Dropout = 0.0
    #: Names of the modules that get LoRA adapters (the Llama / Gemma projection names).
    lora_target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    #: Train the embeddings and LM head too when the base model is built from scratch.
    modules_to_save: tuple = ()
    #: ``float32``, ``bfloat16`` (GPU) or ``auto`` (bf16 on GPU, fp32 on CPU).
    dtype: Dtype = "auto"
    #: Recompute activations in the backward pass: less memory for one more forward pass of compute.
    gradient_checkpointing: bool = False
    #: Built-in tiny model only: every catalog title is one whole-word token of the tokenizer,
    #: so the model answers by choosing one token (item tokens, as in ID-based LLM recommenders)
    #: instead of copying a title token by token. A pretrained model's tokenizer is used as is.
    title_tokens: bool = False
    #: Built-in tiny model with title tokens: ``random`` embeddings, or ``sasrec``: the oracle's
    #: item vectors added to the title tokens' embeddings (a hybrid item token; the oracle then
    #: trains before the model is built).
    title_init: Literal["random", "sasrec"] = "random"
    #: With ``title_init: sasrec``: the title rows' random part is drawn orthogonal to the
    #: subspace the oracle's vectors are mapped into, so the answer logits of a hidden state in
    #: that subspace (the aligned user token, ``user_init: sasrec``) are the oracle's scores alone
    #: (`rosepo.model.factory.add_title_vectors`).
    title_orthogonal: bool = False
    #: ``sasrec``: LLaRA's hybrid item representation: every history and candidate title in the
    #: prompt is followed by one item token whose input embedding is ``projector(v)``, v the
    #: oracle's vector of that item and the projector a 2-layer MLP trained in SFT and alignment
    #: next to the adapter (`rosepo.model.items`). Any causal LM; the answer stays text.
    item_embeddings: Literal["none", "sasrec"] = "none"
    #: ``sasrec`` (needs ``item_embeddings: sasrec``): a user token ends every prompt, its input
    #: embedding a trained projection of the oracle's user state for the prompt's history (CoLLM's
    #: collaborative user embedding; `rosepo.model.items`): the answer is predicted from the
    #: position that holds what the oracle knows about the user.
    user_token: Literal["none", "sasrec"] = "none"
    #: The user token's projector at the start: ``random``, or ``sasrec`` (needs ``user_token:
    #: sasrec``, ``title_init: sasrec`` and ``oracle.hidden_size`` <= ``hidden_size`` / 2): the
    #: linear map into the space the title vectors were added in, so the answer logits start out
    #: as the oracle's scores (`rosepo.model.items.align_user_projector`).
    user_init: Literal["random", "sasrec"] = "random"
    #: Longest prompt in tokens; longer prompts are refused at tokenisation.
    max_prompt_tokens: Positive = 512
    #: Longest answer in tokens, EOS included.
    max_answer_tokens: Annotated[int, Range(ge=2, note="a title token and EOS")] = 48


@dataclass
class TrainConfig:
    """What SFT and alignment share: the distributed loop, optimiser and checkpoints."""

    #: ``lora`` or ``full``; "" inherits ``model.finetune``.
    finetune: Literal["", "lora", "full"] = ""
    num_workers: Positive = 2
    #: One GPU per worker; unset (``null``) takes the run's ``use_gpu``.
    use_gpu: bool | None = None
    #: CPUs per Ray Train worker.
    cpus_per_worker: PositiveFloat = 1.0
    #: Seconds the stage waits for all its workers to be placed before it fails. GPU nodes of an
    #: autoscaling cluster take minutes to boot, and Tune trials queue for GPUs: Ray Train retries
    #: the placement every ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) until this is spent.
    start_timeout_s: PositiveFloat = 60.0
    #: Path of a DeepSpeed JSON template, or "" for the package's ``rosepo/train/deepspeed/zero{stage}.json``.
    deepspeed_config: str = ""
    #: DeepSpeed ZeRO stage, what is partitioned over the workers: 1 the optimizer state, 2 also the
    #: gradients, 3 also the parameters (0: nothing).
    zero_stage: Literal[0, 1, 2, 3] = 2
    #: ZeRO-Offload of the optimizer (and, at ZeRO-3, the parameters) to CPU; needs zero_stage >= 1.
    offload: bool = False
    #: Examples per worker per forward pass; an optimiser step takes ``num_workers`` ×
    #: ``micro_batch_size`` × ``grad_accum`` examples.
    micro_batch_size: Positive = 8
    #: Micro-batches accumulated per optimiser step.
    grad_accum: Positive = 1
    #: Peak learning rate of AdamW, reached after the warmup and then decayed on a cosine.
    learning_rate: PositiveFloat = 1e-3
    #: AdamW weight decay.
    weight_decay: NonNegFloat = 0.0
    #: Share of the steps that warm the learning rate up linearly from 0.
    warmup_ratio: Annotated[float, Range(ge=0, le=1)] = 0.05
    #: Gradient clipping norm (0 = no clipping).
    max_grad_norm: NonNegFloat = 1.0
    #: Passes over the training data (fractions allowed), when ``max_steps`` is 0.
    epochs: PositiveFloat = 1.0
    #: Stop after this many optimiser steps (0 = epochs decide).
    max_steps: Annotated[int, Range(ge=0, note="0 = epochs decide")] = 0
    #: With ``max_steps``: stop after this many passes over the training rows if that comes
    #: first (0 = no cap). A step budget sized for a large data set would cycle a small one for
    #: dozens of epochs and memorise it; the cap stops there and leaves large data to the steps.
    max_epochs: Annotated[float, Range(ge=0, note="0 = no cap")] = 0.0
    #: Checkpoint every N optimiser steps (0 = only at the end).
    checkpoint_every: Annotated[int, Range(ge=0, note="0 = only at the end")] = 0
    #: Worker-group restarts after a failure (-1 = no limit, as Ray's FailureConfig).
    max_failures: Annotated[int, Range(ge=-1, note="-1 = no limit")] = 0
    #: Seed of the new weights' initialisation (LoRA), the data order and dropout.
    seed: Seed = 0
    #: Log to TensorBoard under the run's storage path.
    tensorboard: bool = True
    #: Every N optimiser steps rank 0 logs one line of the step's metrics (loss, grad_norm,
    #: learning_rate, epoch), as TRL's ``logging_steps``: below 1, that fraction of the stage's
    #: steps (0.1: about ten lines a stage); 0 = none; TensorBoard has every step.
    #: What is printed, not what is trained: left out of the stage addresses (`UNHASHED`).
    logging_steps: Annotated[float, Range(ge=0, note="0 = no metric lines; below 1, a fraction of the steps")] = 0.1

    def model_config(self, model: "ModelConfig") -> "ModelConfig":
        """The model config this stage trains with: ``model`` with this stage's ``finetune``, if set."""
        return dataclasses.replace(model, finetune=self.finetune or model.finetune)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the true next item."""

    #: Train samples used: a seeded random slice (``seed``) of the users' windows (0 = all).
    max_samples: AllOrCount = 0
    #: Weight of the candidate-set term: -log of the probability mass that the answer's first
    #: token puts on the candidates' first tokens (`rosepo.train.sft`). 0 = plain SFT.
    candidate_weight: Annotated[float, Range(ge=0, note="0 = plain SFT")] = 0.0
    #: The candidate term's weight instead, where each sample gets all its ``decoys`` (the budget
    #: would pass over the samples ``decoys`` + 1 times or more), as on small data: decoys or not,
    #: the model answers some unseen users there with memorised titles off their lists
    #: (BENCHMARKS.md, small data). 0 = ``candidate_weight`` on any data.
    repeat_candidate_weight: NonNegFloat = 0.0
    #: Weight of next-item prediction over the history: the cross-entropy of history titles
    #: 2..n given the prompt before each (SASRec's objective, inside the prompt). 0 = off.
    history_weight: Annotated[float, Range(ge=0, note="0 = off")] = 0.0
    #: Weight of distilling the oracle's ranking: the cross-entropy of the answer's first token
    #: against the oracle's (SASRec's) softmax over the sample's candidates (`rosepo.train.sft`).
    #: 0 = off; > 0 makes the sft stage read the oracle.
    oracle_weight: Annotated[float, Range(ge=0, note="0 = off")] = 0.0
    #: Temperature of that softmax: > 1 flattens the oracle's ranking, < 1 sharpens it.
    oracle_temperature: PositiveFloat = 1.0
    #: Decoys per train sample: copies of its prompt with the target candidate replaced by a
    #: fresh negative, trained without an answer label by the candidate and oracle terms only, so
    #: that answering from the list is learnt where memorising the target cannot satisfy it
    #: (`rosepo.train.sft`). At most the passes beyond the first that the budget (``max_steps``
    #: or ``epochs``) would make over the samples: a data set it covers once gets none. They
    #: count in ``max_steps``' batches and ``max_epochs``' passes. 0 = off.
    decoys: Annotated[int, Range(ge=0, note="0 = off")] = 0
    #: Weight of a decoy's candidate and oracle terms, relative to a sample's.
    decoy_weight: NonNegFloat = 1.0


@dataclass
class OracleConfig:
    """The SASRec preference oracle (and conventional baseline).

    Defaults tuned on MovieLens-100K (75k train samples): 4 epochs on one worker take about
    35 s of CPU and give HR@1 ~0.43 on the 20-candidate valid/test sets (random: 0.05).
    Dropout 0: at 4 epochs nothing overfits, and dropout costs 30% of the step time on CPU.
    """

    #: A multiple of ``num_heads``.
    hidden_size: Positive = 32
    num_layers: Positive = 2
    num_heads: Positive = 2
    dropout: Dropout = 0.0
    max_len: Positive = 10
    #: Passes over the train samples, when ``max_steps`` is 0.
    epochs: Positive = 4
    #: Optimiser steps (batches of ``batch_size``) instead of ``epochs``: a budget that means the
    #: same on any data size, cycling epochs on small data and stopping early on large data
    #: (0 = ``epochs`` decide).
    max_steps: Annotated[int, Range(ge=0, note="0 = epochs decide")] = 0
    #: Evaluate on the valid split every N steps and keep the weights with the best valid NDCG@5,
    #: not the last: on small data many epochs overfit (0 = 20 evaluations per run).
    eval_every: Annotated[int, Range(ge=0, note="0 = 20 evaluations per run")] = 0
    #: At least ``num_workers``: each worker takes batch_size // num_workers.
    batch_size: Positive = 512
    learning_rate: PositiveFloat = 3e-3
    num_workers: Positive = 1
    #: One GPU per worker; unset (``null``) takes the run's ``use_gpu``.
    use_gpu: bool | None = None
    seed: Seed = 0
    #: AdamW weight decay.
    weight_decay: NonNegFloat = 0.0
    #: Slice of train samples used, a seeded random subset (0 = all).
    max_samples: AllOrCount = 0


@dataclass
class PairsConfig:
    """Preference pairs: rejected sampling and personalised smoothing."""

    #: Mix of rejected-sampling strategies by ratio (per-sample assignment).
    strategies: dict = field(default_factory=lambda: {"self_hard": 1.0, "semantic": 1.0, "popularity": 1.0})
    #: ``assign``: one strategy per sample by ratio; ``all``: one pair per strategy per sample.
    mix: Literal["assign", "all"] = "assign"
    #: Rejected items per pair (K > 1 for multi-negative losses), below ``data.num_candidates``.
    num_negatives: Positive = 1
    #: Popularity sampling exponent; 0 picks the most popular non-target candidate.
    popularity_alpha: NonNegFloat = 0.0
    #: Use the SFT model's greedy answer for self_hard when it is a valid wrong title.
    self_hard_greedy: bool = False
    #: ``minilm`` (needs the embed extra) or ``tfidf``.
    embedder: Embedder = "minilm"
    #: Valid samples turned into held-out pairs (eval metrics during alignment and Tune; 0 = all).
    eval_samples: AllOrCount = 64
    #: Ray Data actors scoring with the SFT model.
    num_actors: Positive = 2
    #: Samples per Ray Data batch and per forward pass (one row per sample: its prompt once and
    #: every candidate after it). Samples are sorted by prompt length first, so a batch pads little.
    batch_size: Positive = 32
    #: One GPU per actor; unset (``null``) takes the run's ``use_gpu``.
    use_gpu: bool | None = None
    #: Share of the train pairs whose chosen and rejected answers are swapped (seeded by
    #: ``seed``; the held-out valid pairs stay clean): controlled label noise, to measure how
    #: robust an alignment method is to wrong preferences. Recorded per pair (``flipped``).
    label_noise: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    #: Train samples turned into pairs (0 = all).
    max_samples: AllOrCount = 0
    seed: Seed = 0
    #: Draw the train pairs only from train samples the sft stage did not train on (its
    #: ``sft.max_samples`` slice is left out): the SFT model's own mistakes on prompts it has not
    #: fitted, not on ones it learned by heart. Needs ``sft.max_samples`` > 0.
    exclude_sft: bool = False


@dataclass
class AlignConfig(TrainConfig):
    """Smoothed preference optimisation on the pairs."""

    #: ``rosepo``, ``dpo``, ``cdpo``, ``sdpo``, ``sdpo_smoothed`` or ``ipo``.
    loss: Loss = "rosepo"
    #: β of the DPO family: how far the policy may move from the reference (smaller: further).
    beta: PositiveFloat = 0.1
    #: How ε per pair is made for rosepo / sdpo_smoothed: ``personalized`` (from the oracle's scores,
    #: see rosepo.pairs.smoothing), ``constant`` (eps_constant) or ``none``. cdpo always uses
    #: eps_constant, dpo/sdpo/ipo ε = 0. Lives here, not in pairs, so that Tune can search it
    #: without rebuilding pairs.
    smoothing: Literal["personalized", "constant", "none"] = "personalized"
    #: λ of ε = clip(λ · (1 − σ(margin / τ)), 0, ε_max); λ <= 0 would make ε ≡ 0 (that is smoothing: none).
    smoothing_lambda: PositiveFloat = 1.0
    #: τ of that formula: the temperature of the oracle's score margin (larger: ε closer to λ / 2).
    smoothing_tau: PositiveFloat = 1.0
    #: ε_max, ε's cap, below 0.5: at 0.5 the loss ignores which item was chosen.
    eps_max: float = 0.3
    #: ε of ``smoothing: constant`` and of cdpo (the assumed rate of wrong preferences), below 0.5.
    eps_constant: float = 0.1
    #: Weight of the NLL-on-chosen regulariser.
    sft_weight: NonNegFloat = 0.0
    #: Weight of the candidate-set term, as ``sft.candidate_weight``: −log of the probability
    #: mass the answer's first token puts on the sample's candidates (`rosepo.train.align`).
    #: Every rejected answer is a candidate, so pushing it down moves mass off the candidates
    #: too; this term keeps it there. 0 = off.
    candidate_weight: NonNegFloat = 0.0
    #: ``precomputed`` (from pair rows) or ``online`` (adapter disabled).
    reference: Literal["precomputed", "online"] = "precomputed"
    #: Score a prompt's chosen and rejected answers in one sequence that holds the prompt once
    #: (`rosepo.model.logprobs`); same log-probs, fewer tokens. False: one sequence per answer.
    prefix_sharing: bool = True
    learning_rate: PositiveFloat = 5e-4
    #: Evaluate on the held-out pairs every N steps (0 = only before and after training).
    eval_every: Annotated[int, Range(ge=0, note="0 = only before and after training")] = 0
    #: Valid samples (the first N distinct samples of the held-out pairs) also scored as
    #: recommendations at each evaluation: ``eval/rank/...`` (candidates ranked by the policy's
    #: answer log-likelihood) and, below ZeRO-3, ``eval/hr@1`` / ``eval/valid_ratio`` of greedy
    #: answers. 0 = off. Cost: one scoring pass and one greedy decoding of the slice.
    eval_rec_samples: Annotated[int, Range(ge=0, note="0 = off")] = 32
    #: Longest greedy answer of that evaluation, in tokens (the eval stage's ``eval.max_new_tokens``
    #: for its own evaluation).
    eval_max_new_tokens: Positive = 32
    #: Train only on the pairs of these rejected-sampling strategies (empty = all pairs). With
    #: ``pairs.mix: all`` every sample has one pair per strategy, so Tune can search the mix
    #: without rebuilding pairs.
    strategies: tuple = ()


@dataclass
class EvalConfig:
    """Generation and ranking evaluation."""

    split: Split = "valid"
    #: The first N samples of the split by sample id (0 = all).
    max_samples: AllOrCount = 0
    max_new_tokens: Positive = 32
    #: Samples per Ray Data batch and per forward pass (sorted by prompt length first).
    batch_size: Positive = 32
    num_actors: Positive = 2
    #: One GPU per actor; unset (``null``) takes the run's ``use_gpu``.
    use_gpu: bool | None = None
    constrained: bool = False


@dataclass
class CompareConfig:
    """`rosepo compare`: which methods run, over how many seeds, for how many alignment steps.

    Hyperparameters (β, learning rate, ε_max, ...) are not here: every method trains with the
    run's ``align`` section, chosen on the valid split; see `rosepo.experiments.compare`.
    """

    #: Alignment seeds per trained method: ``align.seed``, ``align.seed + 1``, ... (the LoRA
    #: initialisation and the data order; the pairs are the same for every seed).
    seeds: Positive = 3
    #: Trained methods to run, names of `METHOD_NAMES` (empty = all). The baselines
    #: (random, most_popular, sasrec, sft) always run, once: they are deterministic.
    methods: tuple = ()
    #: Optimiser steps of every alignment run (``align.max_steps``), the same for every method;
    #: 0 = one epoch over one pair per train sample of the pairs.
    align_steps: Annotated[int, Range(ge=0, note="0 = one epoch")] = 0
    #: Label-noise rates (``pairs.label_noise``) to run every method at, e.g. [0, 0.2, 0.4]: one
    #: pair build per rate, and cDPO's constant ε set to the rate (the ε a known noise rate
    #: calls for). Empty = the run's ``pairs.label_noise`` only.
    noise_rates: tuple = ()


@dataclass
class RunConfig:
    """A whole rosepo run: every stage's config, and where outputs go."""

    #: The run's name: its outputs go to ``<storage>/<name>``.
    name: str = "ml100k-tiny"
    #: Root of all stage outputs of this run.
    storage: str = "runs"
    #: Ray address: "" starts or joins a local Ray, "auto" joins a running cluster.
    ray_address: str = ""
    #: Run every stage that can use a GPU on GPUs: one per training worker (oracle, sft, align)
    #: and one per scoring actor (pairs, eval). A stage's own ``use_gpu`` overrides it.
    use_gpu: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self) -> "RunConfig":
        """Check every field's declared choices and bounds, then what spans several fields;
        return self. Raises `ConfigError` naming the key, the value and what is expected."""
        _check_fields(self)
        for stage in GPU_STAGES:  # the run's switch fills every stage that leaves it unset
            section = getattr(self, stage)
            if section.use_gpu is None:
                section.use_gpu = self.use_gpu
        d, m = self.data, self.model
        _check(bool(self.name) and self.name not in (".", "..") and not set(self.name) & set("/\\\0"), "name",
               "must be a folder name (no '/', not '.' or '..'): outputs go to <storage>/<name>", self.name)
        _check(bool(self.storage), "storage", "must name a folder", self.storage)
        _check(d.max_history >= d.min_history, "data.max_history",
               f"must be >= data.min_history ({d.min_history})", d.max_history)
        _check(len(d.split) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d.split)
               and abs(sum(d.split) - 1) < 1e-6
               and all(x > 0 for x in d.split), "data.split",
               "must be three fractions > 0 summing to 1, e.g. [0.8, 0.1, 0.1]: the oracle trains on train and is "
               "evaluated on valid and test, so none may be empty", d.split)
        _check(len(d.delimiter) == 1 and d.delimiter not in "\r\n\"", "data.delimiter",
               "must be one character other than a quote or a line break (\"\\t\" for TSV)", d.delimiter)
        _check(all(k in COLUMN_NAMES and isinstance(v, str) and v for k, v in d.columns.items()), "data.columns",
               f"must map canonical names ({', '.join(COLUMN_NAMES)}) to column names of the files", d.columns)
        _check(all(k in typing.get_args(Split) and isinstance(v, str) and v for k, v in d.llara.items()),
               "data.llara", f"must map splits ({', '.join(typing.get_args(Split))}) to JSON files", d.llara)
        if d.format == "llara-json":
            _check(set(d.llara) == set(typing.get_args(Split)), "data.llara", "must name the JSON file of every "
                   "split when data.format is llara-json ({train: train.json, valid: valid.json, test: test.json}): "
                   "the oracle trains on train and is evaluated on valid and test", d.llara)
        elif d.format != "movielens-100k":
            for key in ("interactions", "catalog"):
                _check(bool(getattr(d, key)), f"data.{key}", f"must name the input file when data.format is "
                       f"{d.format}", getattr(d, key))
        if m.name_or_path == "tiny":  # the shape of the model built from config (a pretrained one has its own)
            _check(m.hidden_size % m.num_attention_heads == 0 and (m.hidden_size // m.num_attention_heads) % 2 == 0,
                   "model.hidden_size", f"must be a multiple of model.num_attention_heads ({m.num_attention_heads}) "
                   "with an even quotient (the rotary embedding pairs dimensions)", m.hidden_size)
            _check(m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
                   f"must divide model.num_attention_heads ({m.num_attention_heads})", m.num_key_value_heads)
            _check(m.max_prompt_tokens + m.max_answer_tokens <= m.max_position_embeddings,
                   "model.max_position_embeddings", f"must be >= model.max_prompt_tokens + model.max_answer_tokens "
                   f"({m.max_prompt_tokens + m.max_answer_tokens})", m.max_position_embeddings)
        _check(m.title_init == "random" or (m.name_or_path == "tiny" and m.title_tokens), "model.title_init",
               "'sasrec' needs the built-in tiny model with model.title_tokens: true", m.title_init)
        _check(not m.title_orthogonal or m.title_init == "sasrec", "model.title_orthogonal",
               "needs model.title_init: sasrec (it splits the title rows around the oracle's vectors)",
               m.title_orthogonal)
        _check(m.user_token == "none" or m.item_embeddings == "sasrec", "model.user_token",
               "'sasrec' needs model.item_embeddings: sasrec (the user token reads the history's item tokens)",
               m.user_token)
        _check(m.user_init == "random" or (m.user_token == "sasrec" and m.title_init == "sasrec"), "model.user_init",
               "'sasrec' needs model.user_token: sasrec and model.title_init: sasrec (it aligns the one with the "
               "other)", m.user_init)
        _check(m.user_init == "random" or 2 * self.oracle.hidden_size <= m.hidden_size, "model.user_init",
               f"'sasrec' maps the oracle's state (oracle.hidden_size {self.oracle.hidden_size}) through both signs "
               f"of the projector's hidden units: needs oracle.hidden_size <= model.hidden_size / 2 "
               f"({m.hidden_size // 2})", m.user_init)
        _check(m.item_embeddings == "none" or self.align.reference == "precomputed", "align.reference",
               "must be 'precomputed' with model.item_embeddings: sasrec (an online reference would score "
               "with the projector being trained)", self.align.reference)
        for key in ("lora_target_modules", "modules_to_save"):
            names = getattr(m, key)
            _check(all(isinstance(x, str) and x for x in names), f"model.{key}", "must list module names", names)
        _check(not self.sft.decoys or self.sft.candidate_weight > 0 or self.sft.oracle_weight > 0, "sft.decoys",
               "needs sft.candidate_weight > 0 or sft.oracle_weight > 0: a decoy has no answer label, and only "
               "those terms train it", self.sft.decoys)
        for name in ("sft", "align"):
            t = getattr(self, name)
            _check(not t.max_epochs or t.max_steps > 0, f"{name}.max_epochs",
                   f"caps {name}.max_steps: needs {name}.max_steps > 0 (without it, {name}.epochs decide)",
                   t.max_epochs)
            _check(not t.offload or t.zero_stage >= 1, f"{name}.offload",
                   "needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)", t.offload)
            _check(t.logging_steps < 1 or t.logging_steps == int(t.logging_steps), f"{name}.logging_steps",
                   "must be a whole number of steps, or a fraction of the stage's steps below 1", t.logging_steps)
            if (t.finetune or m.finetune) == "lora":
                _check(bool(m.lora_target_modules), "model.lora_target_modules",
                       f"must name at least one module: {name} fine-tunes with LoRA", m.lora_target_modules)
                # A pretrained model's layers are known once it is resolved (the model stage checks them).
                _check(m.name_or_path != "tiny" or set(m.lora_target_modules) <= set(TINY_LINEAR_LAYERS),
                       "model.lora_target_modules", f"must name linear layers of the tiny model "
                       f"({', '.join(TINY_LINEAR_LAYERS)})", m.lora_target_modules)
        for key in ("eps_max", "eps_constant"):
            _check(0 <= getattr(self.align, key) < 0.5, f"align.{key}",
                   "must be in [0, 0.5): at 0.5 the loss ignores which item was chosen", getattr(self.align, key))
        _check(self.pairs.num_negatives < d.num_candidates, "pairs.num_negatives",
               f"must be below data.num_candidates ({d.num_candidates})", self.pairs.num_negatives)
        _check(not self.pairs.exclude_sft or self.sft.max_samples > 0, "pairs.exclude_sft",
               "needs sft.max_samples > 0: with 0 the sft stage trains on every train sample and none is left "
               "for the pairs", self.pairs.exclude_sft)
        ratios = self.pairs.strategies
        _check(all(k in STRATEGY_NAMES and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and v >= 0 for k, v in ratios.items())
               and sum(ratios.values()) > 0, "pairs.strategies",
               f"must map strategies among {', '.join(STRATEGY_NAMES)} to ratios >= 0 with a positive sum", ratios)
        _check(all(isinstance(s, str) and s in STRATEGY_NAMES for s in self.align.strategies), "align.strategies",
               f"must list strategies among {', '.join(STRATEGY_NAMES)} (empty = all pairs)", self.align.strategies)
        drawn = [s for s, ratio in ratios.items() if ratio > 0]
        _check(all(s in drawn for s in self.align.strategies), "align.strategies",
               f"must list strategies the pairs are made by (pairs.strategies with a ratio > 0: {', '.join(drawn)}): "
               "alignment would find no pair of the others", self.align.strategies)
        o = self.oracle
        _check(o.hidden_size % o.num_heads == 0, "oracle.hidden_size",
               f"must be a multiple of oracle.num_heads ({o.num_heads})", o.hidden_size)
        _check(o.batch_size >= o.num_workers, "oracle.batch_size",
               f"must be >= oracle.num_workers ({o.num_workers}): each worker takes batch_size // num_workers",
               o.batch_size)
        rates = self.compare.noise_rates
        _check(all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 0.5 for r in rates)
               and len(set(rates)) == len(rates), "compare.noise_rates",
               "must list distinct label-noise rates in [0, 0.5), e.g. [0, 0.2, 0.4]", rates)
        unknown = [m for m in self.compare.methods if not isinstance(m, str) or m not in METHOD_NAMES]
        _check(not unknown, "compare.methods", f"names unknown method(s) {', '.join(map(repr, unknown))}; "
               f"methods: {', '.join(METHOD_NAMES)} (empty = all)")
        _check(len(set(self.compare.methods)) == len(self.compare.methods), "compare.methods",
               "names a method twice")
        return self

    def gpu_demand(self, stages: Iterable[str] | None = None) -> dict[str, int]:
        """GPUs each stage that uses them holds at once: a training stage one per worker, a
        scoring stage one per actor (the stages run one after another); of ``stages`` only when
        given (those a command will run)."""
        counts = {"oracle": self.oracle.num_workers, "sft": self.sft.num_workers, "pairs": self.pairs.num_actors,
                  "align": self.align.num_workers, "eval": self.eval.num_actors}
        return {stage: n for stage, n in counts.items()
                if getattr(self, stage).use_gpu and (stages is None or stage in stages)}

    def to_dict(self) -> dict:
        """Plain-data form (tuples as lists), for YAML/JSON and hashing."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


_NO_VALUE = object()


def _check(ok: bool, key: str, message: str, value: Any = _NO_VALUE) -> None:
    if not ok:
        got = "" if value is _NO_VALUE else f", got {value!r}"
        raise ConfigError(f"config key {key!r} {message}{got}")


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of the dataclass ``obj`` (sections recursively) against its declared
    `Literal` choices and `Range` bounds; float fields must be finite."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        key, value, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        bounds = []
        if typing.get_origin(tp) is Annotated:
            tp, *bounds = typing.get_args(tp)
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            _check(any(type(value) is type(c) and value == c for c in choices), key,
                   f"must be one of {', '.join(map(repr, choices))}", value)
        if tp is float:
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
                   "must be a finite number", value)
        for b in bounds:
            _check(b.contains(value), key, b.text(), value)


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
    if typing.get_origin(tp) is Literal:  # the choice itself is checked by `RunConfig.validate`
        kinds = {type(c) for c in typing.get_args(tp)}
        if type(value) not in kinds:
            raise ConfigError(f"config key {key!r}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, "
                              f"got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 2e-4 (an exponent without a dot) as a string: take what parses as a float.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
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


@functools.cache
def _unique_key_loader() -> type:
    """A `yaml.SafeLoader` that refuses a key given twice in one mapping, naming the dotted key
    and both lines (PyYAML keeps the later value silently). The document's nodes are checked
    before they are constructed, so the key's whole path is known."""
    import yaml

    def check(node, prefix: str, seen_nodes: set) -> None:
        if id(node) in seen_nodes:  # an alias: its node was checked where it was anchored
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key, value in node.value:
                scalar = isinstance(key, yaml.ScalarNode)  # a complex key (a list, a mapping) is refused later
                name, line = prefix + (key.value if scalar else "?"), key.start_mark.line + 1
                if scalar and key.value in lines:
                    raise ConfigError(f"key {name!r} appears twice (lines {lines[key.value]} and {line}); keep one")
                if scalar:
                    lines[key.value] = line
                check(value, name + ".", seen_nodes)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                check(item, f"{prefix.removesuffix('.')}[{i}].", seen_nodes)

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            check(node, "", set())
            return super().construct_document(node)

    return UniqueKeyLoader


def read_yaml(path: str | Path, what: str, if_empty: str) -> dict:
    """The top-level mapping of the YAML file ``path``, named ``what`` (``config file``, ``search
    file``) in errors. `ConfigError` when it is a folder or missing, cannot be read, is not
    YAML, gives a key twice in one mapping (the dotted key and both lines), holds no settings
    (0 bytes, or only blank lines and comments: ``if_empty`` says what to do), or is not a mapping."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loader = _unique_key_loader()(p.read_text(encoding="utf-8"))  # a SafeLoader: plain data only
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except ConfigError as e:
        raise ConfigError(f"{what} {p}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read: {e.strerror or e}") from None
    if data is None:
        raise ConfigError(f"{what} {p} holds no settings (it is empty, or only blank lines and comments): {if_empty}")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a `RunConfig` from a YAML file (`read_yaml`; no file: the defaults) plus ``key=value``
    overrides, validated."""
    data: dict = {}
    if path:
        data = read_yaml(path, "config file", "write the settings to change, or leave out --config to run the defaults")
    apply_overrides(data, list(overrides or []))
    return _build(RunConfig, data).validate()


#: Fields that change what a run prints or how long it waits and retries, not what it makes:
#: `config_hash` leaves them out, so changing them neither moves a stage's address nor redoes it.
UNHASHED = frozenset({"logging_steps", "start_timeout_s", "max_failures"})


def _hashed(obj: Any) -> dict:
    """``dataclasses.asdict(obj)`` without the `UNHASHED` fields (sections recursively)."""
    return {f.name: _hashed(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj) if f.name not in UNHASHED}


def config_hash(*parts: Any) -> str:
    """Short stable hash of config sections (dataclasses or plain data), for stage addressing;
    the `UNHASHED` fields are left out."""
    norm = [_hashed(p) if dataclasses.is_dataclass(p) else p for p in parts]
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
