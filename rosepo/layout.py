"""The layout of stage folders: every file and folder name a stage writes and a later stage,
an experiment or a test reads, and the helpers that resolve them.

A stage folder is ``<storage>/<run name>/<stage>-<hash>/`` (`rosepo.pipeline`) holding what is
listed here plus ``manifest.json`` (`rosepo.storage.MANIFEST`, written last).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from rosepo.schema import PAIRS
from rosepo.storage import read_manifest

#: model stage: the built tiny model or the copy of a hub model (an HF folder), and the manifest
#: key naming the base model (that folder, or the configured ``model.name_or_path``).
TINY_MODEL_DIR = "hf"
MODEL_PATH_KEY = "model_path"
#: sft stage: the HF export of fine-tuning (a LoRA adapter, or the whole model after full SFT).
SFT_MODEL_DIR = "model"
#: A folder holding this file is a LoRA adapter (PEFT's name).
ADAPTER_CONFIG = "adapter_config.json"
#: model, sft and align stages: the item table and projector of the hybrid item tokens
#: (`rosepo.model.items`), beside the model / adapter it belongs to.
ITEM_EMBEDDINGS = "item_embeddings.safetensors"
#: align stage: the aligned LoRA adapter.
ADAPTER_DIR = "adapter"
#: pairs stage: one ``<split>/pairs.parquet`` per split.
PAIRS_FILE = "pairs.parquet"
#: An evaluation's per-sample rows and metrics (eval stage, compare cells).
ANSWERS_FILE, METRICS_FILE, TABLE_FILE = "answers.parquet", "metrics.json", "table.md"
#: samples stage (and an exported model): the catalogue the samples were drawn from (item_id, title).
CATALOG_FILE = "catalog.parquet"
#: Sibling of the stage folders where training stages keep their Ray runs until they finish.
WORK_DIR = ".work"


def base_model_path(model_dir: str | Path) -> str:
    """The base model a ``model`` stage folder stands for: the model inside it (the built tiny
    model, a copy of a hub model; recorded relative to the folder, so a run folder can move), or
    the configured path (a local folder, a fetched named model)."""
    path = read_manifest(model_dir)[MODEL_PATH_KEY]
    return path if Path(path).is_absolute() else str((Path(model_dir) / path).resolve())


def sft_model_and_adapter(sft_dir: str | Path, base: str) -> tuple[str, str | None]:
    """(model, adapter) the SFT stage produced: ``base`` and the SFT LoRA adapter, or, after full
    fine-tuning, the SFT model itself and no adapter."""
    return _model_and_adapter(Path(sft_dir) / SFT_MODEL_DIR, base)


def find_items(folder: str | Path | None) -> str | None:
    """The item file (`ITEM_EMBEDDINGS`) in ``folder`` (a model, adapter or model-stage folder), or None."""
    if folder is None:
        return None
    path = Path(folder) / ITEM_EMBEDDINGS
    return str(path) if path.is_file() else None


def aligned_adapter(align_dir: str | Path) -> Path:
    """The folder an ``align`` stage folder keeps its trained weights in: a LoRA adapter, or
    after ``align.finetune: full`` the whole aligned model."""
    return Path(align_dir) / ADAPTER_DIR


def aligned_model_and_adapter(align_dir: str | Path, base: str) -> tuple[str, str | None]:
    """(model, adapter) of the aligned model: ``base`` with the alignment's LoRA adapter, or,
    after full fine-tuning, the aligned model itself and no adapter."""
    return _model_and_adapter(aligned_adapter(align_dir), base)


def _model_and_adapter(folder: Path, base: str) -> tuple[str, str | None]:
    """(``base``, ``folder``) when ``folder`` is a LoRA adapter, else (``folder``, None)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return base, str(folder)
    return str(folder), None


def pairs_file(pairs_dir: str | Path, split: str) -> Path:
    """Where a pairs folder keeps ``split``'s pairs."""
    return Path(pairs_dir) / split / PAIRS_FILE


def read_pairs(pairs_dir: str | Path, split: str) -> pa.Table:
    """Read one split of a pairs folder (sorted by ``pair_id``)."""
    import pyarrow.parquet as pq

    return pq.read_table(pairs_file(pairs_dir, split), schema=PAIRS)
