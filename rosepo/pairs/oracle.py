"""The SASRec preference oracle, which is also the conventional sequential-recommender baseline.

SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): item embedding
plus a learned positional embedding, causal self-attention blocks, a final layer norm; the user
is the output at the last history position and an item's score is its dot product with the
item's (shared, input) embedding.

Stage graph of this module: samples folder → `ItemVocab` over every item id of every split →
Ray Train `TorchTrainer` running `oracle_train_loop` (next-item prediction, full softmax over
the vocabulary, AdamW; torch DDP when ``num_workers > 1``) → rank 0 reports the weights as a
safetensors checkpoint → the driver writes ``model.safetensors``, ``config.json``,
``vocab.json`` and ``manifest.json`` (valid/test ranking metrics) atomically into ``out_dir``.

What it does not do: early stopping, learning-rate schedules, resuming, or training on every
position of a history (each sample trains its last position only: the samples are already
sliding windows, so the earlier positions are other samples' targets). No pickle anywhere:
weights go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rosepo.config import OracleConfig
from rosepo.data.samples import SPLITS, read_split
from rosepo.errors import DataError
from rosepo.storage import atomic_dir, write_manifest

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


def _encode_train(samples_dir: str, vocab: ItemVocab, cfg: OracleConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train histories (N, max_len) and target indices (N,), a seeded subset if ``max_samples``."""
    table = read_split(samples_dir, "train")
    histories = table.column("history_item_ids").to_pylist()
    targets = table.column("target_item_id").to_pylist()
    if cfg.max_samples and cfg.max_samples < len(targets):
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(targets), cfg.max_samples, replace=False))
        histories, targets = [histories[i] for i in keep], [targets[i] for i in keep]
    return vocab.encode_histories(histories, cfg.max_len), np.asarray(vocab.encode(targets), dtype=np.int64)


def oracle_train_loop(config: dict) -> None:
    """Ray Train worker loop: next-item cross-entropy over the whole vocabulary, AdamW.

    ``config``: ``samples_dir``, ``oracle`` (OracleConfig fields), ``item_ids`` (the vocabulary).
    Each epoch every rank takes its share (``perm[rank::world]``) of one seeded permutation, in
    batches of ``batch_size // world`` so the global batch does not depend on the worker count,
    and reports the epoch's mean loss over all ranks. The last report carries rank 0's weights
    as a safetensors checkpoint.
    """
    import tempfile

    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    cfg = OracleConfig(**config["oracle"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    vocab = ItemVocab(config["item_ids"])
    seqs, targets = (torch.from_numpy(a) for a in _encode_train(config["samples_dir"], vocab, cfg))

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = ray.train.torch.prepare_model(build_model(cfg, len(vocab)))
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)  # same permutation on every rank
    torch.manual_seed(cfg.seed + 1 + rank)  # distinct dropout per rank
    per_rank = len(targets) // world
    batch = max(1, cfg.batch_size // world)
    losses = []
    for epoch in range(cfg.epochs):
        model.train()
        mine = torch.randperm(len(targets), generator=order)[:per_rank * world][rank::world]
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, per_rank, batch):
            idx = mine[start:start + batch]
            logits = model(seqs[idx].to(device))
            loss = torch.nn.functional.cross_entropy(logits, targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total[0] / total[1]))
        metrics = {"epoch": epoch + 1, "loss": losses[-1]}
        if epoch + 1 < cfg.epochs:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                net = model.module if hasattr(model, "module") else model
                save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                          str(Path(tmp) / WEIGHTS))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics | {"loss_per_epoch": losses}, checkpoint=checkpoint)


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
        out = []
        with torch.no_grad():
            for start in range(0, len(seqs), SCORE_BATCH):
                logits = self.model(seqs[start:start + SCORE_BATCH])
                out.append(logits.gather(1, cands[start:start + SCORE_BATCH]))
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
    from rosepo.eval.metrics import ranking_metrics

    table = read_split(samples_dir, split)
    if len(table) == 0:
        raise DataError(f"split {split!r} of {samples_dir} has no samples to evaluate")
    candidates = table.column("candidate_item_ids").to_pylist()
    targets = [c.index(t) for c, t in zip(candidates, table.column("target_item_id").to_pylist())]
    scores = oracle.score(table.column("history_item_ids").to_pylist(), candidates)
    return ranking_metrics(scores, targets, ks=(1, 5, 10)) | {"n": len(targets)}


def train_oracle(samples_dir: str | Path, cfg: OracleConfig, out_dir: str | Path) -> dict:
    """Train the oracle on the train split of ``samples_dir`` with Ray Train; return its manifest.

    ``out_dir`` gets (atomically) ``model.safetensors``, ``config.json`` (OracleConfig fields
    plus ``vocab_size``), ``vocab.json`` and ``manifest.json`` with the loss per epoch and the
    valid/test metrics. ``cfg`` is checked when the run's config is loaded
    (`rosepo.config.RunConfig.validate`). Raises `DataError` for a train split with fewer
    samples than workers, before Ray starts. Starts a local Ray if none
    is connected. Workers read the samples by path and the run's Ray storage lies inside the
    output's temporary folder, so on a multi-node cluster both must be on shared storage.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rosepo.train.raysetup import init_ray

    t0 = time.perf_counter()
    samples_dir = str(Path(samples_dir).resolve())
    n_train = len(read_split(samples_dir, "train"))
    if n_train < cfg.num_workers:
        raise DataError(f"samples folder {samples_dir} has {n_train} train samples; the oracle needs at "
                        f"least one per worker ({cfg.num_workers})")
    vocab = ItemVocab.from_samples(samples_dir)
    init_ray()
    with atomic_dir(out_dir, overwrite=True) as tmp:
        trainer = TorchTrainer(
            oracle_train_loop,
            train_loop_config={"samples_dir": samples_dir, "oracle": dataclasses.asdict(cfg),
                               "item_ids": vocab.item_ids},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=False),
            run_config=RunConfig(name="oracle", storage_path=str(tmp / "ray"),
                                 failure_config=FailureConfig(max_failures=0)))
        t_fit = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - t_fit
        with result.checkpoint.as_directory() as ckpt:
            shutil.copyfile(Path(ckpt) / WEIGHTS, tmp / WEIGHTS)
        shutil.rmtree(tmp / "ray")
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(cfg) | {"vocab_size": len(vocab)},
                                             indent=2, sort_keys=True), encoding="utf-8")
        vocab.save(tmp / VOCAB)
        oracle = load_oracle(tmp)
        manifest = {
            "stage": "oracle",
            "config": dataclasses.asdict(cfg),
            "samples_dir": samples_dir,
            "vocab_size": len(vocab),
            "train_samples": min(n_train, cfg.max_samples or n_train),
            "loss_per_epoch": result.metrics["loss_per_epoch"],
            "metrics": {split: evaluate_oracle(oracle, samples_dir, split) for split in ("valid", "test")},
            "fit_seconds": round(fit_seconds, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, manifest)
    return manifest
