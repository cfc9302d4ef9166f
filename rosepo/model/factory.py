"""The policy LLM: the built-in tiny Llama, loading, LoRA wrapping and export.

Every output folder is an ordinary Hugging Face folder (``from_pretrained`` loads it), written
atomically. Heavy imports (transformers, peft, tokenizers) stay inside the functions; torch comes
with `rosepo.model.items` (its `HybridItemLM` is a torch module, as `rosepo.pairs.sasrec`'s SASRec is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from rosepo.config import ModelConfig
from rosepo.errors import ConfigError
from rosepo.layout import ITEM_EMBEDDINGS, find_items
from rosepo.model.items import HybridItemLM, attach_items, title_projection
from rosepo.storage import atomic_dir

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, titles: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer on ``texts``; returns a `PreTrainedTokenizerFast`.

    Special tokens ``<unk>`` ``<s>`` ``</s>`` ``<pad>`` take ids 0-3. Calling the tokenizer adds
    no BOS/EOS: `rosepo.model.tokenize` appends EOS to answers itself. No prefix space is added,
    so " Toy Story" and "Toy Story" tokenise differently, as in GPT-2. The result is a function
    of the texts, ``vocab_size`` and ``titles`` only (the BPE trainer breaks ties by token ids).

    ``titles`` become added tokens after the BPE vocabulary, in sorted order: each is matched
    whole (the longest title wins, never inside a word), so a title is one token wherever it
    appears in a prompt or an answer; other text is split by the BPE model as before.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in sorted(set(titles)) if t.strip()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, padding_side="right")


def build_tiny_model(cfg: ModelConfig, texts: Iterable[str], out_dir: str | Path,
                     titles: Iterable[str] = (), title_vectors: dict | None = None) -> Path:
    """Build the tiny Llama of ``cfg`` with a tokenizer trained on ``texts``; save it to ``out_dir``.

    With ``cfg.title_tokens``, every one of ``titles`` is a single token (`train_tokenizer`), and
    ``title_vectors`` (title -> a collaborative item vector, e.g. SASRec's) are added to those
    tokens' embeddings (`add_title_vectors`).

    The vocabulary is the tokenizer's actual size (at most ``cfg.vocab_size``: small corpora
    run out of merges). Weights are initialised under ``torch.manual_seed(0)``, embeddings tied,
    saved as safetensors in float32. An existing ``out_dir`` is replaced atomically.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, cfg.vocab_size, titles if cfg.title_tokens else ())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if title_vectors:
        add_title_vectors(model, tokenizer, title_vectors, config.initializer_range, orthogonal=cfg.title_orthogonal)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def add_title_vectors(model, tokenizer, title_vectors: dict, initializer_range: float,
                      orthogonal: bool = False) -> None:
    """Add each title token's collaborative vector to its (tied) embedding row, in place.

    The hybrid item token: the random row keeps the tokens distinguishable (the model copies a
    candidate by its identity), the added part carries what the sequential recommender learned,
    so similar items start close and the answer logits h·e start out as SASRec's scores h·v.
    Vectors are scaled to a mean norm equal to a random row's expected norm,
    ``initializer_range · sqrt(hidden)``, then mapped by `title_projection` P. With
    ``orthogonal`` the random rows first lose their component in P's column space, so for a
    hidden state h = P·u (the aligned user token) h·e_t is the oracle's part alone.
    """
    import numpy as np
    import torch

    titles = sorted(title_vectors)
    ids = tokenizer.convert_tokens_to_ids(titles)
    if tokenizer.unk_token_id in ids:
        missing = [t for t, i in zip(titles, ids) if i == tokenizer.unk_token_id][:3]
        raise ConfigError(f"title vectors given for titles that are not tokens, e.g. {missing}; "
                          "they need model.title_tokens: true")
    vectors = torch.from_numpy(np.stack([np.asarray(title_vectors[t], dtype=np.float32) for t in titles]))
    emb = model.get_input_embeddings().weight
    scale = initializer_range * emb.shape[1] ** 0.5 / vectors.norm(dim=1).mean().clamp(min=1e-12)
    proj = title_projection(emb.shape[1], vectors.shape[1])
    rows = torch.tensor(ids)
    with torch.no_grad():
        if orthogonal:
            emb[rows] -= (emb[rows] @ proj) @ proj.T
        emb[rows] += scale * vectors @ proj.T


def resolve_dtype(name: str, use_gpu: bool):
    """``model.dtype`` as a torch dtype, for a process on a GPU (``use_gpu``) or on the CPU:
    ``auto`` is bfloat16 on a GPU that computes in it (compute capability 8.0 and later: A100,
    H100, L4, ...) and float32 elsewhere (the CPU, and T4 / V100, which only emulate bfloat16:
    float32 there rather than fp16 with loss scaling, which DeepSpeed's bf16/fp32 paths here do
    not run). ``bfloat16`` on such a GPU is refused, naming the card."""
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if use_gpu and gpu_has_bf16() else torch.float32}
    if name not in table:
        raise ConfigError(f"config key 'model.dtype' must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    if name == "bfloat16" and use_gpu and not gpu_has_bf16():
        import torch.cuda

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"config key 'model.dtype' is 'bfloat16', but this GPU ({card}) does not compute in "
                          "bfloat16 (compute capability 8.0 or later needed): set model.dtype to float32 or auto")
    return table[name]


