"""The model stage: the run's base model, the built-in tiny Llama (its tokenizer trained on the
samples' text) or the configured pretrained model, named in the stage's manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rosepo.config import ModelConfig
from rosepo.data.samples import read_split
from rosepo.layout import MODEL_PATH_KEY, TINY_MODEL_DIR
from rosepo.model.factory import build_tiny_model
from rosepo.storage import atomic_dir, write_manifest


def build_base_model(cfg: ModelConfig, samples_dir: Path, out: Path) -> dict:
    """Build (``name_or_path: tiny``) or name the base model into ``out``, atomically; return the
    manifest (``model_path``: ``out/hf``, or ``name_or_path`` as configured)."""
    with atomic_dir(out, overwrite=True) as tmp:
        if cfg.name_or_path == "tiny":
            texts, titles = tokenizer_texts(cfg, samples_dir)
            build_tiny_model(cfg, texts, tmp / TINY_MODEL_DIR, titles=titles)
            path = str(out / TINY_MODEL_DIR)
        else:
            path = cfg.name_or_path
        manifest = {"stage": "model", MODEL_PATH_KEY: path, "config": dataclasses.asdict(cfg)}
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
