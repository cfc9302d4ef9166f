"""Can the tiny Llama learn to copy? The diagnostic behind issue #3's ValidRatio.

The recommender's answer is valid when it names one of the 20 candidates in its prompt; with
``model.title_tokens`` that is copying one of 20 context tokens. This probe strips the task to that
alone: a prompt of ``--candidates`` distinct random tokens drawn from ``--vocab`` "title" tokens
(each preceded by a separator token, as the quoted titles are), and the answer is one of them at
random, so the best loss is log(candidates) and any copy is "valid". The model is the default
config's tiny Llama (tied embeddings), trained with AdamW on the answer token only (the SFT loss).
It prints the answer loss and the share of held-out answers that name a candidate, every 100 steps.

    python -m bench.copy_probe --vocab 1682          # the catalogue of MovieLens-100K
    python -m bench.copy_probe --vocab 64            # the same task, a small vocabulary
"""

from __future__ import annotations

import argparse
import math
import time


def run(argv: list[str] | None = None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = argparse.ArgumentParser(prog="python -m bench.copy_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=1682, help="distinct title tokens")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--init-range", type=float, default=0.02, help="LlamaConfig.initializer_range")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    sep, answer, first = 0, 1, 2  # separator, "Answer:", then the title tokens
    cfg = LlamaConfig(vocab_size=first + a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=max(1, a.heads // 2), tie_word_embeddings=True,
                      initializer_range=a.init_range, max_position_embeddings=4 * a.candidates)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)

    def batch(n: int):
        cands = torch.stack([torch.randperm(a.vocab, generator=gen)[: a.candidates] for _ in range(n)]) + first
        seq = torch.stack([torch.full_like(cands, sep), cands], dim=2).flatten(1)
        prompt = torch.cat([seq, torch.full((n, 1), answer)], dim=1)
        target = cands[torch.arange(n), torch.randint(a.candidates, (n,), generator=gen)]
        return prompt, cands, target

    held_prompt, held_cands, _ = batch(512)
    print(f"vocab {a.vocab}, {a.candidates} candidates, {a.layers} layers x {a.hidden}, "
          f"init range {a.init_range}, lr {a.lr}; best loss ln({a.candidates}) = {math.log(a.candidates):.2f}, "
          f"chance of naming a candidate {a.candidates / a.vocab:.3f}")
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        prompt, _, target = batch(a.batch)
        logits = model(input_ids=prompt).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            with torch.no_grad():
                pred = model(input_ids=held_prompt).logits[:, -1].argmax(-1)
            valid = (pred[:, None] == held_cands).any(1).float().mean().item()
            print(f"step {step:5d}  answer loss {loss.item():.3f}  valid {valid:.3f}  {time.perf_counter() - t0:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
