"""The oracle stage: train the SASRec preference oracle (`rosepo.pairs.sasrec`) with Ray Train.

Stage graph of this module: samples folder → `ItemVocab` over every item id of every split →
Ray Train `TorchTrainer` running `oracle_train_loop` (next-item prediction, full softmax over
the vocabulary, AdamW; torch DDP when ``num_workers > 1``) → rank 0 reports the weights as a
safetensors checkpoint → the driver writes ``model.safetensors``, ``config.json``,
``vocab.json`` and ``manifest.json`` (valid/test ranking metrics) atomically into ``out_dir``.

The budget is a number of steps (``oracle.max_steps``) or of epochs; the weights kept are those
with the best valid NDCG@5 of the evaluations along the way (``oracle.eval_every``), so a budget
too long for a small data set costs time, not quality.

What it does not do: learning-rate schedules, resuming, or training on every position of a
history (each sample trains its last position only: the samples are already sliding windows, so
the earlier positions are other samples' targets). No pickle anywhere:
weights go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rosepo.config import OracleConfig
from rosepo.data.samples import read_split
from rosepo.errors import DataError
from rosepo.eval.metrics import ranking_metrics
from rosepo.pairs.sasrec import (CONFIG, VOCAB, WEIGHTS, ItemVocab, build_model, evaluate_oracle, load_oracle,
                                 score_indices)
from rosepo.runtime import train_logging
from rosepo.storage import atomic_dir, write_manifest

#: Splits the trained oracle is evaluated on (its manifest's ``metrics``).
EVAL_SPLITS = ("valid", "test")


def _encode_train(samples_dir: str, vocab: ItemVocab, cfg: OracleConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train histories (N, max_len) and target indices (N,), a seeded subset if ``max_samples``."""
    table = read_split(samples_dir, "train")
    histories = table.column("history_item_ids").to_pylist()
    targets = table.column("target_item_id").to_pylist()
    if cfg.max_samples and cfg.max_samples < len(targets):
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(targets), cfg.max_samples, replace=False))
        histories, targets = [histories[i] for i in keep], [targets[i] for i in keep]
    return vocab.encode_histories(histories, cfg.max_len), np.asarray(vocab.encode(targets), dtype=np.int64)


def _encode_valid(samples_dir: str, vocab: ItemVocab, cfg: OracleConfig):
    """Valid histories (N, max_len), candidate indices (N, C) and the target's position (N,)."""
    table = read_split(samples_dir, "valid")
    candidates = table.column("candidate_item_ids").to_pylist()
    targets = [c.index(t) for c, t in zip(candidates, table.column("target_item_id").to_pylist())]
    return (torch.from_numpy(vocab.encode_histories(table.column("history_item_ids").to_pylist(), cfg.max_len)),
            torch.tensor([vocab.encode(c) for c in candidates], dtype=torch.long), targets)


def oracle_train_loop(config: dict) -> None:
    """Ray Train worker loop: next-item cross-entropy over the whole vocabulary, AdamW.

    ``config``: ``samples_dir``, ``oracle`` (OracleConfig fields), ``item_ids`` (the vocabulary).
    Each epoch every rank takes its share (``perm[rank::world]``) of one seeded permutation, in
    batches of ``batch_size // world`` so the global batch does not depend on the worker count.
    The run lasts ``max_steps`` steps (epochs cycled or cut short), or ``epochs`` epochs. Every
    ``eval_every`` steps and at the end rank 0 scores the valid split and keeps a copy of the
    weights with the best NDCG@5; the one report, at the end, carries them as a safetensors
    checkpoint, with the loss per epoch and the valid history.
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
    valid = _encode_valid(config["samples_dir"], vocab, cfg) if rank == 0 else None

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = ray.train.torch.prepare_model(build_model(cfg, len(vocab)))
    net = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)  # same permutation on every rank
    torch.manual_seed(cfg.seed + 1 + rank)  # distinct dropout per rank
    per_rank = len(targets) // world
    batch = max(1, cfg.batch_size // world)
    per_epoch = math.ceil(per_rank / batch)
    total = cfg.max_steps or cfg.epochs * per_epoch
    eval_every = cfg.eval_every or max(1, total // 20)
    losses, history, best = [], [], None
    epoch_loss = torch.zeros(2, dtype=torch.float64)
    for step in range(total):
        position = step % per_epoch
        if position == 0:
            mine = torch.randperm(len(targets), generator=order)[:per_rank * world][rank::world]
        model.train()
        idx = mine[position * batch:(position + 1) * batch]
        loss = torch.nn.functional.cross_entropy(model(seqs[idx].to(device)), targets[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        epoch_loss += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        if position == per_epoch - 1 or step + 1 == total:
            if world > 1:
                dist.all_reduce(epoch_loss)
            losses.append(float(epoch_loss[0] / epoch_loss[1]))
            epoch_loss.zero_()
        if rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == total):
            scores = score_indices(net.eval(), *valid[:2], device)
            metrics = ranking_metrics(scores, valid[2], ks=(1, 5))
            history.append({"step": step + 1, **metrics})
            if best is None or metrics["ndcg@5"] > best[0]["ndcg@5"]:
                best = (history[-1], {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_file(best[1], str(Path(tmp) / WEIGHTS))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"steps": total, "loss_per_epoch": losses, "valid_history": history,
                          "best_step": best[0]["step"] if best else 0}, checkpoint=checkpoint)


def train_oracle(samples_dir: str | Path, cfg: OracleConfig, out_dir: str | Path) -> dict:
    """Train the oracle on the train split of ``samples_dir`` with Ray Train; return its manifest.

    ``out_dir`` gets (atomically) ``model.safetensors``, ``config.json`` (OracleConfig fields
    plus ``vocab_size``), ``vocab.json`` and ``manifest.json`` with the loss per epoch and the
    valid/test metrics. ``cfg`` is checked when the run's config is loaded
    (`rosepo.config.RunConfig.validate`). Raises `DataError` for a train split with fewer samples
    than workers, before any training starts. Runs on the connected Ray
    (the entry points start it). Workers read the samples by path and the run's Ray storage lies
    inside the output's temporary folder, so on a multi-node cluster both must be on shared storage.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    samples_dir = str(Path(samples_dir).resolve())
    n_train = len(read_split(samples_dir, "train"))
    if n_train < cfg.num_workers:
        raise DataError(f"samples folder {samples_dir} has {n_train} train samples; the oracle needs at "
                        f"least one per worker ({cfg.num_workers})")
    for split in EVAL_SPLITS:  # chosen on valid, reported on both: refuse an empty one before training
        if len(read_split(samples_dir, split)) == 0:
            raise DataError(f"samples folder {samples_dir} has no {split} samples to evaluate the oracle on; "
                            "give the split more users (data.split)")
    vocab = ItemVocab.from_samples(samples_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        trainer = TorchTrainer(
            oracle_train_loop,
            train_loop_config={"samples_dir": samples_dir, "oracle": dataclasses.asdict(cfg),
                               "item_ids": vocab.item_ids},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu)),
            run_config=RunConfig(name="oracle", storage_path=str(tmp / "ray"),
                                 failure_config=FailureConfig(max_failures=0), logging_config=train_logging()))
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
            "steps": result.metrics["steps"],
            "loss_per_epoch": result.metrics["loss_per_epoch"],
            "best_step": result.metrics["best_step"],
            "valid_history": result.metrics["valid_history"],
            "metrics": {split: evaluate_oracle(oracle, samples_dir, split) for split in EVAL_SPLITS},
            "fit_seconds": round(fit_seconds, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, manifest)
    return manifest
