"""Evaluation throughput: prompts/s of the ranking and the generation evaluation, against naive
variants, one process, CPU.

Model: the default tiny Llama (``configs/ml100k-tiny.yaml``, title tokens) built from its config,
random weights (seed 0), fp32, ``eval()`` mode, as an evaluation actor holds the merged model.
Prompts: ML-100K samples of the first users (rosepo's sample builder, no Ray) with their 20
candidates; ``eval.batch_size`` prompts per batch; token ids prepared before timing.

Variants, timed in turn (A B C ... per round) on batches cycled from the same prompts:

- ranking, ``rank``: `rosepo.model.logprobs.answer_logps` with prefix sharing, as `EvalScorer`
  calls it: one row per prompt holding the prompt once and its 20 candidates;
  ``rank-plain``: the same function, one right-padded row per (prompt, candidate);
- generation at ``N`` new tokens, ``gen``: `rosepo.model.generate.greedy_ids`, the batch
  left-padded, KV cache; ``gen-nocache``: the same batch, the whole sequence run again at every
  step; ``gen-batch1``: ``greedy_ids`` one prompt at a time (KV cache);
- ``scorer``: `rosepo.eval.evaluate.EvalScorer` on a batch (tokenise + rank + greedy answer at
  ``eval.max_new_tokens``), what one evaluation actor does per batch.

Random weights rarely emit EOS, so generation runs its full ``N`` steps: ``N = 2`` is what a
trained title-token model takes (title + EOS), ``N = eval.max_new_tokens`` the longest answer.
Outputs are compared: scores of the two ranking layouts, tokens of the three decoders.

    python -m bench eval [--reps 5] [--batch 32] [--threads 1] [--new-tokens 2 32]
"""

from __future__ import annotations

import argparse

from bench.common import alternate, bench_config, machine, markdown, ml100k_samples, paired_ratio, quiet_hf, \
    spread, tiny_model


def greedy_no_cache(model, prompt_ids: list[list[int]], max_new_tokens: int, *, eos_id: int, pad_id: int):
    """Greedy decoding without a KV cache: every step runs the whole left-padded batch again.
    Same stopping rule and outputs as `rosepo.model.generate.greedy_ids` (the naive baseline)."""
    import torch

    seqs = [list(p) for p in prompt_ids]
    out: list[list[int]] = [[] for _ in prompt_ids]
    live = list(range(len(prompt_ids)))
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, s in enumerate(seqs):
                ids[b, width - len(s):] = torch.tensor(s)
                mask[b, width - len(s):] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=1).logits[:, -1]
            nxt = logits.argmax(-1).tolist()
            for b in live:
                out[b].append(nxt[b])
            for b in range(len(seqs)):  # finished rows keep decoding, as in greedy_ids
                seqs[b].append(nxt[b])
            live = [b for b in live if out[b][-1] != eos_id]
            if not live:
                break
    return out


