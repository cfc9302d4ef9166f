"""Build RosePO preference pairs from samples, in one Ray Data pass over an actor pool.

Each actor holds the reference (SFT) model, the oracle and the title embeddings. Per batch of
samples it scores all candidates with the SFT model (summed answer log-likelihood, prefix
shared), with the oracle and by similarity to the history; picks the rejected candidates with the
sample's strategy; keeps the oracle's scores of chosen and rejected (ε is made from them at
training time, see `rosepo.train.align`); and keeps the SFT scores of chosen and rejected as
the reference log-probs. Those are exactly what the alignment trainer needs, so it runs no
reference model, and all Tune trials share them (they depend on neither β nor ε).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Collection

import numpy as np
import pyarrow as pa

from rosepo.data.popularity import train_popularity
from rosepo.data.prompts import stable_int
from rosepo.data.samples import length_batches, read_split, select_samples
from rosepo.errors import DataError
from rosepo.eval.metrics import parse_answer
from rosepo.layout import CATALOG_FILE, pairs_file
from rosepo.model.factory import inference_device, load_for_inference, load_tokenizer, resolve_dtype
from rosepo.model.generate import greedy_answers
from rosepo.model.logprobs import answer_logps
from rosepo.model.tokenize import encode_answer, encode_sample_prompt
from rosepo.pairs.embed import embed_titles, history_similarity
from rosepo.pairs.noise import false_negatives, flip_labels, later_positions
from rosepo.pairs.sasrec import load_oracle
from rosepo.pairs.strategies import STRATEGIES, SampleContext, assign_strategy
from rosepo.runtime import SCORER_RESTARTS
from rosepo.schema import PAIRS
from rosepo.storage import atomic_dir, rows_hash, write_manifest


#: What a `PairScorer` returns: the pair rows before `build_pairs` marks false negatives and flips
#: labels, with the rejected items' ids.
SCORED = pa.schema([f for f in PAIRS if f.name not in ("false_negative", "flipped")]
                   + [pa.field("rejected_items", pa.list_(pa.string()))])


class PairScorer:
    """Ray Data actor: SFT model + oracle + embeddings → pair rows for a batch of samples.

    The SFT model scores as the policy of alignment computes at its first step: the adapter
    unmerged, in the training dtype of the device (bfloat16 on a GPU that has it), so the
    reference log-probs it stores give a zero margin at step 0 up to that dtype's rounding."""

    def __init__(self, run_cfg: Any, base_model: str, adapter: str | None, oracle_dir: str,
                 item_vectors: dict, popularity: dict):
        use_gpu = bool(run_cfg.pairs.use_gpu)
        device = inference_device(use_gpu, "pairs.use_gpu")
        self.cfg = run_cfg
        self.tok = load_tokenizer(base_model)
        self.model = load_for_inference(base_model, adapter, device=device, merge=False,
                                        dtype=resolve_dtype(run_cfg.model.dtype, use_gpu))
        self.oracle = load_oracle(oracle_dir)
        self.vectors = item_vectors
        self.popularity = popularity

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        pc, mc = self.cfg.pairs, self.cfg.model
        rows = batch.to_pylist()
        prompt_ids = [encode_sample_prompt(self.model, self.tok, r, mc.max_prompt_tokens) for r in rows]
        cand_ids = [[encode_answer(self.tok, t, mc.max_answer_tokens) for t in r["candidate_titles"]] for r in rows]
        # The whole batch in one forward, one row per sample (its prompt, then every candidate).
        # A sample's scores then move in the last bits with the rows it shares the batch with (the
        # matmul shapes follow the padding width), so the pairs' content hash holds for a given
        # pairs.batch_size, whatever the number of actors (the driver cuts the batches).
        with torch.no_grad():
            logps = answer_logps(self.model, prompt_ids, cand_ids, prefix_sharing=True,
                                 pad_id=self.tok.pad_token_id)[0].double().cpu().numpy()
        oracle = np.concatenate([self.oracle.score([r["history_item_ids"]], [r["candidate_item_ids"]])
                                 for r in rows])
        greedy = self._greedy(rows, prompt_ids) if pc.self_hard_greedy else [-1] * len(rows)
        names = sorted(pc.strategies) if pc.mix == "all" else None
        out = []
        for b, r in enumerate(rows):
            target = r["candidate_item_ids"].index(r["target_item_id"])
            hist = np.stack([self.vectors[i] for i in r["history_item_ids"]])
            cands = np.stack([self.vectors[i] for i in r["candidate_item_ids"]])
            ctx = SampleContext(target=target, model_scores=logps[b], similarity=history_similarity(hist, cands),
                                popularity=np.array([self.popularity.get(i, 0) for i in r["candidate_item_ids"]]),
                                greedy=greedy[b], popularity_alpha=pc.popularity_alpha)
            u = stable_int("strategy", pc.seed, r["sample_id"]) / 2**64
            chosen_names = names or [assign_strategy(pc.strategies, u)]
            for name in chosen_names:
                rng = np.random.default_rng(stable_int("rejected", pc.seed, name, r["sample_id"]))
                rej = STRATEGIES[name](ctx, pc.num_negatives, rng)
                out.append({
                    "pair_id": f"{r['sample_id']}:{name}", "sample_id": r["sample_id"], "user_id": r["user_id"],
                    "split": r["split"], "strategy": name, "prompt": r["prompt"], "chosen": r["target_title"],
                    "rejected": [r["candidate_titles"][i] for i in rej], "chosen_index": target,
                    "rejected_index": rej, "candidate_titles": r["candidate_titles"],
                    "oracle_chosen": float(oracle[b, target]),
                    "oracle_rejected": [float(oracle[b, i]) for i in rej],
                    "ref_chosen_logp": float(logps[b, target]), "ref_rejected_logp": [float(logps[b, i]) for i in rej],
                    "prompt_ids": prompt_ids[b], "chosen_ids": cand_ids[b][target],
                    "rejected_ids": [cand_ids[b][i] for i in rej],
                    "rejected_items": [r["candidate_item_ids"][i] for i in rej],
                })
        return pa.Table.from_pylist(out, schema=SCORED)

    def _greedy(self, rows: list[dict], prompt_ids: list[list[int]]) -> list[int]:
        """Index of the candidate the model's greedy answer names when exactly one is named, else -1."""
        answers = greedy_answers(self.model, self.tok, prompt_ids, self.cfg.model.max_answer_tokens)
        return [parse_answer(a, r["candidate_titles"], 0)["named_index"] for a, r in zip(answers, rows)]


