"""The model stage: the run's base model, the built-in tiny Llama (its tokenizer trained on the
samples' text, its title tokens optionally initialised from the oracle) or the configured
pretrained model, named in the stage's manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rosepo.config import ModelConfig
from rosepo.data.samples import SPLITS, read_split
from rosepo.layout import ITEM_EMBEDDINGS, MODEL_PATH_KEY, TINY_MODEL_DIR
from rosepo.model.factory import (build_tiny_model, check_lora_targets, embedding_shape, load_tokenizer,
                                  model_linear_layers)
from rosepo.model.fetch import copy_hub_model, is_hub_name, resolve_model
from rosepo.model.items import write_items
from rosepo.model.tokenize import check_sample_lengths
from rosepo.pairs.sasrec import load_oracle
from rosepo.storage import atomic_dir, write_manifest


def build_base_model(cfg: ModelConfig, data_dir: str, samples_dir: Path, oracle_dir: Path, out: Path) -> dict:
    """Build (``name_or_path: tiny``) or name the base model into ``out``, atomically; return the
    manifest (``model_path``: ``out/hf``, or the configured model, a named one such as
    ``gemma-3-270m`` fetched into ``data_dir`` on first use). A hub model (``org/name``) is
    copied into ``out/hf`` (`copy_hub_model`): on a cluster the run's storage is shared, the
    workers' hub caches are not. With ``title_init: sasrec`` the
    title tokens start from the oracle's item vectors (`title_vectors`). With ``item_embeddings:
    sasrec`` the folder also holds the item file (`rosepo.model.items`): the oracle's item vectors
    and a seeded projector, which SFT starts from; with ``user_token: sasrec`` also the oracle's
    encoder and a seeded projector for the user token.

    Checked here, before any training stage starts workers: LoRA target modules exist in the
    model, and every prompt and answer of the samples is within the token limits (refused with
    the usual one line rather than inside a Ray Data task of SFT, pairs or eval).
    """
    hybrid, user = cfg.item_embeddings == "sasrec", cfg.user_token == "sasrec"
    uses_oracle = hybrid or (cfg.name_or_path == "tiny" and cfg.title_init == "sasrec")
    oracle = load_oracle(oracle_dir) if uses_oracle else None  # loaded once
    item_vectors = oracle.item_vectors() if oracle else None
    with atomic_dir(out, overwrite=True) as tmp:
        if cfg.name_or_path == "tiny":
            texts, titles = tokenizer_texts(cfg, samples_dir)
            vectors = title_vectors(samples_dir, item_vectors) if cfg.title_init == "sasrec" else None
            built = build_tiny_model(cfg, texts, tmp / TINY_MODEL_DIR, titles=titles, title_vectors=vectors)
            path = TINY_MODEL_DIR  # relative to the stage folder, which may move (`base_model_path`)
        elif is_hub_name(cfg.name_or_path):
            built = copy_hub_model(cfg.name_or_path, tmp / TINY_MODEL_DIR)
            path = TINY_MODEL_DIR
        else:
            path = built = resolve_model(cfg.name_or_path, data_dir)
        if cfg.finetune == "lora":
            check_lora_targets(cfg, model_linear_layers(built))
        if hybrid:
            rows, hidden = embedding_shape(built)
            write_items(tmp / ITEM_EMBEDDINGS, item_vectors, rows, hidden, oracle=oracle if user else None,
                        user_init=cfg.user_init)
        longest = check_sample_lengths(load_tokenizer(built), {s: read_split(samples_dir, s) for s in SPLITS},
                                       cfg.max_prompt_tokens, cfg.max_answer_tokens, str(samples_dir), items=hybrid,
                                       user=user)
        manifest = {"stage": "model", MODEL_PATH_KEY: path, "config": dataclasses.asdict(cfg), "longest": longest}
        write_manifest(tmp, manifest)
    return manifest


def tokenizer_texts(cfg: ModelConfig, samples_dir: Path) -> tuple[list[str], list[str]]:
    """What the tiny model's tokenizer learns from: about 4000 train prompts (templates + titles)
    and every train candidate title; and the titles that become whole tokens (every title a
    prompt can name, valid and test included, when ``title_tokens``)."""
    train = read_split(samples_dir, "train")
    texts = train.column("prompt").to_pylist()[:: max(1, len(train) // 4000)]
    titles = {t for ts in train.column("candidate_titles").to_pylist() for t in ts}
    texts += sorted(titles)
    if cfg.title_tokens:
        for split in ("valid", "test"):
            table = read_split(samples_dir, split)
            for column in ("history_titles", "candidate_titles"):
                titles.update(t for ts in table.column(column).to_pylist() for t in ts)
        titles.update(t for ts in train.column("history_titles").to_pylist() for t in ts)
    return texts, sorted(titles)


def item_titles(samples_dir: Path) -> dict[str, str]:
    """Item id -> title, from the history and candidates of every split's samples."""
    titles: dict[str, str] = {}
    for split in SPLITS:
        table = read_split(samples_dir, split)
        for ids_col, titles_col in (("history_item_ids", "history_titles"),
                                    ("candidate_item_ids", "candidate_titles")):
            for ids, names in zip(table.column(ids_col).to_pylist(), table.column(titles_col).to_pylist()):
                titles.update(zip(ids, names))
    return titles


def title_vectors(samples_dir: Path, item_vectors: dict[str, np.ndarray]) -> dict:
    """Title -> the oracle's item vector (``item_vectors``: item id -> vector; the mean, for a
    title two items share)."""
    by_title: dict[str, list[np.ndarray]] = {}
    for i, t in item_titles(samples_dir).items():
        by_title.setdefault(t, []).append(item_vectors[i])
    return {t: np.mean(v, axis=0) for t, v in by_title.items()}
