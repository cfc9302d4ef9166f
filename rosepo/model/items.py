"""LLaRA's hybrid item representation: an item token after every title of the prompt, whose input
embedding is a trained projection of the oracle's (SASRec's) vector of that item.

Ids. The tokenizer's ids stay as they are; row k of the item table gets the id ``offset + k``,
``offset`` being the LM's number of input-embedding rows. A prompt's ids thus hold text tokens and
item tokens in one list (`rosepo.model.tokenize.encode_prompt` puts each item id right after its
title), and everything that passes ids around (log-probs with prefix sharing, greedy decoding with
the KV cache, the pairs' stored ``prompt_ids``) works unchanged. `HybridItemLM.forward` embeds the
text ids with the LM's own embedding, replaces each item id's embedding by
``projector(table[id - offset])`` and runs the LM on ``inputs_embeds``, so any HF causal LM
works. Answers stay titles in text: every metric keeps its meaning. Row 0 of the table is zeros,
the row of an item the oracle has no vector for.

The file (`rosepo.layout.ITEM_EMBEDDINGS`, safetensors): ``table`` (N + 1, d), the projector's
weights (``projector.*``, LLaRA's shape: Linear(d, H) → GELU → Linear(H, H), H the LM's hidden
size) and metadata ``item_ids`` (JSON, the items of rows 1..N) and ``offset``. The model stage
writes it with a seeded projector; SFT and alignment train the projector next to the adapter and
export the file beside it; every later stage loads it from there (`rosepo.layout.find_items`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from rosepo.errors import ConfigError


class ItemTokens:
    """The id of each item's token: ``offset + row`` (row 0 for an item without a vector).

    Reads only the file's header, so tokenising workers do not load the weights."""

    def __init__(self, item_ids: Iterable[str], offset: int):
        self.item_ids = list(item_ids)
        self.offset = int(offset)
        self.rows = {item: k + 1 for k, item in enumerate(self.item_ids)}

    @classmethod
    def read(cls, path: str | Path) -> "ItemTokens":
        """The item ids and offset of an item-embeddings file."""
        meta = _metadata(path)
        return cls(json.loads(meta["item_ids"]), int(meta["offset"]))

    def token(self, item_id: str) -> int:
        """The id of ``item_id``'s item token."""
        return self.offset + self.rows.get(item_id, 0)

    def prompt_items(self, sample: dict) -> list[tuple[str, int]]:
        """(title, item token id) of a sample's history then candidates: the order every prompt
        template names them in."""
        return [(title, self.token(item))
                for ids, titles in (("history_item_ids", "history_titles"), ("candidate_item_ids", "candidate_titles"))
                for item, title in zip(sample[ids], sample[titles])]


def _metadata(path: str | Path) -> dict:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte little-endian length first)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    meta = header.get("__metadata__") or {}
    if "item_ids" not in meta or "offset" not in meta:
        raise ConfigError(f"{path} is not an item-embeddings file (no item_ids/offset metadata)")
    return meta


def build_projector(item_dim: int, hidden_size: int):
    """LLaRA's projector: Linear(item_dim, hidden) → GELU → Linear(hidden, hidden)."""
    return torch.nn.Sequential(torch.nn.Linear(item_dim, hidden_size), torch.nn.GELU(),
                               torch.nn.Linear(hidden_size, hidden_size))


def write_items(path: str | Path, item_vectors: dict[str, np.ndarray], offset: int, hidden_size: int,
                seed: int = 0) -> Path:
    """Write a new item-embeddings file: the items (sorted ids) and their vectors, scaled to a mean
    row norm of 1 (the projector's input scale does not depend on the oracle's training), and a
    projector initialised under ``torch.manual_seed(seed)``."""
    from safetensors.torch import save_file

    items = sorted(item_vectors)
    if not items:
        raise ConfigError("the oracle has no item vectors to build item embeddings from")
    vectors = torch.from_numpy(np.stack([np.asarray(item_vectors[i], dtype=np.float32) for i in items]))
    vectors = vectors / vectors.norm(dim=1).mean().clamp(min=1e-12)
    table = torch.cat([torch.zeros(1, vectors.shape[1]), vectors])
    torch.manual_seed(seed)
    projector = build_projector(table.shape[1], hidden_size)
    save_file(_tensors(table, projector), str(path), metadata=_meta(items, offset))
    return Path(path)


def _tensors(table, projector) -> dict:
    return {"table": table.contiguous(),
            **{f"projector.{k}": v.detach().float().contiguous() for k, v in projector.state_dict().items()}}


def _meta(items: list[str], offset: int) -> dict:
    return {"item_ids": json.dumps(items), "offset": str(offset)}


class HybridItemLM(torch.nn.Module):
    """A causal LM whose input ids from ``items.offset`` on are item tokens (module docstring).

    Stands in for the LM wherever rosepo calls one: ``forward`` takes the LM's arguments, and
    ``get_input_embeddings``, ``get_output_embeddings`` and ``config`` are the LM's. The projector
    trains; the table is a constant buffer (not in checkpoints: the item file holds it)."""

    def __init__(self, lm, table, projector, items: ItemTokens):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.items = items
        self.register_buffer("table", table, persistent=False)

    @property
    def config(self):
        return self.lm.config

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def embed(self, input_ids):
        """Input embeddings of ``input_ids``: the LM's for text ids, the projected oracle
        vectors for item ids."""
        offset = self.items.offset
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(max=offset - 1))
        is_item = input_ids >= offset
        if bool(is_item.any()):
            vectors = self.projector(self.table[input_ids[is_item] - offset].to(embeds.dtype))
            embeds = embeds.index_put(is_item.nonzero(as_tuple=True), vectors.to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, **kwargs):
        return self.lm(inputs_embeds=self.embed(input_ids), **kwargs)

    def save_items(self, path: str | Path) -> None:
        """Write the item file (the table, this projector's weights, the ids) to ``path``."""
        from safetensors.torch import save_file

        save_file(_tensors(self.table.float().cpu(), self.projector), str(path),
                  metadata=_meta(self.items.item_ids, self.items.offset))


def attach_items(lm, path: str | Path, *, trainable: bool):
    """``lm`` wrapped with the item file at ``path`` (its table and projector, on the LM's device
    and dtype); the projector trains when ``trainable``. Refuses a file made for another LM (its
    offset must be the LM's embedding rows, its projector's width the LM's hidden size)."""
    from safetensors.torch import load_file

    items = ItemTokens.read(path)
    tensors = load_file(str(path))
    emb = lm.get_input_embeddings().weight
    rows, hidden = emb.shape
    if items.offset != rows:
        raise ConfigError(f"{path} was made for a model with {items.offset} embedding rows; this one has {rows}: "
                          "rebuild the model stage")
    table = tensors.pop("table")
    projector = build_projector(table.shape[1], tensors["projector.2.weight"].shape[0])
    if projector[2].out_features != hidden:
        raise ConfigError(f"{path}'s projector maps into {projector[2].out_features} dimensions; the model's "
                          f"hidden size is {hidden}")
    projector.load_state_dict({k.removeprefix("projector."): v for k, v in tensors.items()})
    projector.to(device=emb.device, dtype=emb.dtype).requires_grad_(trainable)
    return HybridItemLM(lm, table.to(emb.device), projector, items)
