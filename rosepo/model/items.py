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

The user token (``model.user_token: sasrec``; CoLLM's collaborative user embedding): the last id
of a prompt, after "Answer:", is ``user_base + h`` (``user_base = offset + N + 1``, h the number
of history titles); its input embedding is ``user_projector(SASRec(first h item tokens of the
row))``, the oracle's user state for that history, so the position that predicts the answer reads
what the oracle knows about the user directly. The oracle is a constant copy (its item rows in
the table's row order, row 0 padding), outside the module tree: never trained, never partitioned
by ZeRO-3, never wrapped by peft. Placed after the history instead, the same vector did not help
in 500 steps (docs/record.md, "The oracle's user state as the last prompt token").

The file (`rosepo.layout.ITEM_EMBEDDINGS`, safetensors): ``table`` (N + 1, d), the projector's
weights (``projector.*``, LLaRA's shape: Linear(d, H) → GELU → Linear(H, H), H the LM's hidden
size) and metadata ``item_ids`` (JSON, the items of rows 1..N) and ``offset``; with a user token
also ``user_encoder.*`` (the oracle's SASRec weights), ``user_projector.*`` (the same shape from
the oracle's width) and metadata ``user`` (the SASRec config, JSON). The model stage writes it
with seeded projectors; SFT and alignment train the projectors next to the adapter and export the
file beside it; every later stage loads it from there (`rosepo.layout.find_items`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from rosepo.errors import ConfigError
from rosepo.pairs.sasrec import SASRec


class ItemTokens:
    """The id of each item's token: ``offset + row`` (row 0 for an item without a vector).

    Reads only the file's header, so tokenising workers do not load the weights."""

    def __init__(self, item_ids: Iterable[str], offset: int, user: bool = False):
        self.item_ids = list(item_ids)
        self.offset = int(offset)
        self.rows = {item: k + 1 for k, item in enumerate(self.item_ids)}
        #: The user token of a history of h titles is ``user_base + h``; None without user tokens.
        self.user_base = self.offset + len(self.item_ids) + 1 if user else None

    @classmethod
    def read(cls, path: str | Path) -> "ItemTokens":
        """The item ids, offset and user token of an item-embeddings file."""
        meta = _metadata(path)
        return cls(json.loads(meta["item_ids"]), int(meta["offset"]), user="user" in meta)

    def token(self, item_id: str) -> int:
        """The id of ``item_id``'s item token."""
        return self.offset + self.rows.get(item_id, 0)

    def prompt_items(self, sample: dict) -> list[tuple[str | None, int]]:
        """(title, item token id) of a sample's history then candidates: the order every prompt
        template names them in; with user tokens, last, (None, the user token of the history):
        `rosepo.model.tokenize.encode_prompt` puts an id without a title after the prompt."""
        pairs = [(title, self.token(item))
                 for ids, titles in (("history_item_ids", "history_titles"), ("candidate_item_ids", "candidate_titles"))
                 for item, title in zip(sample[ids], sample[titles])]
        if self.user_base is not None:
            pairs.append((None, self.user_base + len(sample["history_item_ids"])))
        return pairs


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


def title_projection(hidden_size: int, dim: int):
    """The fixed map of ``dim``-dimensional item vectors into the hidden space: a (hidden, dim)
    matrix with orthonormal columns, from a seeded Gaussian (QR), so distances are kept."""
    gaussian = torch.randn(hidden_size, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.linalg.qr(gaussian)[0].float()


def align_user_projector(projector, encoder, norm: float = 1.0) -> None:
    """Set ``projector`` (`build_projector`'s shape, d -> H, 2d <= H) to the linear map
    u -> a · `title_projection`(H, d) · u, in place: the user token then starts as the oracle's
    user state in the very space where `rosepo.model.factory.add_title_vectors` put its item
    vectors, so the tied answer logits h·e_t start out as SASRec's scores u·v_t (the residual
    stream at the last position is the user token plus small layer outputs at initialisation).

    Exact through the GELU: GELU(x) - GELU(-x) = x, so the first layer writes (u, -u) and the
    second P·(GELU(u) - GELU(-u)); the hidden units past 2d keep their random input weights and
    get zero output weights, so they add nothing at first and still learn. ``a`` gives the user
    token a mean norm of about ``norm``, from the encoder's final layer norm (its output's
    expected norm is |(gamma, beta)|)."""
    first, second = projector[0], projector[2]
    d, hidden = first.in_features, second.out_features
    if 2 * d > first.out_features:
        raise ConfigError(f"model.user_init: sasrec needs the oracle's width ({d}) at most half the model's hidden "
                          f"size ({hidden})")
    gamma, beta = encoder.norm.weight.detach(), encoder.norm.bias.detach()
    a = norm / max(float(torch.cat([gamma, beta]).norm()), 1e-12)
    proj = title_projection(hidden, d)
    eye = torch.eye(d)
    with torch.no_grad():  # the other hidden units keep their random input rows and start silent
        first.weight[:2 * d] = torch.cat([eye, -eye])
        first.bias[:2 * d] = 0.0
        second.weight.zero_()
        second.bias.zero_()
        second.weight[:, :2 * d] = torch.cat([a * proj, -a * proj], dim=1)


class UserState:
    """The user token's embedding: ``projector(encoder.encode(history rows)[:, -1])``.

    ``encoder`` is a `SASRec` over the item table's rows (row 0 padding), a constant in eval mode;
    ``config`` its shape (``hidden_size``, ``num_layers``, ``num_heads``, ``max_len``)."""

    def __init__(self, encoder, projector, config: dict):
        self.encoder, self.projector, self.config = encoder.eval().requires_grad_(False), projector, dict(config)

    @classmethod
    def from_oracle(cls, oracle, items: list[str], hidden_size: int, aligned: bool = False) -> "UserState":
        """The oracle's SASRec with its item rows reordered to ``items`` (rows 1..N) and a new
        projector into ``hidden_size`` (drawn from torch's current random state, or with
        ``aligned`` the linear map of `align_user_projector`)."""
        c = oracle.cfg
        config = {"hidden_size": c.hidden_size, "num_layers": c.num_layers, "num_heads": c.num_heads,
                  "max_len": c.max_len}
        encoder = _encoder(config, len(items) + 1)
        state = {k: v.detach().clone() for k, v in oracle.model.state_dict().items()}
        source = state["item_emb.weight"]
        state["item_emb.weight"] = torch.cat([torch.zeros(1, source.shape[1]),
                                              source[[oracle.vocab.index[i] for i in items]]])
        encoder.load_state_dict(state)
        projector = build_projector(c.hidden_size, hidden_size)
        if aligned:
            align_user_projector(projector, encoder)
        return cls(encoder, projector, config)

    def history_rows(self, input_ids, user_base: int, offset: int):
        """(positions of the user tokens as (rows, columns), the oracle's input (U, max_len)): for
        each user token ``user_base + h`` the table rows of the first h item tokens of its row, the
        last ``max_len`` of them, left-padded with 0."""
        is_user = input_ids >= user_base
        is_item = (input_ids >= offset) & ~is_user
        where = is_user.nonzero(as_tuple=True)
        length = self.config["max_len"]
        seqs = torch.zeros((len(where[0]), length), dtype=torch.long, device=input_ids.device)
        for k, (b, t) in enumerate(zip(*where)):
            rows = input_ids[b, :t][is_item[b, :t]] - offset
            rows = rows[:int(input_ids[b, t]) - user_base][-length:]
            seqs[k, length - len(rows):] = rows
        return where, seqs

    def vectors(self, seqs, dtype):
        """The user tokens' embeddings (U, H) of the oracle inputs ``seqs`` (`history_rows`)."""
        first = self.projector[0].weight
        if next(self.encoder.parameters()).device != first.device:
            self.encoder.to(first.device)
        with torch.no_grad():
            state = self.encoder.encode(seqs.to(first.device))[:, -1]
        return self.projector(state.to(first.dtype)).to(dtype)


def _encoder(config: dict, rows: int):
    return SASRec(rows, config["hidden_size"], config["num_layers"], config["num_heads"], 0.0, config["max_len"])


def write_items(path: str | Path, item_vectors: dict[str, np.ndarray], offset: int, hidden_size: int,
                seed: int = 0, oracle=None, user_init: str = "random") -> Path:
    """Write a new item-embeddings file: the items (sorted ids) and their vectors, scaled to a mean
    row norm of 1 (the projector's input scale does not depend on the oracle's training), and a
    projector initialised under ``torch.manual_seed(seed)``; with ``oracle`` (a
    `rosepo.pairs.sasrec.Oracle`) the user token's encoder and projector too (`UserState`), the
    projector random or, with ``user_init="sasrec"``, aligned with the title vectors
    (`align_user_projector`)."""
    from safetensors.torch import save_file

    items = sorted(item_vectors)
    if not items:
        raise ConfigError("the oracle has no item vectors to build item embeddings from")
    vectors = torch.from_numpy(np.stack([np.asarray(item_vectors[i], dtype=np.float32) for i in items]))
    vectors = vectors / vectors.norm(dim=1).mean().clamp(min=1e-12)
    table = torch.cat([torch.zeros(1, vectors.shape[1]), vectors])
    torch.manual_seed(seed)
    projector = build_projector(table.shape[1], hidden_size)
    user = (UserState.from_oracle(oracle, items, hidden_size, aligned=user_init == "sasrec")
            if oracle is not None else None)
    save_file(_tensors(table, projector, user), str(path), metadata=_meta(items, offset, user))
    return Path(path)


def _tensors(table, projector, user: UserState | None = None) -> dict:
    out = {"table": table.contiguous(),
           **{f"projector.{k}": v.detach().float().contiguous() for k, v in projector.state_dict().items()}}
    if user is not None:
        out |= {f"user_projector.{k}": v.detach().float().cpu().contiguous()
                for k, v in user.projector.state_dict().items()}
        out |= {f"user_encoder.{k}": v.detach().float().cpu().contiguous()
                for k, v in user.encoder.state_dict().items()}
    return out


def _meta(items: list[str], offset: int, user: UserState | None = None) -> dict:
    meta = {"item_ids": json.dumps(items), "offset": str(offset)}
    if user is not None:
        meta["user"] = json.dumps(user.config, sort_keys=True)
    return meta


class HybridItemLM(torch.nn.Module):
    """A causal LM whose input ids from ``items.offset`` on are item tokens (module docstring).

    Stands in for the LM wherever rosepo calls one: ``forward`` takes the LM's arguments, and
    ``get_input_embeddings``, ``get_output_embeddings`` and ``config`` are the LM's. The projector
    trains; the table is a constant buffer (not in checkpoints: the item file holds it). With
    ``user`` (a `UserState`, when ``items`` has user tokens) its projector is a trained submodule
    (``user_projector``) and its encoder a constant kept outside the module tree."""

    def __init__(self, lm, table, projector, items: ItemTokens, user: UserState | None = None):
        super().__init__()
        if (user is None) != (items.user_base is None):
            raise ConfigError("the item tokens name a user token but no user state was given, or the reverse")
        self.lm = lm
        self.projector = projector
        self.items = items
        self.register_buffer("table", table, persistent=False)
        self.user_projector = user.projector if user is not None else None
        self._user = user

    @property
    def config(self):
        return self.lm.config

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def embed(self, input_ids):
        """Input embeddings of ``input_ids``: the LM's for text ids, the projected oracle
        vectors for item ids, the projected oracle user state for user ids (module docstring)."""
        offset, user_base = self.items.offset, self.items.user_base
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(max=offset - 1))
        is_item = input_ids >= offset
        if user_base is not None:
            is_item &= input_ids < user_base
        if bool(is_item.any()):
            vectors = self.projector(self.table[input_ids[is_item] - offset].to(embeds.dtype))
            embeds = embeds.index_put(is_item.nonzero(as_tuple=True), vectors.to(embeds.dtype))
        if user_base is not None and bool((input_ids >= user_base).any()):
            where, seqs = self._user.history_rows(input_ids, user_base, offset)
            embeds = embeds.index_put(where, self._user.vectors(seqs, embeds.dtype))
        return embeds

    def forward(self, input_ids=None, **kwargs):
        return self.lm(inputs_embeds=self.embed(input_ids), **kwargs)

    def save_items(self, path: str | Path) -> None:
        """Write the item file (the table, this projector's weights, the ids; the user state) to ``path``."""
        from safetensors.torch import save_file

        save_file(_tensors(self.table.float().cpu(), self.projector, self._user), str(path),
                  metadata=_meta(self.items.item_ids, self.items.offset, self._user))


def attach_items(lm, path: str | Path, *, trainable: bool):
    """``lm`` wrapped with the item file at ``path`` (its table and projector, on the LM's device
    and dtype); the projector trains when ``trainable``. Refuses a file made for another LM (its
    offset must be the LM's embedding rows, its projector's width the LM's hidden size)."""
    from safetensors.torch import load_file

    items = ItemTokens.read(path)
    tensors = load_file(str(path))
    emb = lm.get_input_embeddings().weight
    rows, hidden = getattr(emb, "ds_shape", emb.shape)  # a ZeRO-3 partition holds a flat shard
    if items.offset != rows:
        raise ConfigError(f"{path} was made for a model with {items.offset} embedding rows; this one has {rows}: "
                          "rebuild the model stage")
    table = tensors.pop("table")
    projector = build_projector(table.shape[1], tensors["projector.2.weight"].shape[0])
    if projector[2].out_features != hidden:
        raise ConfigError(f"{path}'s projector maps into {projector[2].out_features} dimensions; the model's "
                          f"hidden size is {hidden}")
    projector.load_state_dict(_part(tensors, "projector."))
    projector.to(device=emb.device, dtype=emb.dtype).requires_grad_(trainable)
    user = None
    if items.user_base is not None:
        config = json.loads(_metadata(path)["user"])
        encoder = _encoder(config, len(table))
        encoder.load_state_dict(_part(tensors, "user_encoder."))
        user_projector = build_projector(config["hidden_size"], hidden)
        user_projector.load_state_dict(_part(tensors, "user_projector."))
        user_projector.to(device=emb.device, dtype=emb.dtype).requires_grad_(trainable)
        user = UserState(encoder.to(emb.device), user_projector, config)
    return HybridItemLM(lm, table.to(emb.device), projector, items, user)


def _part(tensors: dict, prefix: str) -> dict:
    """The tensors named ``prefix``*, the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