def gpu_has_bf16() -> bool:
    """Whether this process's CUDA device computes in bfloat16 natively (capability >= 8.0)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def load_tokenizer(path: str | Path):
    """Load a tokenizer; pad with EOS when it has no pad token; pad on the right."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=_offline())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(path: str, *, dtype, adapter: str | None = None, trainable_adapter: bool = True,
               gradient_checkpointing: bool = False):
    """Load a causal LM from a local folder or hub name, optionally with a saved LoRA adapter.

    ``adapter`` is a folder written by `export_model` (it holds ``adapter_config.json``); its
    weights are trainable when ``trainable_adapter``. Gradient checkpointing is non-reentrant,
    so a frozen base under LoRA needs no input-grad hook.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=_offline())
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter folder {adapter} holds no adapter_config.json; "
                              "pass the folder written by the SFT or alignment stage")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
    return model


def load_for_inference(path: str, adapter: str | None = None, *, device: str = "cpu", dtype=None,
                       merge: bool = True):
    """The model a scoring or generating stage uses, in eval mode on ``device`` in ``dtype``
    (default float32), the adapter merged into the weights (``merge``; unmerged it computes as the
    policy of alignment does at its first step), wrapped with its item tokens when the adapter's
    folder (or, without one, the model's) holds an item file (`rosepo.model.items`)."""
    import torch

    model = load_model(path, dtype=dtype or torch.float32, adapter=adapter, trainable_adapter=False)
    model = model.merge_and_unload() if adapter and merge else model
    model = model.to(device)
    items = find_items(adapter or path)
    return (attach_items(model, items, trainable=False) if items else model).eval()


def cuda_settings() -> None:
    """What every rosepo process on a GPU sets before it computes: float32 matmuls in TF32 (as HF's
    Trainer with ``tf32``; only float32 runs use them), and no cuDNN attention. Gemma-family models
    (head_dim 256) train to NaN gradients within tens of steps in bfloat16 through cuDNN's masked
    SDPA backward on Hopper GPUs (H100/H200), not on Ampere; PyTorch then takes its memory-efficient
    kernel, which is stable (NVIDIA-NeMo/Automodel#3232; our Gemma-3-270M went NaN at step 50 on an
    H200, and its bfloat16 losses were finite on the CPU)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def inference_device(use_gpu: bool, key: str) -> str:
    """The device of a scoring actor: ``cuda`` when it was given a GPU (Ray makes it the only
    visible one), else ``cpu`` with one torch thread (the actor holds one core). ``key`` names the
    setting in the error raised when a GPU was asked for but none is visible."""
    import torch

    if not use_gpu:
        torch.set_num_threads(1)
        return "cpu"
    if not torch.cuda.is_available():
        import ray

        given = ray.get_runtime_context().get_assigned_resources() if ray.is_initialized() else {}
        raise ConfigError(f"config key {key!r} asks for a GPU, but this process sees none (Ray gave it {given}, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; is torch a CPU build?)")
    cuda_settings()
    return "cuda"


def linear_layer_names(model) -> list[str]:
    """Sorted distinct last names of ``model``'s ``nn.Linear`` modules: what LoRA targets name."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def model_linear_layers(path: str | Path) -> list[str]:
    """`linear_layer_names` of the model at ``path``, built from its config on the meta device
    (no weights read, about a second)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=_offline())
    with torch.device("meta"):
        return linear_layer_names(AutoModelForCausalLM.from_config(config))


def embedding_shape(path: str | Path) -> tuple[int, int]:
    """(input-embedding rows, hidden size) of the model at ``path``, from its config (the text
    config of a multimodal one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=_offline())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size), int(text.hidden_size)


def check_lora_targets(cfg: ModelConfig, linear_layers: Iterable[str]) -> None:
    """Refuse ``cfg.lora_target_modules`` naming a layer the model lacks. peft refuses only when
    no name matches; one wrong name among right ones would silently train fewer layers."""
    layers = sorted(linear_layers)
    unknown = [t for t in cfg.lora_target_modules if t not in layers]
    if unknown or not cfg.lora_target_modules:
        raise ConfigError(f"config key 'model.lora_target_modules' names {', '.join(unknown) or 'nothing'}, "
                          f"not a linear layer of this model; its linear layers: {', '.join(layers)}")


def apply_lora(model, cfg: ModelConfig):
    """Wrap ``model`` in LoRA adapters per ``cfg`` (only adapters and ``modules_to_save`` train).

    With ``cfg.finetune == "full"`` the model is returned unchanged. Target modules the model
    does not have are refused (`check_lora_targets`).
    """
    if cfg.finetune == "full":
        return model
    from peft import LoraConfig, get_peft_model

    check_lora_targets(cfg, linear_layer_names(model))

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def export_model(model, tokenizer, out_dir: str | Path, *, merged: bool = False) -> Path:
    """Save ``model`` (the adapter alone when it is a peft model) and ``tokenizer`` to ``out_dir``.

    With ``merged`` a peft model's adapter is also merged into a copy of the base model, saved
    with the tokenizer under ``out_dir/merged`` (a plain HF model folder). A `HybridItemLM`
    saves its LM so and its item file (trained projector) beside it. Under ZeRO-3 the caller
    gathers the parameters first: partitioned tensors save empty.
    """
    import copy

    from peft import PeftModel

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        if isinstance(model, HybridItemLM):
            model.save_items(tmp / ITEM_EMBEDDINGS)
            model = model.lm
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if merged and isinstance(model, PeftModel):
            full = copy.deepcopy(model).merge_and_unload()
            full.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
    return out_dir
