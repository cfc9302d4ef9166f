"""RosePO alignment step time with and without prefix sharing, and its model-FLOPs utilisation.

One process, one thread per torch op pool as set by the caller, the default tiny model (`ModelConfig()`)
with its tokenizer trained on real MovieLens-100K prompts, LoRA as in the default alignment, batches
of real ML-100K prompts with the target as chosen and another candidate as rejected, reference
log-probs precomputed. Variants are timed alternately (A B A B ...); medians and spread reported.

    python -m bench align [--reps 12] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    """Dense fp32 matmul FLOP/s of this machine (best of ``reps`` n×n×n products)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _batches(tok, n_batches: int, batch: int):
    from rosepo.data.samples import read_split
    from rosepo.model.tokenize import encode_answer, encode_prompt

    samples = sorted(p for p in (REPO / "runs").glob("*/samples-*") if (p / "manifest.json").is_file())
    if not samples:
        raise SystemExit("no samples folder under runs/: run `rosepo data build` (or make run) first")
    rows = read_split(samples[0], "valid").to_pylist()[: n_batches * batch]
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [encode_prompt(tok, r["prompt"], 512) for r in chunk]
        answers = []
        for r in chunk:
            other = next(t for t in r["candidate_titles"] if t != r["target_title"])
            answers.append([encode_answer(tok, r["target_title"], 48), encode_answer(tok, other, 48)])
        out.append((prompts, answers))
    return out, samples[0]


def run(argv: list[str]) -> int:
    """Time the step; print a table."""
    import tempfile

    import torch

    from rosepo.config import ModelConfig
    from rosepo.data.samples import read_split
    from rosepo.losses import rosepo_loss
    from rosepo.model.factory import apply_lora, build_tiny_model, load_model, load_tokenizer
    from rosepo.model.logprobs import answer_logps

    p = argparse.ArgumentParser(prog="python -m bench align")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mcfg = ModelConfig()
    with tempfile.TemporaryDirectory() as tmp:
        samples = sorted(p for p in (REPO / "runs").glob("*/samples-*") if (p / "manifest.json").is_file())
        if not samples:
            raise SystemExit("no samples folder under runs/: run `make run` (or `rosepo data build`) first")
        texts = read_split(samples[0], "train").column("prompt").to_pylist()[::20]
        path = build_tiny_model(mcfg, texts, Path(tmp) / "m")
        tok = load_tokenizer(path)
        model = apply_lora(load_model(str(path), dtype=torch.float32), mcfg)
        batches, _ = _batches(tok, 4, args.batch)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.no_grad():
        refs = [answer_logps(model, pr, an, prefix_sharing=True, pad_id=tok.pad_token_id)[0] for pr, an in batches]

    def step(i: int, shared: bool) -> tuple[float, int]:
        prompts, answers = batches[i % len(batches)]
        t0 = time.perf_counter()
        logps, _ = answer_logps(model, prompts, answers, prefix_sharing=shared, pad_id=tok.pad_token_id)
        ref = refs[i % len(batches)]
        eps = torch.full((len(prompts),), 0.1)
        loss, _, _ = rosepo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], eps, 0.1)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        p_tok = sum(len(x) for x in prompts)
        a_tok = sum(len(a) for ans in answers for a in ans)
        tokens = p_tok + a_tok if shared else sum(len(x) * len(ans) for x, ans in zip(prompts, answers)) + a_tok
        return time.perf_counter() - t0, tokens

    for i in range(2):  # warm-up
        step(i, True), step(i, False)
    times = {True: [], False: []}
    tokens = {}
    for i in range(args.reps):
        for shared in (True, False):
            t, n = step(i, shared)
            times[shared].append(t)
            tokens[shared] = n
    peak = matmul_flops()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny model: {n_params / 1e6:.2f} M parameters (LoRA r={mcfg.lora_r}); batch {args.batch} pairs; "
          f"{args.threads} threads; {args.reps} alternating reps")
    print(f"machine fp32 matmul: {peak / 1e9:.1f} GFLOP/s (1024^3, best of 20)")
    print("| variant | step median (s) | min–max (s) | pairs/s | tokens run/step | MFU |")
    print("|---|---|---|---|---|---|")
    for shared in (True, False):
        # forward 2·N·T + activation gradients 2·N·T (LoRA: weight gradients negligible)
        flops = 4 * n_params * tokens[shared] / med[shared]
        print(f"| {'prefix sharing' if shared else 'plain'} | {med[shared]:.4f} | {min(times[shared]):.4f}–"
              f"{max(times[shared]):.4f} | {args.batch / med[shared]:.1f} | {tokens[shared]} | {flops / peak:.1%} |")
    print(f"speed-up of prefix sharing: {med[False] / med[True]:.2f}x (ratio of medians)")
    return 0
