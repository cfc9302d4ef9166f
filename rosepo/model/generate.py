"""Greedy decoding for evaluation: free answers, and answers constrained to the candidates.

One hand-written loop serves both: prompts are left-padded into one batch, the first step runs
the whole prompt, later steps feed one token each and reuse the KV cache. A hand loop rather
than ``model.generate`` because generate merges the model's own generation config (a hub
model's ``repetition_penalty``, say), and the evaluation protocol asks for plain argmax.

Constrained decoding (as in the LLaRA / S-DPO "valid answer" setting, but forced): at each step
row b may only emit a token that continues one of its candidates' token sequences, which end
with EOS, so every row ends on exactly one candidate. It is greedy in the trie, not the argmax
of whole-answer likelihood (that is the ranking score of `rosepo.model.logprobs`).

Prompts and candidates are token ids from `rosepo.model.tokenize` (answers carry EOS).
"""

from __future__ import annotations

from typing import Callable

#: Trie key under which a finished candidate's index is stored (token ids are never negative).
_END = -1


def greedy_ids(model, prompt_ids: list[list[int]], max_new_tokens: int, *, eos_id: int, pad_id: int,
               allowed: Callable[[int, list[int]], list[int]] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, batched with the KV cache; one token list per prompt.

    A row stops after emitting ``eos_id`` (kept in its list) or ``max_new_tokens`` tokens.
    ``allowed(b, generated_b)``, when given, returns the token ids row b may emit next (at least
    one); the argmax is taken over those only. The model is used as is (call ``eval()`` first).
    """
    import torch

    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("need at least one prompt, and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.get_input_embeddings().weight.device
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompt_ids):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Left pads take position 0; the real tokens count from 0 as they would unpadded.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in prompt_ids]
    live = list(range(len(prompt_ids)))
    cache: dict = {}
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **cache)
            # transformers 5.x renames ``past_key_values`` to ``cache``: hand back what it returned.
            key = "cache" if "cache" in res else "past_key_values"
            cache = {key: res[key]}
            logits = res.logits[:, -1].float()
            if allowed is not None:
                keep = torch.zeros_like(logits, dtype=torch.bool)
                for b in live:
                    keep[b, allowed(b, out[b])] = True
                logits = logits.masked_fill(~keep, float("-inf"))
            nxt = logits.argmax(-1)
            for b, t in zip(live, nxt[live].tolist()):
                out[b].append(t)
            live = [b for b in live if out[b][-1] != eos_id]
            if not live:
                break
            # Finished rows keep decoding (their tokens are dropped): the batch keeps its shape.
            ids = nxt[:, None]
            mask = torch.cat([mask, mask.new_ones(len(prompt_ids), 1)], dim=1)
            positions = positions[:, -1:] + 1
    return out


def greedy_answers(model, tok, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """The model's greedy answer to each prompt, decoded (special tokens skipped, stripped)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = greedy_ids(model, prompt_ids, max_new_tokens, eos_id=tok.eos_token_id, pad_id=pad_id)
    return [text.strip() for text in tok.batch_decode(ids, skip_special_tokens=True)]


def candidate_trie(candidate_ids: list[list[int]], eos_id: int) -> dict:
    """Prefix trie of one sample's candidates: nested ``{token: node}``, ``node[-1]`` = index.

    Every candidate must end with ``eos_id`` (as `encode_answer` makes them), so no candidate is
    a prefix of another; of two identical token sequences the first index is kept.
    """
    root: dict = {}
    for index, seq in enumerate(candidate_ids):
        if not seq or seq[-1] != eos_id or eos_id in seq[:-1]:
            raise ValueError(f"candidate {index} must end with EOS ({eos_id}) and hold it only there; "
                             "encode candidates with rosepo.model.tokenize.encode_answer")
        node = root
        for t in seq:
            node = node.setdefault(t, {})
        node.setdefault(_END, index)
    return root


def _walk(trie: dict, tokens: list[int]) -> dict:
    node = trie
    for t in tokens:
        node = node[t]
    return node


def constrained_answers(model, tok, prompt_ids: list[list[int]],
                        candidate_ids: list[list[list[int]]]) -> list[int]:
    """Index of the candidate each prompt's trie-constrained greedy decoding spells out.

    ``candidate_ids[b]`` holds sample b's candidates as token ids ending with EOS. Batched over
    the prompts; each row may stop at a different step.
    """
    if len(prompt_ids) != len(candidate_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(candidate_ids)} candidate lists")
    eos = tok.eos_token_id
    tries = [candidate_trie(c, eos) for c in candidate_ids]
    longest = max(len(seq) for cands in candidate_ids for seq in cands)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    ids = greedy_ids(model, prompt_ids, longest, eos_id=eos, pad_id=pad_id,
                     allowed=lambda b, done: [t for t in _walk(tries[b], done) if t != _END])
    return [_walk(trie, seq)[_END] for trie, seq in zip(tries, ids)]