def build_pairs(run_cfg: Any, samples_dir: str | Path, base_model: str, adapter: str | None,
                oracle_dir: str | Path, out_dir: str | Path, *, splits: dict[str, int] | None = None,
                exclude_train: Collection[str] = frozenset()) -> dict:
    """Build pairs for ``splits`` (split -> max samples, 0 = all) into ``out_dir`` atomically.

    Default: ``train`` limited by ``pairs.max_samples`` and ``valid`` by ``pairs.eval_samples``.
    ``exclude_train``: train sample ids never drawn (the sft stage's slice, with
    ``pairs.exclude_sft``); the slice is then drawn from the rest, and none left is a `DataError`.
    Pairs hold the oracle's scores, not ε: ε is computed from them at training time with the
    ``align`` smoothing settings, so Tune can search those without rebuilding pairs.
    """
    import pyarrow.parquet as pq
    import ray

    t0 = time.perf_counter()
    pc = run_cfg.pairs
    splits = splits or {"train": pc.max_samples, "valid": pc.eval_samples}
    full = {s: read_split(samples_dir, s) for s in splits}
    tables = {s: select_samples(_without(full[s], exclude_train if s == "train" else ()), n, pc.seed)
              for s, n in splits.items()}
    # Where every user consumes every item, for the false negatives (the whole split, not the slice).
    later = {s: later_positions(*(t.column(c).to_pylist() for c in ("sample_id", "user_id", "target_item_id")))
             for s, t in full.items()}
    if exclude_train and "train" in tables and not len(tables["train"]):
        raise DataError(f"{samples_dir}/train: every train sample is in the sft stage's slice "
                        f"({len(exclude_train)} samples), none is left for pairs.exclude_sft; "
                        "lower sft.max_samples or set pairs.exclude_sft: false")
    titles: dict[str, str] = {}
    for t in tables.values():
        for ids, names in zip(t.column("candidate_item_ids").to_pylist() + t.column("history_item_ids").to_pylist(),
                              t.column("candidate_titles").to_pylist() + t.column("history_titles").to_pylist()):
            titles.update(zip(ids, names))
    item_ids = sorted(titles)
    # TF-IDF's IDF over the whole catalogue: a split's pairs then do not depend on another's slice.
    catalog = Path(samples_dir) / CATALOG_FILE
    corpus = pq.read_table(catalog, columns=["title"]).column("title").to_pylist() if catalog.is_file() else None
    vecs = embed_titles(pc.embedder, [titles[i] for i in item_ids], corpus)
    item_vectors = dict(zip(item_ids, vecs))
    popularity = train_popularity(samples_dir)
    manifest = {"stage": "pairs", "config": dataclasses.asdict(pc), "splits": {},
                "excluded_train_samples": len(exclude_train)}
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split, table in tables.items():
            ds = ray.data.from_arrow(length_batches(table, pc.batch_size)).map_batches(
                PairScorer, batch_format="pyarrow", batch_size=pc.batch_size,
                compute=ray.data.ActorPoolStrategy(size=pc.num_actors), num_gpus=1 if pc.use_gpu else None,
                max_restarts=SCORER_RESTARTS,
                fn_constructor_kwargs={"run_cfg": run_cfg, "base_model": str(base_model),
                                       "adapter": str(adapter) if adapter else None, "oracle_dir": str(oracle_dir),
                                       "item_vectors": item_vectors, "popularity": popularity})
            rows = ds.take_all()
            rows.sort(key=lambda r: r["pair_id"])
            for r in rows:
                r["false_negative"] = false_negatives(r["sample_id"], r["user_id"], r.pop("rejected_items"),
                                                      later[split])
            rows = flip_labels(rows, pc.label_noise if split == "train" else 0.0, pc.seed)
            (tmp / split).mkdir()
            pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), pairs_file(tmp, split))
            margin = np.array([r["oracle_chosen"] - np.mean(r["oracle_rejected"]) for r in rows])
            strategies: dict[str, int] = {}
            for r in rows:
                strategies[r["strategy"]] = strategies.get(r["strategy"], 0) + 1
            manifest["splits"][split] = {"pairs": len(rows), "samples": len(table), "strategies": strategies,
                                         "flipped": sum(r["flipped"] for r in rows),
                                         "false_negatives": _false_negative_shares(rows),
                                         "oracle_margin": _summary(margin),
                                         "content_hash": rows_hash(rows, "pair_id")}
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return manifest


def _false_negative_shares(rows: list[dict]) -> dict:
    """Per strategy, the share of clean pairs whose rejected item the user consumes later (pairs
    whose samples hold no position left out); {} when none can be told."""
    known: dict[str, list[bool]] = {}
    for r in rows:
        if r["false_negative"] is not None and not r["flipped"]:
            known.setdefault(r["strategy"], []).append(r["false_negative"])
    return {s: round(float(np.mean(v)), 4) for s, v in sorted(known.items())}


def _without(table: pa.Table, sample_ids: Collection[str]) -> pa.Table:
    """``table`` less the rows whose ``sample_id`` is in ``sample_ids``."""
    import pyarrow.compute as pc

    if not sample_ids:
        return table
    ids = pa.array(sorted(sample_ids), table.schema.field("sample_id").type)
    return table.filter(pc.invert(pc.is_in(table.column("sample_id"), value_set=ids)))


def _summary(x: np.ndarray) -> dict:
    if not x.size:
        return {}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(x.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
