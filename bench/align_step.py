"""RosePO alignment step with and without prefix sharing, its model-FLOPs utilisation, and the
cost of a second intra-op thread on this 2-core machine.

The step is rosepo's own (`rosepo.train.align.AlignTask`: `collate` + `compute_loss` with the
config's loss terms + backward + gradient clipping + AdamW), on the default tiny model
(``configs/ml100k-tiny.yaml``: title tokens, a new LoRA over the fully fine-tuned SFT model, here
random weights, fp32), with real ML-100K prompts (target = chosen, another candidate = rejected)
and reference log-probs precomputed, as the pairs stage provides them. Variants, timed in turn
(A B C A B C ...), each on its own copy of the model and optimiser:

- ``shared``: prefix sharing (the default), 1 torch thread, as each Ray Train worker runs it
  (``OMP_NUM_THREADS=1``, one worker per core);
- ``plain``: one row per (prompt, answer), 1 thread;
- ``shared-2threads``: prefix sharing with 2 torch threads in this one process.

MFU: model FLOPs (3 × forward: the 6·N·tokens convention, with attention and the LM head on the
scored positions; `bench.common.llama_forward_flops`) per second over the fp32 matmul rate
measured in the same run with the same number of threads.

    python -m bench align [--reps 12] [--batch 8]
    python -m bench align --reps 1 --batch 2 --batches 1 --users 4   # seconds: a check, not a measurement
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from bench.common import (CONFIG, REPO, alternate, attended_keys, bench_config, llama_forward_flops, machine,
                          markdown, matmul_peak, ml100k_samples, paired_ratio, quiet_hf, spread, tiny_model)


def text_pairs(samples: list[dict], n: int) -> list[dict]:
    """``n`` preference pairs as text, spread over ``samples``: the prompt, the target title
    (chosen), the first other candidate (rejected) and the sample's candidate titles."""
    out = []
    for r in samples[:: max(1, len(samples) // max(1, n))][:n]:
        other = next(t for t in r["candidate_titles"] if t != r["target_title"])
        out.append({"prompt": r["prompt"], "chosen": r["target_title"], "rejected": other,
                    "candidate_titles": r["candidate_titles"]})
    if len(out) < n:
        raise ValueError(f"asked for {n} pairs, the samples give {len(out)}")
    return out


def pair_rows(tok, model_cfg, align_cfg, pairs: list[dict]) -> list[dict]:
    """rosepo's pair rows (token ids as the pairs stage writes them) of text ``pairs``, with fixed,
    distinct oracle scores, and the candidates' first tokens where ``align_cfg.candidate_weight``
    reads them (added as `rosepo.train.align.fit_align` adds them); reference log-probs are added
    by `add_reference`."""
    import pyarrow as pa

    from rosepo.model.tokenize import encode_answer, encode_prompt
    from rosepo.train.align import with_candidate_first_ids

    rows = [{"prompt_ids": encode_prompt(tok, p["prompt"], model_cfg.max_prompt_tokens),
             "chosen_ids": encode_answer(tok, p["chosen"], model_cfg.max_answer_tokens),
             "rejected_ids": [encode_answer(tok, p["rejected"], model_cfg.max_answer_tokens)],
             "oracle_chosen": 1.0 + 0.1 * (i % 7), "oracle_rejected": [0.5],
             "candidate_titles": p["candidate_titles"]} for i, p in enumerate(pairs)]
    if align_cfg.candidate_weight:
        rows = with_candidate_first_ids(pa.Table.from_pylist(rows), tok, model_cfg.max_answer_tokens).to_pylist()
    return rows


def add_reference(model, rows: list[dict], batch: int, pad_id: int) -> float:
    """Fill ``ref_chosen_logp`` / ``ref_rejected_logp`` of ``rows`` with ``model``'s log-probs
    (no grad, prefix sharing, ``batch`` rows at a time), as the pairs stage does; returns seconds."""
    import torch

    from rosepo.model.logprobs import answer_logps

    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ref, _ = answer_logps(model, [r["prompt_ids"] for r in chunk],
                                  [[r["chosen_ids"], *r["rejected_ids"]] for r in chunk], prefix_sharing=True,
                                  pad_id=pad_id)
            for r, lp in zip(chunk, ref.tolist()):
                r["ref_chosen_logp"], r["ref_rejected_logp"] = lp[0], lp[1:]
    return time.perf_counter() - t0


def policy(path, model_cfg):
    """A fresh trainable copy: the base model with a new LoRA (seeded), in train mode."""
    import torch

    from rosepo.model.factory import apply_lora, load_model

    torch.manual_seed(0)
    model = apply_lora(load_model(str(path), dtype=torch.float32), model_cfg)
    model.train()
    return model


def rosepo_step(model, rows: list[dict], batch: int, align_cfg, pad_id: int, *, prefix_sharing: bool = True,
                threads: int | None = None):
    """rosepo's alignment step on batch ``i % (len(rows) // batch)`` of ``rows``, as a function of i:
    collate, loss (``align_cfg.loss``, precomputed reference), backward, clipping, AdamW."""
    import torch

    from rosepo.config import ModelConfig
    from rosepo.train.align import AlignTask

    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=align_cfg.learning_rate, weight_decay=0.0)
    task = AlignTask(dataclasses.replace(align_cfg, prefix_sharing=prefix_sharing), ModelConfig(), pad_id)
    n_batches = len(rows) // batch

    def step(i: int) -> None:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            loss, _ = task.compute_loss(model, task.collate(rows[(i % n_batches) * batch:][:batch], pad_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, align_cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.set_num_threads(before)

    return step


def step_flops(config, rows: list[dict], lora_r: int, lora_modules, *, shared: bool,
               reference_forward: bool = False) -> int:
    """Model FLOPs of one pass over ``rows``: 3 × forward (6·N·tokens) over the rows the layout
    runs, plus a no-grad forward when the reference runs online."""
    p_len = [len(r["prompt_ids"]) for r in rows]
    a_len = [[len(r["chosen_ids"]), *map(len, r["rejected_ids"])] for r in rows]
    tokens = sum(p * (1 if shared else len(a)) + sum(a) for p, a in zip(p_len, a_len))
    attended = sum(attended_keys(p, a, shared) for p, a in zip(p_len, a_len))
    _, fwd = llama_forward_flops(config, tokens, attended, sum(map(sum, a_len)), lora_r, lora_modules)
    return 3 * fwd + (fwd if reference_forward else 0)


#: The models the alignment benchmarks run on: the default's tiny Llama, or a named pretrained model
#: with the config that uses it (text-only prompts: TRL has no item tokens).
MODELS = {"tiny": (CONFIG, ()),
          "gemma-3-270m": (REPO / "configs" / "ml100k-gemma3-270m.yaml", ("model.item_embeddings=none",))}


def setup(users: int, n_pairs: int, batch: int, model: str = "tiny"):
    """Config, tokenizer, model folder and pair rows (reference log-probs added) shared by the
    alignment benchmarks; returns a dict, ``ref_s`` the seconds of the reference pass.

    ``model`` names one of `MODELS`: the tiny Llama is built here (random weights); a pretrained
    model is fetched into the checkout's data folder on first use, as ``rosepo model fetch`` does."""
    from rosepo.model.factory import load_tokenizer
    from rosepo.model.fetch import fetch_model

    config, overrides = MODELS[model]
    run_cfg = bench_config(overrides, config)
    model_cfg = run_cfg.align.model_config(run_cfg.model)
    samples, titles = ml100k_samples(run_cfg.data, users)
    path = tiny_model(run_cfg.model, samples, titles) if model == "tiny" else fetch_model(model, run_cfg.data.data_dir)
    tok = load_tokenizer(path)
    pairs = text_pairs(samples, n_pairs)
    rows = pair_rows(tok, model_cfg, run_cfg.align, pairs)
    ref_s = add_reference(policy(path, model_cfg), rows, batch, tok.pad_token_id)
    return {"run_cfg": run_cfg, "model_cfg": model_cfg, "align_cfg": run_cfg.align, "path": path, "tok": tok,
            "pairs": pairs, "rows": rows, "ref_s": ref_s, "model": model}


def describe(model, s: dict, batch: int, batches: int) -> str:
    """One line: the model and the batches."""
    import torch

    rows, mcfg, acfg = s["rows"], s["model_cfg"], s["align_cfg"]
    loss = acfg.loss + (f" + {acfg.sft_weight:g} × chosen NLL" if acfg.sft_weight else "") + (
        f" + {acfg.candidate_weight:g} × candidate term" if acfg.candidate_weight else "")
    p_len = [len(r["prompt_ids"]) for r in rows]
    a_len = [len(a) for r in rows for a in (r["chosen_ids"], *r["rejected_ids"])]
    n_base = sum(q.numel() for q in model.get_base_model().parameters())
    what = "tiny Llama" if s["model"] == "tiny" else f"{s['model']} ({type(model.get_base_model()).__name__})"
    return (f"model: {what} {n_base / 1e6:.2f} M parameters (vocab {model.config.vocab_size}"
            f"{', title tokens' if mcfg.title_tokens else ''}), "
            f"LoRA r={mcfg.lora_r} on {len(mcfg.lora_target_modules)} modules, fp32; loss {loss}; "
            f"{batch} pairs/step, {batches} batches cycled; prompt {min(p_len)}–{max(p_len)} tokens, answers "
            f"{min(a_len)}–{max(a_len)}; torch {torch.__version__}")


def run(argv: list[str]) -> int:
    """Time the variants alternately; print the tables."""
    p = argparse.ArgumentParser(prog="python -m bench align", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=12, help="alternated rounds (after 2 warm-up rounds)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (the default align.micro_batch_size)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--users", type=int, default=64, help="ML-100K users whose samples give prompts")
    args = p.parse_args(argv)
    quiet_hf()
    import torch

    torch.set_num_threads(1)
    s = setup(args.users, args.batch * args.batches, args.batch)
    mcfg, acfg, pad = s["model_cfg"], s["align_cfg"], s["tok"].pad_token_id
    models = {name: policy(s["path"], mcfg) for name in ("shared", "plain", "shared-2threads")}
    steps = {"shared": rosepo_step(models["shared"], s["rows"], args.batch, acfg, pad),
             "plain": rosepo_step(models["plain"], s["rows"], args.batch, acfg, pad, prefix_sharing=False),
             "shared-2threads": rosepo_step(models["shared-2threads"], s["rows"], args.batch, acfg, pad, threads=2)}
    print(f"machine: {machine()}", flush=True)
    times = alternate(steps, args.reps, warmup=2)
    peak = {1: matmul_peak(1), 2: matmul_peak(2)}
    la = machine()
    model = models["shared"]
    flops = {name: step_flops(model.config, s["rows"], mcfg.lora_r, mcfg.lora_target_modules,
                              shared=name != "plain") / args.batches for name in steps}
    tokens = {"shared": sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"][0]) for r in s["rows"])}
    tokens["plain"] = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"][0])
                          for r in s["rows"])
    tokens["shared-2threads"] = tokens["shared"]
    print(describe(model, s, args.batch, args.batches) + f"; {args.reps} alternated rounds")
    print(f"fp32 matmul peak (512^3, best of 30): 1 thread {peak[1] / 1e9:.1f} GFLOP/s, 2 threads "
          f"{peak[2] / 1e9:.1f} GFLOP/s")
    table = []
    for name, ts in times.items():
        med, lo, hi = spread(ts)
        threads = 2 if name.endswith("2threads") else 1
        table.append([name, f"{med * 1e3:.1f} ({lo * 1e3:.1f}–{hi * 1e3:.1f})", f"{args.batch / med:.1f}",
                      f"{tokens[name] / args.batches / med:,.0f}", f"{flops[name] / med / 1e9:.1f}",
                      f"{flops[name] / med / peak[threads]:.1%}"])
    print(markdown(["variant", "step ms, median (min–max)", "pairs/s", "tokens run/s", "model GFLOP/s",
                    "MFU (vs same-thread peak)"], table))
    ratios = [["prefix sharing vs plain rows", *paired_ratio(times["plain"], times["shared"])],
              ["1 thread vs 2 threads", *paired_ratio(times["shared-2threads"], times["shared"])]]
    print(markdown(["speed-up", "ratio of medians", "per-round min", "per-round max"],
                   [[r[0], f"{r[1]:.2f}×", f"{r[2]:.2f}", f"{r[3]:.2f}"] for r in ratios]))
    print(f"machine at the end: {la}")
    return 0
