"""SFT learning curves of the tiny model: training budget -> valid ValidRatio and ranking HR@1.

The measurement behind issue #14's levers (`sft.candidate_weight`, `sft.history_weight`,
`model.title_init`, `data.prompt_style`). The pipeline builds the samples, the oracle and the
model of the config (cached like any run); then one process trains the model with the SFT task's
own `collate` and `compute_loss` (plain AdamW, the loop's warmup + cosine schedule, global batch
= ``sft.num_workers × sft.micro_batch_size``, gradient clipping), without Ray Train or DeepSpeed,
so that several variants fit side by side on a 2-core box. Every ``--eval-every`` steps it
evaluates ``--eval-samples`` valid samples as `rosepo eval` does: greedy answers parsed by
`rosepo.eval.metrics.parse_answer` (ValidRatio, HR@1) and candidates ranked by their summed answer
log-likelihood (rank HR@1). One JSON line per evaluation; ``--out`` keeps the whole curve.

    python -m bench.sft_probe --config configs/ml100k-tiny.yaml --steps 3000 sft.candidate_weight=1.0

Prototypes that hand the oracle's scores to the answer position (docs/record.md, "The oracle's
scores carried to the answer logits"; off by default, not part of the package):
``--skip-gain G`` adds G (a trained scalar) times the user token's input embedding to the final
norm's output at the user position (`add_user_skip`); ``--detach-skip`` stops the gradient through
that vector; ``--freeze-oracle-subspace`` removes the non-title rows' component in the oracle's
subspace P and projects P out of every row's gradient (`freeze_oracle_subspace`); ``--zero-residual`` starts every
``o_proj`` and ``down_proj`` at 0; ``--early-oracle W,N`` trains the first N steps with
``sft.oracle_weight`` W; ``--oracle-prior G`` adds G times the oracle's score of every catalog
title to the answer position's logits (`add_oracle_prior`: a fixed prior, the LM learns the rest;
``--train-prior-gain`` lets G learn), and the evaluation's ranking reads it too;
``--no-first-token-ce`` drops the cross-entropy on the first answer token
(`drop_first_token_labels`; the rest of the loss stays).
"""

from __future__ import annotations

import argparse
import json
import time

from rosepo.config import load_config


