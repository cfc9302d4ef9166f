"""SFT learning curves of the tiny model: training budget -> valid ValidRatio and ranking HR@1.

What the SFT levers were measured with (`sft.candidate_weight`, `sft.oracle_weight`,
`sft.history_weight`, `model.title_init`, `model.user_token`, `data.prompt_style`; the
experiment record, docs/record.md). The pipeline builds the samples, the oracle and the model of
the config (cached like any run); then one process trains the model with the SFT task's own tokenisation, `collate`
and `compute_loss` (plain AdamW, the loop's warmup + cosine schedule, global batch =
``sft.num_workers × sft.micro_batch_size``, gradient clipping), without Ray Train or DeepSpeed,
so that several variants fit side by side on a 2-core box. It first prints SASRec's ranking HR@1
on the evaluation samples (the yardstick); then every ``--eval-every`` steps it evaluates
``--eval-samples`` valid samples as `rosepo eval` does: greedy answers parsed by
`rosepo.eval.metrics.parse_answer` (ValidRatio, HR@1) and candidates ranked by their summed answer
log-likelihood (rank HR@1). One JSON line per evaluation; ``--out`` keeps the whole curve.

    python -m bench sft-probe --config configs/ml100k-tiny.yaml --steps 3000 sft.candidate_weight=1.0
    python -m bench sft-probe --config configs/smoke.yaml --steps 2 --eval-every 1 --eval-samples 4 \
        --train-samples 64   # a check of the code, in seconds
    python -m bench sft-probe --steps 600 --candidate-draws 8      # fresh negatives each epoch
    python -m bench sft-probe --steps 630 sft.decoys=1              # decoys, as the sft stage adds them
    python -m bench sft-probe --steps 600 --then-steps 200 --then sft.candidate_weight=5.0   # two phases

The prototypes that carried the oracle's scores to the answer logits (``--skip-gain``,
``--oracle-prior``, ``--zero-residual``, ...; docs/record.md) were removed after their
measurement; they are in this file at commit adeab59.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from rosepo.config import load_config


def run(argv: list[str] | None = None) -> int:
    """Parse the options, build the model stage, train and print the curve; exit code."""
    p = argparse.ArgumentParser(prog="python -m bench sft-probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ml100k-tiny.yaml")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-samples", type=int, default=0,
                   help="train on a seeded slice of this many train samples, as the sft stage takes sft.max_samples "
                        "(0: every train sample, as the curves of BENCHMARKS.md were measured)")
    p.add_argument("--eval-start", action="store_true", help="evaluate the model before the first step too")
    p.add_argument("--out", default="", help="write the curve as JSON here")
    p.add_argument("--candidate-draws", type=int, default=1,
                   help="train on this many candidate sets per train sample: its own and fresh draws of the "
                        "negatives, the prompt rendered again (an augmentation against memorising)")
    p.add_argument("--then-steps", type=int, default=0,
                   help="a second phase of this many steps after --steps, from the trained weights, with its own "
                        "optimizer and cosine schedule and the --then overrides")
    p.add_argument("--then", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the second phase (sft.* keys: its terms, learning rate), repeatable")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    if a.candidate_draws < 1:
        p.error(f"--candidate-draws must be at least 1, got {a.candidate_draws}")
    if any(not o.startswith("sft.") for o in a.then):
        p.error(f"--then sets sft.* keys only (the second phase's terms and optimizer), got {a.then}")
    cfg = load_config(a.config, a.overrides)
    then = load_config(a.config, [*a.overrides, *a.then]) if a.then_steps else None
    curve = probe(cfg, a.steps, a.eval_every, a.eval_samples, a.threads, a.eval_start, a.train_samples,
                  candidate_draws=a.candidate_draws, then=then, then_steps=a.then_steps)
    if a.out:
        from rosepo.storage import atomic_write_text

        atomic_write_text(a.out, json.dumps({"overrides": a.overrides, "steps": a.steps, "candidate_draws":
                                             a.candidate_draws, "then_steps": a.then_steps, "then": a.then,
                                             "curve": curve}, indent=1))
    return 0


def probe(cfg, steps: int, eval_every: int, eval_samples: int, threads: int, eval_start: bool = False,
          train_samples: int = 0, *, candidate_draws: int = 1, then=None, then_steps: int = 0) -> list[dict]:
    """Train the config's model for ``steps`` global batches on every train sample (or a seeded
    slice of ``train_samples``; with ``candidate_draws`` > 1 each sample also with fresh negatives,
    `redraw_candidates`), then ``then_steps`` more with the SFT terms and learning rate of the
    config ``then``; the evaluations (with ``eval_start`` also one before the first step), as
    dicts, steps counted on across the phases."""
    import numpy as np
    import torch

    from rosepo.data.samples import read_split, select_samples
    from rosepo.layout import base_model_path, find_items
    from rosepo.model.factory import load_model, load_tokenizer
    from rosepo.model.items import attach_items
    from rosepo.pairs.sasrec import load_oracle
    from rosepo.pipeline import run_stage
    from rosepo.runtime import init_ray
    from rosepo.train import sft
    from rosepo.train.schedule import lr_factor

    init_ray(cfg.ray_address)
    model_stage = run_stage(cfg, "model")
    samples = run_stage(cfg, "samples")
    path = base_model_path(model_stage)
    torch.set_num_threads(threads)
    train = select_samples(read_split(samples, "train"), train_samples, cfg.sft.seed)
    if candidate_draws > 1:
        train = redraw_candidates(train, samples, cfg.data, candidate_draws)
    items = find_items(model_stage)
    train = train.to_pandas()
    # Decoys and the candidate weight as the sft stage resolves them for the data, with this
    # probe's steps as the budget (`rosepo.train.sft.for_data_size`).
    sized = sft.for_data_size(dataclasses.replace(cfg.sft, max_steps=steps + then_steps), len(train))
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, decoys=sized.decoys,
                                                           candidate_weight=sized.candidate_weight))
    decoys = cfg.sft.decoys
    if decoys:
        train = sft.add_decoys(train, str(samples), decoys)
    rows = tokenize_rows(train, path, _terms_of(cfg, then), run_stage(cfg, "oracle"), items)
    valid = read_split(samples, "valid").to_pylist()[:eval_samples]
    print(json.dumps({"eval_samples": len(valid),
                      "sasrec_rank_hr@1": oracle_hit_rate(load_oracle(run_stage(cfg, "oracle")), valid)}),
          flush=True)
    tok = load_tokenizer(path)
    torch.manual_seed(cfg.sft.seed)
    model = load_model(path, dtype=torch.float32)
    model = (attach_items(model, items, trainable=True) if items else model).train()
    batch_size = cfg.sft.num_workers * cfg.sft.micro_batch_size
    order = np.random.default_rng(cfg.sft.seed)
    queue: list[int] = []
    curve = []
    if eval_start:
        curve.append({"step": 0, "samples": 0, **evaluate(model.eval(), tok, valid, cfg)})
        model.train()
        print(json.dumps(curve[-1]), flush=True)
    t0 = time.perf_counter()
    done = 0
    for phase, n in ((cfg.sft, steps), (then.sft if then else None, then_steps)):
        if not n:
            continue
        task = sft.SFTTask(phase)
        optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=phase.weight_decay)
        warmup = int(phase.warmup_ratio * n)
        for step in range(n):
            while len(queue) < batch_size:
                queue += order.permutation(len(rows)).tolist()
            idx, queue = queue[:batch_size], queue[batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = phase.learning_rate * lr_factor(step, n, warmup)
            loss, _ = task.compute_loss(model, task.collate([rows[i] for i in idx], tok.pad_token_id))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), phase.max_grad_norm)
            optimizer.step()
            if (step + 1) % eval_every == 0 or step + 1 == n:
                point = {"step": done + step + 1, "samples": (done + step + 1) * batch_size,
                         "train_seconds": round(time.perf_counter() - t0, 1), "loss": round(loss.item(), 4),
                         **evaluate(model.eval(), tok, valid, cfg)}
                model.train()
                curve.append(point)
                print(json.dumps(point), flush=True)
        done += n
    return curve


def _terms_of(cfg, then):
    """``cfg`` with the SFT terms of both phases switched on (each at its larger weight), for
    tokenising: rows then carry every column either phase's loss reads."""
    import dataclasses

    if then is None:
        return cfg
    terms = {k: max(getattr(cfg.sft, k), getattr(then.sft, k))
             for k in ("candidate_weight", "history_weight", "oracle_weight")}
    return dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, **terms))


