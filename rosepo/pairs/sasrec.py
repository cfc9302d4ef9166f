"""The SASRec model the preference oracle is made of, which is also the conventional sequential-
recommender baseline: its vocabulary, the network, scoring and loading (`rosepo.pairs.oracle`
trains it).

SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): item embedding
plus a learned positional embedding, causal self-attention blocks, a final layer norm; the user
is the output at the last history position and an item's score is its dot product with the
item's (shared, input) embedding. No pickle anywhere: weights go through safetensors,
everything else through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rosepo.config import OracleConfig
from rosepo.data.samples import SPLITS, read_split
from rosepo.errors import DataError
from rosepo.eval.metrics import ranking_metrics

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
#: Rows scored per forward pass in `Oracle.score`.
SCORE_BATCH = 1024


class ItemVocab:
    """Item id string ↔ int index; index 0 is padding, ``item_ids[k]`` has index ``k + 1``."""

    def __init__(self, item_ids: Iterable[str]):
        self.item_ids = list(item_ids)
        self.index = {item: k + 1 for k, item in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise DataError("item vocabulary has duplicate item ids")

    def __len__(self) -> int:
        """Number of indices, padding included (the embedding table's rows)."""
        return len(self.item_ids) + 1

    @classmethod
    def from_samples(cls, samples_dir: str | Path) -> "ItemVocab":
        """Every item id in the histories, targets and candidates of every split, sorted."""
        items: set[str] = set()
        for split in SPLITS:
            table = read_split(samples_dir, split)
            for name in ("history_item_ids", "candidate_item_ids"):
                items.update(table.column(name).combine_chunks().flatten().to_pylist())
            items.update(table.column("target_item_id").to_pylist())
        if not items:
            raise DataError(f"samples folder {samples_dir} holds no items")
        return cls(sorted(items))

    def encode(self, items: Sequence[str]) -> list[int]:
        """Indices of ``items``; an id outside the vocabulary raises `DataError` naming it."""
        try:
            return [self.index[i] for i in items]
        except KeyError as e:
            raise DataError(f"item id {e.args[0]!r} is not in the oracle's vocabulary "
                            f"({len(self.item_ids)} items)") from None

    def encode_histories(self, histories: Sequence[Sequence[str]], max_len: int) -> np.ndarray:
        """(B, max_len) int64 indices, left-padded with 0, keeping each history's last ``max_len``.

        Left padding puts every history's last item at the last position, which is the one
        read as the user's representation. Raises `DataError` for an empty history.
        """
        out = np.zeros((len(histories), max_len), dtype=np.int64)
        for row, history in enumerate(histories):
            if len(history) == 0:
                raise DataError(f"history of row {row} is empty: the oracle needs at least one item")
            idx = self.encode(history[-max_len:])
            out[row, max_len - len(idx):] = idx
        return out

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: ``{"padding_index": 0, "item_ids": [...]}``."""
        Path(path).write_text(json.dumps({"padding_index": 0, "item_ids": self.item_ids}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ItemVocab":
        """Read a vocabulary written by `save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and data.get("padding_index") == 0
                and isinstance(data.get("item_ids"), list)):
            raise DataError("not an oracle vocabulary: expected padding_index 0 and an item_ids list",
                            file=str(path))
        return cls(data["item_ids"])


class SASRec(nn.Module):
    """SASRec over left-padded index sequences (0 = padding).

    ``encode(seq)`` gives the hidden state at every position (B, L, d); ``forward(seq)``
    gives the scores of every vocabulary item for the user at the last position (B, V),
    with the padding index at -inf so a softmax never picks it.
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 dropout: float, max_len: int):
        super().__init__()
        self.max_len, self.num_heads = max_len, num_heads
        self.item_emb = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        self.emb_dropout = nn.Dropout(dropout)
        # Pre-norm blocks with a point-wise feed-forward of width d, as in the paper.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, num_heads, dim_feedforward=hidden_size,
                                       dropout=dropout, activation="relu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        # Item vectors of norm about 1: the inputs are scaled by sqrt(d) (as in the paper) to
        # unit-variance coordinates, and the initial scores stay of order 1 (N(0, 1) rows, the
        # default, give scores of spread sqrt(d) and a first-epoch loss of ~20).
        nn.init.normal_(self.item_emb.weight, std=hidden_size ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def attention_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """(B * heads, L, L) bool, True where attention is blocked.

        Query i may see key j when j <= i (causal) and j is an item; a padding query sees
        only itself, so no row is fully blocked (which would give NaN).
        """
        length = seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        is_item = (seq != 0)[:, None, :]
        diagonal = torch.eye(length, dtype=torch.bool, device=seq.device)
        allowed = causal & (is_item | diagonal)
        return (~allowed).repeat_interleave(self.num_heads, dim=0)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, d) of index sequences (B, L), L <= max_len."""
        length = seq.shape[1]
        if length > self.max_len:
            raise DataError(f"sequence length {length} exceeds the oracle's max_len {self.max_len}")
        # The last position always has positional index max_len - 1, whatever L is.
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos)
        x = self.emb_dropout(x)
        # Padding never serves as a key to an item (see attention_mask), so the states at
        # padding positions, which are never read, need no zeroing.
        mask = self.attention_mask(seq)
        for block in self.blocks:
            x = block(x, src_mask=mask)
        return self.norm(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores (B, V) of every vocabulary index for the user at the last position."""
        user = self.encode(seq)[:, -1]
        logits = user @ self.item_emb.weight.T
        return logits.index_fill(1, torch.zeros(1, dtype=torch.long, device=seq.device), float("-inf"))


def build_model(cfg: OracleConfig, vocab_size: int):
    """A freshly initialised `SASRec` of ``cfg`` over ``vocab_size`` indices (padding included)."""
    return SASRec(vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dropout, cfg.max_len)


class Oracle:
    """A trained SASRec with its vocabulary, scoring candidates for histories (eval mode, no grad)."""

    def __init__(self, model, vocab: ItemVocab, cfg: OracleConfig):
        self.model, self.vocab, self.cfg = model.eval(), vocab, cfg

    def item_vectors(self) -> dict[str, np.ndarray]:
        """Item id -> its learned embedding row (float32), padding excluded."""
        weight = self.model.item_emb.weight.detach().numpy()
        return {item: weight[k].copy() for item, k in self.vocab.index.items()}

    def score(self, histories: list[list[str]], candidates: list[list[str]]) -> np.ndarray:
        """Scores (B, C) float32 of each row's C candidates for its history, batched.

        Every row must have the same number of candidates. Raises `DataError` for an unknown
        item id (named), an empty history, or misaligned/ragged inputs.
        """
        if len(histories) != len(candidates):
            raise DataError(f"{len(histories)} histories and {len(candidates)} candidate lists: "
                            "they must be aligned one per row")
        if not histories:
            return np.zeros((0, 0), dtype=np.float32)
        width = len(candidates[0])
        if any(len(c) != width for c in candidates):
            raise DataError(f"candidate lists differ in length; every row needs {width} candidates")
        seqs = torch.from_numpy(self.vocab.encode_histories(histories, self.cfg.max_len))
        cands = torch.tensor([self.vocab.encode(c) for c in candidates], dtype=torch.long)
        return score_indices(self.model, seqs, cands)


def score_indices(model: SASRec, seqs, cands, device="cpu") -> np.ndarray:
    """Scores (B, C) float32 of index sequences (B, L) for candidate indices (B, C), batched
    (`SCORE_BATCH` rows per forward) on ``device``, without gradients; the model in eval mode."""
    out = []
    with torch.no_grad():
        for start in range(0, len(seqs), SCORE_BATCH):
            logits = model(seqs[start:start + SCORE_BATCH].to(device))
            out.append(logits.gather(1, cands[start:start + SCORE_BATCH].to(device)).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def load_oracle(out_dir: str | Path) -> Oracle:
    """Load an oracle written by `train_oracle` (safetensors weights, JSON config and vocab)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    for name in (WEIGHTS, CONFIG, VOCAB):
        if not (out_dir / name).is_file():
            raise DataError(f"oracle folder {out_dir} has no {name}: train it with train_oracle first")
    saved = json.loads((out_dir / CONFIG).read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(OracleConfig)}
    cfg = OracleConfig(**{k: v for k, v in saved.items() if k in known})
    vocab = ItemVocab.load(out_dir / VOCAB)
    if saved.get("vocab_size") != len(vocab):
        raise DataError(f"config.json says vocab_size {saved.get('vocab_size')} but vocab.json has "
                        f"{len(vocab)} indices", file=str(out_dir / CONFIG))
    model = build_model(cfg, len(vocab))
    model.load_state_dict(load_file(str(out_dir / WEIGHTS)))
    return Oracle(model, vocab, cfg)


def evaluate_oracle(oracle, samples_dir: str | Path, split: str) -> dict:
    """HR@k and NDCG@k (k = 1, 5, 10) of ``oracle.score`` under the candidate protocol of ``split``.

    ``oracle`` is anything with `Oracle.score`'s signature (an `Oracle`, a baseline, a fake).

    The target is ranked among its candidates by score, ties counted against it
    (`rosepo.eval.metrics.ranking_metrics`); ``n`` is the number of samples.
    """
    table = read_split(samples_dir, split)
    if len(table) == 0:
        raise DataError(f"split {split!r} of {samples_dir} has no samples to evaluate")
    candidates = table.column("candidate_item_ids").to_pylist()
    targets = [c.index(t) for c, t in zip(candidates, table.column("target_item_id").to_pylist())]
    scores = oracle.score(table.column("history_item_ids").to_pylist(), candidates)
    return ranking_metrics(scores, targets, ks=(1, 5, 10)) | {"n": len(targets)}