def run(argv: list[str] | None = None) -> int:
    """Parse the options, build the model stage, train and print the curve; exit code."""
    p = argparse.ArgumentParser(prog="python -m bench.sft_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ml100k-tiny.yaml")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-start", action="store_true", help="evaluate the model before the first step too")
    p.add_argument("--out", default="", help="write the curve as JSON here")
    p.add_argument("--skip-gain", type=float, default=0.0, help="prototype: user-token skip past the layers, this gain")
    p.add_argument("--detach-skip", action="store_true", help="prototype: no gradient through the skip's vector")
    p.add_argument("--freeze-oracle-subspace", action="store_true",
                   help="prototype: freeze the embedding rows' component in the oracle's subspace")
    p.add_argument("--zero-residual", action="store_true", help="prototype: o_proj and down_proj start at 0")
    p.add_argument("--early-oracle", default="", help="prototype: W,N: sft.oracle_weight W for the first N steps")
    p.add_argument("--oracle-prior", type=float, default=0.0,
                   help="prototype: this gain times the oracle's title scores added to the answer logits")
    p.add_argument("--train-prior-gain", action="store_true", help="prototype: the oracle prior's gain trains")
    p.add_argument("--no-first-token-ce", action="store_true",
                   help="prototype: no cross-entropy on the first answer token (the rest of the loss stays)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    try:
        early = tuple(float(x) for x in a.early_oracle.split(",")) if a.early_oracle else None
    except ValueError:
        early = ()
    if early is not None and len(early) != 2:
        p.error(f"--early-oracle takes W,N (a weight and a step count), got {a.early_oracle!r}")
    if a.detach_skip and not a.skip_gain:
        p.error("--detach-skip needs --skip-gain (it detaches the skip's vector)")
    if a.train_prior_gain and not a.oracle_prior:
        p.error("--train-prior-gain needs --oracle-prior (its starting gain)")
    prototype = {"oracle_prior": a.oracle_prior, "train_prior_gain": a.train_prior_gain,
                 "no_first_token_ce": a.no_first_token_ce,
                 "skip_gain": a.skip_gain, "detach_skip": a.detach_skip, "zero_residual": a.zero_residual,
                 "freeze_oracle_subspace": a.freeze_oracle_subspace, "early_oracle": early}
    curve = probe(cfg, a.steps, a.eval_every, a.eval_samples, a.threads, a.eval_start, prototype)
    if a.out:
        from rosepo.storage import atomic_write_text

        atomic_write_text(a.out, json.dumps({"overrides": a.overrides, "steps": a.steps, "curve": curve}, indent=1))
    return 0


def probe(cfg, steps: int, eval_every: int, eval_samples: int, threads: int, eval_start: bool = False,
          prototype: dict | None = None) -> list[dict]:
    """Train the config's model for ``steps`` global batches; the evaluations (with
    ``eval_start`` also one before the first step), as dicts. ``prototype``: `run`'s prototype
    options (module docstring)."""
    import dataclasses

    import numpy as np
    import torch

    from rosepo.data.samples import read_split
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
    train = read_split(samples, "train").to_pandas()
    items = find_items(model_stage)
    rows = _tokenize(train, path, cfg, run_stage(cfg, "oracle"), items)
    valid = read_split(samples, "valid").to_pylist()[:eval_samples]
    print(json.dumps({"eval_samples": len(valid),
                      "sasrec_rank_hr@1": oracle_hit_rate(load_oracle(run_stage(cfg, "oracle")), valid)}),
          flush=True)
    tok = load_tokenizer(path)
    torch.manual_seed(cfg.sft.seed)
    model = load_model(path, dtype=torch.float32)
    model = (attach_items(model, items, trainable=True) if items else model).train()
    prototype = prototype or {}
    if prototype.get("zero_residual"):
        zero_residual_branches(model)
    if prototype.get("skip_gain"):
        add_user_skip(model, prototype["skip_gain"], detach=prototype.get("detach_skip", False))
    if prototype.get("oracle_prior"):
        add_oracle_prior(model, prototype["oracle_prior"], title_token_rows(model, tok, samples),
                         trainable=prototype.get("train_prior_gain", False))
    if prototype.get("freeze_oracle_subspace"):
        from rosepo.eval.evaluate import catalog_titles

        ids = [i for i in tok.convert_tokens_to_ids(catalog_titles(samples)) if i != tok.unk_token_id]
        freeze_oracle_subspace(model, ids, cfg.oracle.hidden_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.learning_rate, weight_decay=cfg.sft.weight_decay)
    batch_size = cfg.sft.num_workers * cfg.sft.micro_batch_size
    warmup = int(cfg.sft.warmup_ratio * steps)
    order = np.random.default_rng(cfg.sft.seed)
    queue: list[int] = []
    task = sft.SFTTask(cfg.sft)
    early = prototype.get("early_oracle")
    curve = []
    if eval_start:
        curve.append({"step": 0, "samples": 0, **_evaluate(model.eval(), tok, valid, cfg)})
        model.train()
        print(json.dumps(curve[-1]), flush=True)
    t0 = time.perf_counter()
    for step in range(steps):
        while len(queue) < batch_size:
            queue += order.permutation(len(rows)).tolist()
        idx, queue = queue[:batch_size], queue[batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = cfg.sft.learning_rate * lr_factor(step, steps, warmup)
        if early is not None:
            task.cfg = dataclasses.replace(cfg.sft, oracle_weight=early[0]) if step < early[1] else cfg.sft
        batch = task.collate([rows[i] for i in idx], tok.pad_token_id)
        if prototype.get("no_first_token_ce"):
            drop_first_token_labels(batch)
        loss, _ = task.compute_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.max_grad_norm)
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            point = {"step": step + 1, "samples": (step + 1) * batch_size,
                     "train_seconds": round(time.perf_counter() - t0, 1), "loss": round(float(loss), 4),
                     **_evaluate(model.eval(), tok, valid, cfg)}
            model.train()
            curve.append(point)
            print(json.dumps(point), flush=True)
    return curve


def oracle_hit_rate(oracle, rows: list[dict]) -> float:
    """The ranking HR@1 of ``oracle`` (anything with `rosepo.pairs.sasrec.Oracle.score`'s
    signature) on sample ``rows``, ties counted against the target as in `rosepo eval`: the
    probe's yardstick, SASRec on the probe's own evaluation samples."""
    from rosepo.eval.metrics import ranking_metrics

    candidates = [r["candidate_item_ids"] for r in rows]
    targets = [c.index(r["target_item_id"]) for c, r in zip(candidates, rows)]
    scores = oracle.score([r["history_item_ids"] for r in rows], candidates)
    return round(float(ranking_metrics(scores, targets, ks=(1,))["hr@1"]), 4)


def drop_first_token_labels(batch: dict) -> None:
    """Prototype: the label of each row's first answer token (its first label that is not -100)
    set to -100 in place, so the token cross-entropy skips it."""
    import torch

    labels = batch["labels"].clone()
    first = (labels != -100).int().argmax(1)
    labels[torch.arange(len(labels)), first] = -100
    batch["labels"] = labels


def zero_residual_branches(model) -> None:
    """Every ``o_proj`` and ``down_proj`` weight (and bias) to 0, in place: at the start the layers
    add nothing to the residual stream (prototype)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def add_user_skip(model, gain: float, *, detach: bool = False):
    """Prototype: the user token's input embedding e, times a trained scalar ``model.skip_gain``
    (starting at ``gain``), added to the final norm's output at the user token's position, so the
    tied answer logits get gain · e·E_t past the layers. ``model`` is a `HybridItemLM` with user
    tokens; returns the hook's handle."""
    import torch

    from rosepo.model.items import HybridItemLM

    if not isinstance(model, HybridItemLM) or model.items.user_base is None:
        raise ValueError("the user skip needs item and user tokens (model.user_token: sasrec)")
    model.skip_gain = torch.nn.Parameter(torch.tensor(float(gain)))
    embed = model.embed
    stash: dict = {}

    def embed_and_keep(input_ids):
        embeds = embed(input_ids)
        where = (input_ids >= model.items.user_base).nonzero(as_tuple=True)
        stash["user"] = (where, embeds[where]) if len(where[0]) else None
        return embeds

    def add_skip(module, args, out):
        user = stash.pop("user", None)
        if user is None:
            return out
        where, vectors = user
        return out.index_put(where, out[where] + model.skip_gain * (vectors.detach() if detach else vectors))

    model.embed = embed_and_keep
    return model.lm.get_decoder().norm.register_forward_hook(add_skip)


def title_token_rows(model, tok, samples_dir):
    """(N,) long: the title token id of each item-table row 1..N of ``model`` (a `HybridItemLM`),
    -1 where the item's title is not a token."""
    import torch

    from rosepo.model.base import item_titles

    title = item_titles(samples_dir)
    ids = tok.convert_tokens_to_ids([title.get(i, "") for i in model.items.item_ids])
    return torch.tensor([i if i != tok.unk_token_id else -1 for i in ids], dtype=torch.long)


def add_oracle_prior(model, gain: float, token_rows, *, trainable: bool = False) -> None:
    """Prototype: ``gain`` times the oracle's score u·v_i of every item i (u its user state of the
    prompt's history, read by the user token) added to the logit of item i's title token
    (``token_rows``, `title_token_rows`) at the user token's position, the one that predicts the
    first answer token: p(answer) ∝ p_LM · exp(gain · SASRec score). Wraps ``model.forward`` (a
    `HybridItemLM` with user tokens), so the SFT loss and greedy decoding see it; the hidden
    states (and so `answer_logps`) do not: `_evaluate` adds it to the ranking itself. The gain is
    ``model.prior_gain``, trained when ``trainable``."""
    import torch

    from rosepo.model.items import HybridItemLM

    if not isinstance(model, HybridItemLM) or model.items.user_base is None:
        raise ValueError("the oracle prior needs item and user tokens (model.user_token: sasrec)")
    model.prior_gain = torch.nn.Parameter(torch.tensor(float(gain)), requires_grad=trainable)
    forward = model.forward
    has = token_rows >= 0
    rows, tokens = torch.nonzero(has).squeeze(1) + 1, token_rows[has]

    def prior(input_ids):
        """(where (rows, columns) of the user tokens, their prior (U, V))."""
        items, user = model.items, model._user
        where, seqs = user.history_rows(input_ids, items.user_base, items.offset)
        with torch.no_grad():
            scores = user.encoder.encode(seqs)[:, -1] @ user.encoder.item_emb.weight[rows].T
        vocab = model.get_output_embeddings().weight.shape[0]
        bias = torch.full((len(scores), vocab), float("-inf"))
        bias = bias.scatter_reduce(1, tokens.expand(len(scores), -1), scores, "amax")
        return where, torch.where(torch.isinf(bias), 0.0, bias)

    def forward_with_prior(input_ids=None, **kwargs):
        out = forward(input_ids=input_ids, **kwargs)
        if not bool((input_ids >= model.items.user_base).any()):
            return out
        (b, t), bias = prior(input_ids)
        kept = out.logits.shape[1]
        t = t - (input_ids.shape[1] - kept)
        ok = t >= 0
        b, t, bias = b[ok], t[ok], bias[ok]
        out.logits = out.logits.index_put((b, t), out.logits[b, t] + model.prior_gain * bias.to(out.logits.dtype))
        return out

    model.forward = forward_with_prior
    model.oracle_prior = prior


def freeze_oracle_subspace(model, title_ids: list[int], dim: int) -> None:
    """Prototype: remove the non-title rows' component in the oracle's subspace (the columns of
    `rosepo.model.items.title_projection`) and project it out of every row's gradient, so that no
    gradient moves a row inside it (AdamW's per-coordinate step still can, a little)."""
    import torch

    from rosepo.model.items import title_projection

    weight = model.get_input_embeddings().weight
    proj = title_projection(weight.shape[1], dim).to(weight.dtype)
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[torch.tensor(sorted(set(title_ids)), dtype=torch.long)] = False
    with torch.no_grad():
        weight[others] -= (weight[others] @ proj) @ proj.T
    weight.register_hook(lambda grad: grad - (grad @ proj) @ proj.T)


def _tokenize(train, path: str, cfg, oracle_dir, items_path: str | None = None) -> list[dict]:
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


def _evaluate(model, tok, samples: list[dict], cfg) -> dict:
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
            if getattr(model, "oracle_prior", None) is None:
                logps, _ = answer_logps(model, prompts, cands, prefix_sharing=True, pad_id=tok.pad_token_id)
            else:  # the hidden states do not carry the prior: swap the first token's log-prob
                first_ids = torch.tensor([[c[0] for c in row] for row in cands])
                logps, _, plain = answer_logps(model, prompts, cands, prefix_sharing=True,
                                               pad_id=tok.pad_token_id, first_token_ids=first_ids)
                with_prior = torch.stack([model(input_ids=torch.tensor([p]), logits_to_keep=1).logits[0, -1]
                                          .float().log_softmax(-1)[ids] for p, ids in zip(prompts, first_ids)])
                logps = logps - plain + with_prior
            scores.append(logps.double().cpu().numpy())
            targets += [s["candidate_titles"].index(s["target_title"]) for s in chunk]
    rank = ranking_metrics(np.concatenate(scores), targets, ks=(1,))
    n = len(samples)
    return {"valid_ratio": round(valid / n, 4), "hr@1": round(hits / n, 4), "rank/hr@1": round(rank["hr@1"], 4)}


if __name__ == "__main__":
    import sys

    sys.exit(run())
