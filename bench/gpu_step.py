"""RosePO step of a ~1B-parameter Llama (built from a config, bf16) on one GPU: LoRA and full
fine-tuning, with and without prefix sharing; tokens/s and MFU against the card's measured bf16
matmul rate. Needs torch with CUDA, transformers and peft (no Ray, no DeepSpeed).

``--device cpu`` runs the same steps in fp32 on this machine's cores, against its fp32 matmul
rate; with ``--model tiny`` (2 layers × 64) it takes seconds: a check of the code, not a
measurement.

    python -m bench gpu [--batch 16] [--prompt 320] [--reps 10]
    python -m bench gpu --device cpu --model tiny --batch 2 --prompt 24 --answer 4 --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

#: The Llama configurations measured: ~1B parameters (TinyLlama's shape) and a tiny one for checks.
MODELS = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2),
}


def bf16_matmul_flops(n: int = 8192, reps: int = 10) -> float:
    """Mean bf16 FLOP/s of n×n×n products on random data (after 3 warm-ups)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1000)


def run(argv: list[str]) -> int:
    """Time the variants alternately; print a JSON line per variant and a table."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.common import matmul_peak
    from rosepo.losses import rosepo_loss
    from rosepo.model.logprobs import answer_logps

    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=320, help="tokens of the longest prompt (others 8, 16, ... shorter)")
    p.add_argument("--answer", type=int, default=10)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--model", choices=list(MODELS), default="1b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: fp32 on this machine's cores (with --model tiny: a check in seconds)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench gpu: no CUDA GPU here, skipped (--device cpu --model tiny checks the code on CPU)")
        return 0
    torch.manual_seed(0)
    vocab = MODELS[args.model]["vocab_size"]
    cfg = LlamaConfig(**MODELS[args.model], max_position_embeddings=2048, attn_implementation="sdpa")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = bf16_matmul_flops() if cuda else matmul_peak(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt - (i % 5) * 8,), generator=g).tolist() for i in range(args.batch)]
    answers = [[torch.randint(3, vocab, (args.answer - k,), generator=g).tolist() + [2] for k in range(2)]
               for _ in range(args.batch)]
    results = []
    for mode in ("lora", "full"):
        model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype)
        n_params = sum(q.numel() for q in model.parameters())
        if mode == "lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        with torch.no_grad():
            plain, _ = answer_logps(model, prompts[:4], answers[:4], prefix_sharing=False, pad_id=0)
            shared, _ = answer_logps(model, prompts[:4], answers[:4], prefix_sharing=True, pad_id=0)
        max_diff = float((plain - shared).abs().max())

        def step(shared_prefix: bool, model=model, opt=opt) -> float:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            logps, _ = answer_logps(model, prompts, answers, prefix_sharing=shared_prefix, pad_id=0)
            r = torch.zeros_like(logps)
            loss, _, _ = rosepo_loss(logps[:, 0], logps[:, 1], r[:, 0], r[:, 1],
                                     torch.full((len(prompts),), 0.1, device=args.device), 0.1)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not cuda:
                return time.perf_counter() - t0
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000

        for shared_prefix in (True, False):  # warm-up
            step(shared_prefix)
        times = {True: [], False: []}
        for _ in range(args.reps):
            for shared_prefix in (True, False):
                times[shared_prefix].append(step(shared_prefix))
        p_tok = sum(map(len, prompts))
        a_tok = sum(len(a) for ans in answers for a in ans)
        for shared_prefix in (True, False):
            tokens = p_tok + a_tok if shared_prefix else 2 * p_tok + a_tok
            med = statistics.median(times[shared_prefix])
            # full: 6·N·T (forward + both backward products); LoRA: 4·N·T (no weight gradients)
            flops = (6 if mode == "full" else 4) * n_params * tokens / med
            row = {"mode": mode, "prefix_sharing": shared_prefix, "params": n_params, "step_s": med,
                   "spread_s": [min(times[shared_prefix]), max(times[shared_prefix])],
                   "tokens_per_s": tokens / med, "pairs_per_s": len(prompts) / med, "mfu": flops / peak,
                   "logp_max_abs_diff_plain_vs_shared": max_diff}
            results.append(row)
            print(json.dumps(row))
        del model, opt, step  # the card's memory, before the next mode's model
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        print(f"card: {torch.cuda.get_device_name()}; bf16 matmul {peak / 1e12:.0f} TFLOP/s (8192^3, mean of 10)")
    else:
        print(f"cpu: {torch.get_num_threads()} torch threads; fp32 matmul {peak / 1e9:.1f} GFLOP/s (512^3, best of 30)")
    print("| mode | prefix sharing | step (s) | tokens/s | pairs/s | MFU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['prefix_sharing']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
              f"{r['pairs_per_s']:.1f} | {r['mfu']:.1%} |")
    return 0
