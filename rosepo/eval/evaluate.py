"""Evaluate a model (or an LLM-free ranker) on one split of a samples folder.

Stage: samples (+ base model, adapter) → one Ray Data pass over an actor pool, each actor
holding the merged model → per-sample rows (greedy answer, 20 candidate scores, constrained
answer) → metrics from `rosepo.eval.metrics` → ``answers.parquet``, ``metrics.json`` and
``manifest.json``, written atomically.

Three readings of one model: the free greedy answer judged by the titles it names
(``eval/hr@1``, ``eval/valid_ratio``, hallucinations), the ranking of the candidates by summed
answer log-likelihood (``eval/rank/...``), and, when ``eval.constrained``, greedy decoding
forced onto the candidates (``eval/constrained/hr@1``). Popularity metrics
(``eval/pop/...``) describe the items the free answers validly recommend.

Baselines without an LLM (random, most popular, an oracle's scores) go through
`evaluate_ranker`: the ranker's top-scoring candidate stands for its answer, so the same keys
come out. Not done here: beam search, sampling, or any metric over more than one split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from rosepo.data.popularity import train_popularity
from rosepo.data.prompts import stable_int
from rosepo.data.samples import SPLITS, length_batches, read_split
from rosepo.errors import ConfigError, DataError
from rosepo.eval.metrics import generation_metrics, parse_answer, popularity_metrics, ranking_metrics
from rosepo.layout import ANSWERS_FILE, METRICS_FILE, TABLE_FILE, aligned_model_and_adapter
from rosepo.model.factory import inference_device, load_for_inference, load_tokenizer, resolve_dtype
from rosepo.model.generate import constrained_answers, greedy_answers
from rosepo.model.logprobs import answer_logps
from rosepo.model.tokenize import encode_answer, encode_sample_prompt
from rosepo.pairs.sasrec import load_oracle
from rosepo.runtime import SCORER_RESTARTS
from rosepo.storage import atomic_dir, write_manifest

#: Per-sample output of an evaluation (``answers.parquet``).
ANSWERS = pa.schema([
    ("sample_id", pa.string()),
    ("target_index", pa.int32()),
    ("answer", pa.string()),
    ("named_index", pa.int32()),        # the one candidate the answer names, -1 when not valid
    ("valid", pa.bool_()),
    ("correct", pa.bool_()),
    ("scores", pa.list_(pa.float64())),  # one score per candidate, higher is better
    ("constrained_index", pa.int32()),  # -1 when constrained decoding was off
])

#: What `EvalScorer` returns per sample.
SCORED = pa.schema([
    ("sample_id", pa.string()),
    ("answer", pa.string()),
    ("scores", pa.list_(pa.float64())),
    ("constrained_index", pa.int32()),
])

#: The LLM-free rankers of `baseline_scores`.
RANKERS = ("random", "most_popular")
#: What `evaluate_baselines` evaluates: the rankers, SASRec (the oracle) and the SFT model, in table order.
BASELINES = (*RANKERS, "sasrec", "sft")


class EvalScorer:
    """Ray Data actor (and `rosepo recommend`'s scorer): the merged model → greedy answer,
    candidate scores, constrained index. On a GPU (``eval.use_gpu``, or ``device``) the model
    runs in the training dtype of that GPU (bfloat16 where it computes in it)."""

    def __init__(self, run_cfg: Any, base_model: str, adapter: str | None, device: str | None = None):
        """``run_cfg`` holds the ``model`` and ``eval`` sections; ``device`` (``cpu``, ``cuda``)
        overrides ``eval.use_gpu`` for a scorer outside an actor (it then keeps torch's threads)."""
        use_gpu = bool(run_cfg.eval.use_gpu) if device is None else device.startswith("cuda")
        if device is None:
            device = inference_device(use_gpu, "eval.use_gpu")
        self.cfg = run_cfg
        self.tok = load_tokenizer(base_model)
        self.model = load_for_inference(base_model, adapter, device=device,
                                        dtype=resolve_dtype(run_cfg.model.dtype, use_gpu))
        self.items = getattr(self.model, "items", None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        mc, ec = self.cfg.model, self.cfg.eval
        # A model with item tokens reads the items of the history and the candidates too.
        items = ["history_item_ids", "history_titles", "candidate_item_ids"] if self.items else []
        rows = batch.select(["sample_id", "prompt", "candidate_titles", *items]).to_pylist()
        prompt_ids = [encode_sample_prompt(self.model, self.tok, r, mc.max_prompt_tokens) for r in rows]
        # Titles go to encode_answer as SFT and the pairs stage pass them, so all score alike.
        cand_ids = [[encode_answer(self.tok, t, mc.max_answer_tokens) for t in r["candidate_titles"]]
                    for r in rows]
        with torch.inference_mode():
            logps, _ = answer_logps(self.model, prompt_ids, cand_ids, prefix_sharing=True,
                                    pad_id=self.tok.pad_token_id)
        answers = greedy_answers(self.model, self.tok, prompt_ids, ec.max_new_tokens)
        constrained = (constrained_answers(self.model, self.tok, prompt_ids, cand_ids) if ec.constrained
                       else [-1] * len(rows))
        return pa.Table.from_pydict({
            "sample_id": [r["sample_id"] for r in rows], "answer": answers,
            "scores": logps.double().cpu().tolist(), "constrained_index": constrained,
        }, schema=SCORED)


def first_samples(samples_dir: str | Path, split: str, max_samples: int) -> pa.Table:
    """The first ``max_samples`` samples of ``split`` by ``sample_id`` (0 = all); refuses none."""
    if split not in SPLITS:
        raise ConfigError(f"eval split {split!r} is not one of {', '.join(SPLITS)}")
    if max_samples < 0:
        raise ConfigError(f"eval max_samples must be >= 0 (0 = all), got {max_samples}")
    table = read_split(samples_dir, split)
    if len(table) == 0:
        raise DataError(f"split {split!r} of {samples_dir} holds no samples",
                        file=str(Path(samples_dir) / split))
    return table.slice(0, max_samples) if max_samples else table


def catalog_titles(samples_dir: str | Path) -> list[str]:
    """Every title in the samples folder (history and candidates of all splits), sorted."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    titles: set[str] = set()
    for split in SPLITS:
        for f in sorted((Path(samples_dir) / split).glob("*.parquet")):
            t = pq.read_table(f, columns=["history_titles", "candidate_titles"])
            for col in t.columns:
                titles.update(pc.unique(pc.list_flatten(col)).to_pylist())
    return sorted(titles)


def score_metrics(samples: pa.Table, answers: list[str], scores: np.ndarray, constrained: list[int] | None,
                  train_counts: dict[str, int], catalog: list[str]) -> tuple[dict, pa.Table]:
    """Metrics and per-sample rows (schema `ANSWERS`) of answers, scores (N, C) and constrained picks.

    ``samples`` are the N evaluated samples in the same order. ``constrained`` is None when
    constrained decoding was off (no ``eval/constrained/...`` key then).
    """
    titles = samples.column("candidate_titles").to_pylist()
    cand_items = samples.column("candidate_item_ids").to_pylist()
    target_items = samples.column("target_item_id").to_pylist()
    targets = [items.index(t) for items, t in zip(cand_items, target_items)]
    scores = np.asarray(scores, dtype=np.float64)
    parsed = [parse_answer(a, ts, t) for a, ts, t in zip(answers, titles, targets)]
    recommended = [items[p["named_index"]] if p["valid"] else None for p, items in zip(parsed, cand_items)]
    metrics = {f"eval/{k}": v for k, v in generation_metrics(answers, titles, targets, catalog).items()}
    metrics |= {f"eval/rank/{k}": v for k, v in ranking_metrics(scores, targets).items()}
    if constrained is not None:
        metrics["eval/constrained/hr@1"] = float(np.mean(np.asarray(constrained) == np.asarray(targets)))
    pop = popularity_metrics(recommended, target_items, train_counts)
    metrics |= {f"eval/{k}": v for k, v in pop.items()}
    rows = pa.Table.from_pydict({
        "sample_id": samples.column("sample_id").to_pylist(), "target_index": targets, "answer": answers,
        "named_index": [p["named_index"] for p in parsed], "valid": [p["valid"] for p in parsed],
        "correct": [p["correct"] for p in parsed], "scores": scores.tolist(),
        "constrained_index": constrained if constrained is not None else [-1] * len(answers),
    }, schema=ANSWERS)
    return metrics, rows


def nan_to_none(metrics: dict) -> dict:
    """``metrics`` with NaN values (undefined metrics) as None, for JSON files."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def _write(out_dir: str | Path, rows: pa.Table, metrics: dict, manifest: dict) -> None:
    """``answers.parquet``, ``metrics.json`` (NaN written as null) and ``manifest.json``, atomically."""
    import pyarrow.parquet as pq

    plain = nan_to_none(metrics)
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        pq.write_table(rows, tmp / ANSWERS_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(plain, indent=2, sort_keys=True, allow_nan=False),
                                          encoding="utf-8")
        write_manifest(tmp, manifest | {"metrics": plain})


def evaluate_model(run_cfg: Any, samples_dir: str | Path, base_model: str | Path,
                   adapter: str | Path | None, out_dir: str | Path, *, split: str | None = None) -> dict:
    """Evaluate base model + optional adapter on ``split`` (default ``eval.split``); returns the metrics.
    ``run_cfg`` holds the ``model`` and ``eval`` sections.

    Evaluates the first ``eval.max_samples`` samples by ``sample_id`` on ``eval.num_actors``
    Ray Data actors, ``eval.batch_size`` samples per batch, and writes ``answers.parquet``,
    ``metrics.json`` and ``manifest.json`` into ``out_dir`` atomically (replacing it). The
    catalog for ``eval/hallucination/out_of_candidates`` is every title in the samples folder;
    popularity counts come from the train split. Metrics that are undefined (no valid answer
    for ``eval/pop/percentile_rec``) are NaN in the returned dict and null in the files.
    """
    import ray

    t0 = time.perf_counter()
    ec = run_cfg.eval
    split = split or ec.split
    samples = first_samples(samples_dir, split, ec.max_samples)
    if ec.num_actors < 1 or ec.batch_size < 1:
        raise ConfigError(f"eval.num_actors and eval.batch_size must be >= 1, got {ec.num_actors} and "
                          f"{ec.batch_size}")
    # One block per batch, cut here by prompt length: the pool hands out whole blocks (one block
    # would feed one actor), and Ray's repartition would need a free CPU that a full actor pool
    # never leaves.
    table = samples.select(["sample_id", "prompt", "history_item_ids", "history_titles", "candidate_item_ids",
                            "candidate_titles"])
    ds = ray.data.from_arrow(length_batches(table, ec.batch_size)).map_batches(
        EvalScorer, batch_format="pyarrow", batch_size=ec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ec.num_actors), num_gpus=1 if ec.use_gpu else None,
        max_restarts=SCORER_RESTARTS,
        fn_constructor_kwargs={"run_cfg": run_cfg, "base_model": str(base_model),
                               "adapter": str(adapter) if adapter else None})
    scored = {r["sample_id"]: r for r in ds.take_all()}
    ids = samples.column("sample_id").to_pylist()
    if set(scored) != set(ids):
        raise DataError(f"the scoring pass returned {len(scored)} distinct samples for {len(ids)} sent")
    gen_seconds = time.perf_counter() - t0
    metrics, rows = score_metrics(
        samples, [scored[i]["answer"] for i in ids], np.array([scored[i]["scores"] for i in ids]),
        [scored[i]["constrained_index"] for i in ids] if ec.constrained else None,
        train_popularity(samples_dir), catalog_titles(samples_dir))
    seconds = time.perf_counter() - t0
    _write(out_dir, rows, metrics, {
        "stage": "eval", "split": split, "samples": len(ids), "base_model": str(base_model),
        "adapter": str(adapter) if adapter else None, "config": dataclasses.asdict(ec),
        "seconds": round(seconds, 2), "samples_per_second": round(len(ids) / gen_seconds, 2),
    })
    return metrics


def evaluate_ranker(samples_dir: str | Path, split: str, score_fn: Callable[[list[dict]], np.ndarray],
                    max_samples: int = 0, *, out_dir: str | Path | None = None, name: str = "ranker") -> dict:
    """Metrics of an LLM-free ranker on the first ``max_samples`` samples of ``split`` (0 = all).

    ``score_fn(rows)`` gets the samples as dicts (SAMPLES columns) and returns scores (N, C),
    higher is better. The ranker's answer is the title of its top-scoring candidate (the first
    one on ties), so its ``eval/valid_ratio`` is 1.0 and ``eval/hr@1`` may exceed the tie-
    pessimistic ``eval/rank/hr@1``. With ``out_dir`` the same files as `evaluate_model` are written.
    """
    t0 = time.perf_counter()
    samples = first_samples(samples_dir, split, max_samples)
    scores = np.asarray(score_fn(samples.to_pylist()), dtype=np.float64)
    n_cands = len(samples.column("candidate_titles")[0])
    if scores.shape != (len(samples), n_cands):
        raise DataError(f"score_fn returned shape {scores.shape}, expected ({len(samples)}, {n_cands})")
    titles = samples.column("candidate_titles").to_pylist()
    answers = [ts[i] for ts, i in zip(titles, scores.argmax(axis=1))]
    metrics, rows = score_metrics(samples, answers, scores, None, train_popularity(samples_dir),
                                  catalog_titles(samples_dir))
    if out_dir is not None:
        _write(out_dir, rows, metrics, {"stage": "eval", "ranker": name, "split": split,
                                        "samples": len(samples), "seconds": round(time.perf_counter() - t0, 2)})
    return metrics


def baseline_scores(name: str, rows: list[dict], popularity: dict[str, int], seed: int = 0) -> np.ndarray:
    """Candidate scores (N, C) of a baseline ranker.

    ``random``: uniform in [0, 1), seeded per sample id (so independent of batching);
    ``most_popular``: the candidate's train interaction count (`train_popularity`).
    """
    if name == "random":
        return np.array([np.random.default_rng(stable_int("baseline", seed, r["sample_id"]))
                         .random(len(r["candidate_item_ids"])) for r in rows])
    if name == "most_popular":
        return np.array([[float(popularity.get(i, 0)) for i in r["candidate_item_ids"]] for r in rows])
    raise ConfigError(f"unknown baseline ranker {name!r}; rankers: {', '.join(RANKERS)}")


#: Metrics shown in the comparison table, in order (the full set is in metrics.json).
TABLE_METRICS = ("eval/hr@1", "eval/valid_ratio", "eval/hr@1_valid", "eval/rank/hr@1", "eval/rank/ndcg@5",
                 "eval/hallucination/no_candidate", "eval/hallucination/out_of_catalog", "eval/pop/percentile_rec",
                 "eval/pop/head_share_rec", "eval/pop/tail_coverage")


def markdown_table(results: dict[str, dict], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """A Markdown table: one row per method, one column per metric (values or "mean ± std" strings)."""

    def fmt(v):
        if isinstance(v, str):
            return v
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    head = "| method | " + " | ".join(m.removeprefix("eval/") for m in metrics) + " |"
    rule = "|---|" + "---|" * len(metrics)
    rows = [f"| {name} | " + " | ".join(fmt(r.get(m)) for m in metrics) + " |" for name, r in results.items()]
    return "\n".join([head, rule, *rows]) + "\n"


def evaluate_baselines(run_cfg: Any, samples_dir: Path, oracle_dir: Path, base: str, sft_adapter: str | None,
                       out_dir: str | Path) -> dict[str, dict]:
    """The `BASELINES` an aligned model is compared with, on ``eval.split``, each into
    ``out_dir/<method>/``: the LLM-free rankers random, most popular and SASRec (the oracle in
    ``oracle_dir``), and the SFT model (``base`` with ``sft_adapter``). All four are deterministic
    (the random ranker is seeded by ``data.seed``). ``run_cfg`` holds the ``eval``, ``model`` and
    ``data`` sections."""
    ec = run_cfg.eval
    popularity = train_popularity(samples_dir)
    oracle = load_oracle(oracle_dir)
    rankers = {
        "random": lambda rows: baseline_scores("random", rows, popularity, run_cfg.data.seed),
        "most_popular": lambda rows: baseline_scores("most_popular", rows, popularity),
        "sasrec": lambda rows: oracle.score([r["history_item_ids"] for r in rows],
                                            [r["candidate_item_ids"] for r in rows]),
    }
    out = Path(out_dir)
    results = {name: evaluate_ranker(samples_dir, ec.split, fn, ec.max_samples, out_dir=out / name, name=name)
               for name, fn in rankers.items()}
    results["sft"] = evaluate_model(run_cfg, samples_dir, base, sft_adapter, out / "sft")
    return results


def evaluate_run(run_cfg: Any, samples_dir: Path, oracle_dir: Path, base: str, sft_adapter: str | None,
                 align_dir: Path, out_dir: str | Path) -> dict:
    """The eval stage: the baselines (`evaluate_baselines`) and the aligned model (``base`` with
    the adapter of ``align_dir``) on ``eval.split``, into ``out_dir/<method>/`` plus ``table.md``
    and a manifest. ``run_cfg`` holds the ``eval``, ``model``, ``data`` and ``align`` sections."""
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        results = evaluate_baselines(run_cfg, samples_dir, oracle_dir, base, sft_adapter, tmp)
        aligned = f"aligned ({run_cfg.align.loss})"
        results[aligned] = evaluate_model(run_cfg, samples_dir, *aligned_model_and_adapter(align_dir, base),
                                          tmp / "aligned")
        table = markdown_table(results)
        (tmp / TABLE_FILE).write_text(table, encoding="utf-8")
        plain = {m: nan_to_none(r) for m, r in results.items()}
        manifest = {"stage": "eval", "split": run_cfg.eval.split, "results": plain, "table": table}
        write_manifest(tmp, manifest)
    return manifest