def run(argv: list[str]) -> int:
    """Time the variants alternately; print the tables."""
    p = argparse.ArgumentParser(prog="python -m bench eval", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="alternated rounds (after 1 warm-up round)")
    p.add_argument("--batch", type=int, default=None, help="prompts per batch (default: eval.batch_size)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--threads", type=int, default=1, help="torch threads (an evaluation actor uses 1)")
    p.add_argument("--users", type=int, default=64, help="ML-100K users whose samples give prompts")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[2, 32], help="generation lengths measured")
    args = p.parse_args(argv)
    quiet_hf()
    import pyarrow as pa
    import torch

    from rosepo.eval.evaluate import EvalScorer
    from rosepo.model.generate import greedy_ids
    from rosepo.model.factory import load_model, load_tokenizer
    from rosepo.model.logprobs import answer_logps
    from rosepo.model.tokenize import encode_answer, encode_prompt

    run_cfg = bench_config()
    mc, ec = run_cfg.model, run_cfg.eval
    batch = args.batch or ec.batch_size
    samples, titles = ml100k_samples(run_cfg.data, args.users)
    path = tiny_model(mc, samples, titles)
    tok = load_tokenizer(path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    picked = samples[:: max(1, len(samples) // (batch * args.batches))][: batch * args.batches]
    prompts = [encode_prompt(tok, r["prompt"], mc.max_prompt_tokens) for r in picked]
    cands = [[encode_answer(tok, t, mc.max_answer_tokens) for t in r["candidate_titles"]] for r in picked]
    columns = ["sample_id", "prompt", "candidate_titles"]
    tables = [pa.Table.from_pylist(picked[b * batch:(b + 1) * batch]).select(columns)
              for b in range(args.batches)]
    model = load_model(str(path), dtype=torch.float32).eval()
    scorer = EvalScorer(run_cfg, str(path), None)  # sets torch threads to 1, as an actor does
    torch.set_num_threads(args.threads)
    part = lambda xs, i: xs[(i % args.batches) * batch:][:batch]  # noqa: E731

    def rank(shared: bool):
        def step(i: int):
            with torch.inference_mode():
                return answer_logps(model, part(prompts, i), part(cands, i), prefix_sharing=shared, pad_id=pad)[0]
        return step

    def gen(kind: str, n: int):
        def step(i: int):
            ps = part(prompts, i)
            if kind == "gen":
                return greedy_ids(model, ps, n, eos_id=eos, pad_id=pad)
            if kind == "gen-nocache":
                return greedy_no_cache(model, ps, n, eos_id=eos, pad_id=pad)
            return [greedy_ids(model, [q], n, eos_id=eos, pad_id=pad)[0] for q in ps]
        return step

    steps = {"rank": rank(True), "rank-plain": rank(False)}
    for n in args.new_tokens:
        for kind in ("gen", "gen-nocache", "gen-batch1"):
            steps[f"{kind}@{n}"] = gen(kind, n)
    steps["scorer"] = lambda i: scorer(tables[i % args.batches])

    # Equal outputs first (batch 0): ranking scores of both layouts, tokens of the three decoders.
    diff = float((steps["rank"](0) - steps["rank-plain"](0)).abs().max())
    same = {}
    for n in args.new_tokens:
        ref = steps[f"gen@{n}"](0)
        same[n] = [sum(a == b for a, b in zip(ref, steps[f"{k}@{n}"](0))) for k in ("gen-nocache", "gen-batch1")]
    print(f"machine: {machine()}", flush=True)
    times = alternate(steps, args.reps, warmup=1)
    la = machine()
    print(f"model: tiny Llama (vocab {model.config.vocab_size}, title tokens), fp32, no adapter; {batch} prompts "
          f"per batch, {args.batches} batches cycled, {len(cands[0])} candidates per prompt; prompt "
          f"{min(map(len, prompts))}–{max(map(len, prompts))} tokens; torch threads {torch.get_num_threads()}; "
          f"{args.reps} alternated rounds")
    print(f"ranking scores, prefix sharing vs plain rows: max |difference| {diff:.2e}")
    for n in args.new_tokens:
        print(f"greedy tokens at {n} new tokens equal to the KV-cache batch's: no cache {same[n][0]}/{batch}, "
              f"batch 1 {same[n][1]}/{batch}")
    rows = []
    for name, ts in times.items():
        med, lo, hi = spread(ts)
        rows.append([name, f"{med * 1e3:.0f} ({lo * 1e3:.0f}–{hi * 1e3:.0f})", f"{batch / med:.1f}"])
    print(markdown(["variant", "ms per batch, median (min–max)", "prompts/s"], rows))
    ratios = [["ranking: prefix sharing vs plain rows", *paired_ratio(times["rank-plain"], times["rank"])]]
    for n in args.new_tokens:
        gen = times[f"gen@{n}"]
        ratios.append([f"generation @{n}: KV cache vs none", *paired_ratio(times[f"gen-nocache@{n}"], gen)])
        ratios.append([f"generation @{n}: batch {batch} vs 1", *paired_ratio(times[f"gen-batch1@{n}"], gen)])
    print(markdown(["speed-up (prompts/s)", "ratio of medians", "per-round min", "per-round max"],
                   [[r[0], f"{r[1]:.2f}×", f"{r[2]:.2f}", f"{r[3]:.2f}"] for r in ratios]))
    print(f"machine at the end: {la}")
    return 0