def redraw_candidates(train, samples_dir, data_cfg, draws: int):
    """``train`` (an Arrow table of samples) followed by ``draws - 1`` copies of it whose 19
    negatives are drawn again (`rosepo.data.samples.draw_candidates` with the seed
    ``data.seed + 1000 × k`` for copy k, from the samples' catalogue) and whose prompts are
    rendered again with the sample's template; ``sample_id`` gets ``#k``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rosepo.data.prompts import render_prompt
    from rosepo.data.samples import draw_candidates
    from rosepo.layout import CATALOG_FILE

    catalog = pq.read_table(f"{samples_dir}/{CATALOG_FILE}")
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    item_ids = list(titles)
    rows = train.to_pylist()
    out = list(rows)
    for k in range(1, draws):
        for r in rows:
            cands = draw_candidates(r["sample_id"], r["target_item_id"], r["history_item_ids"], item_ids, titles,
                                    len(r["candidate_item_ids"]), data_cfg.seed + 1000 * k)
            c_titles = [titles[i] for i in cands]
            out.append({**r, "sample_id": f"{r['sample_id']}#{k}", "candidate_item_ids": cands,
                        "candidate_titles": c_titles,
                        "prompt": render_prompt(r["template_id"], r["history_titles"], c_titles,
                                                data_cfg.prompt_style, data_cfg.domain)})
    return pa.Table.from_pylist(out, schema=train.schema)


def oracle_hit_rate(oracle, rows: list[dict]) -> float:
    """The ranking HR@1 of ``oracle`` (anything with `rosepo.pairs.sasrec.Oracle.score`'s
    signature) on sample ``rows``, ties counted against the target as in `rosepo eval`: the
    probe's yardstick, SASRec on the probe's own evaluation samples."""
    from rosepo.eval.metrics import ranking_metrics

    candidates = [r["candidate_item_ids"] for r in rows]
    targets = [c.index(r["target_item_id"]) for c, r in zip(candidates, rows)]
    scores = oracle.score([r["history_item_ids"] for r in rows], candidates)
    return round(float(ranking_metrics(scores, targets, ks=(1,))["hr@1"]), 4)


def tokenize_rows(train, path: str, cfg, oracle_dir, items_path: str | None = None) -> list[dict]:
    """The SFT rows of every train sample, tokenised by the SFT task's own UDF (with the model
    stage's item file, item and user tokens)."""
    from rosepo.train import sft

    distill = cfg.sft.oracle_weight > 0
    out = sft.tokenize_batch(train, path, cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens,
                             candidates=cfg.sft.candidate_weight > 0 or distill,
                             history=cfg.sft.history_weight > 0, items_path=items_path,
                             oracle_path=str(oracle_dir) if distill else None,
                             oracle_temperature=cfg.sft.oracle_temperature)
    return out.to_dict("records")


def evaluate(model, tok, samples: list[dict], cfg) -> dict:
    """ValidRatio and HR@1 of greedy answers, and rank HR@1 by answer likelihood."""
    import numpy as np
    import torch

    from rosepo.model.generate import greedy_answers
    from rosepo.eval.metrics import parse_answer, ranking_metrics
    from rosepo.model.logprobs import answer_logps
    from rosepo.model.tokenize import encode_answer, encode_sample_prompt

    mc = cfg.model
    valid = hits = 0
    scores, targets = [], []
    with torch.no_grad():
        for start in range(0, len(samples), 32):
            chunk = samples[start:start + 32]
            prompts = [encode_sample_prompt(model, tok, s, mc.max_prompt_tokens) for s in chunk]
            answers = greedy_answers(model, tok, prompts, mc.max_answer_tokens)
            for s, answer in zip(chunk, answers):
                parsed = parse_answer(answer, s["candidate_titles"], s["candidate_titles"].index(s["target_title"]))
                valid += parsed["valid"]
                hits += parsed["correct"]
            cands = [[encode_answer(tok, t, mc.max_answer_tokens) for t in s["candidate_titles"]] for s in chunk]
            logps, _ = answer_logps(model, prompts, cands, prefix_sharing=True, pad_id=tok.pad_token_id)
            scores.append(logps.double().cpu().numpy())
            targets += [s["candidate_titles"].index(s["target_title"]) for s in chunk]
    rank = ranking_metrics(np.concatenate(scores), targets, ks=(1,))
    n = len(samples)
    return {"valid_ratio": round(valid / n, 4), "hr@1": round(hits / n, 4), "rank/hr@1": round(rank["hr@1"], 4)}
