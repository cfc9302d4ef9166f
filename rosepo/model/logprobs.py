"""Summed log-probabilities of several answers per prompt, in one forward pass.

Two layouts compute the same numbers:

* plain: one row per (prompt, answer), ``prompt + answer`` right-padded;
* prefix sharing: one row per prompt, ``prompt + answer_1 + ... + answer_A``, with a 4D mask in
  which each answer token sees the prompt and the earlier tokens of its own answer only, and
  position ids that restart after the prompt for every answer. The prompt, usually ~30 times
  longer than an answer, is encoded once instead of A times.

In both, the first answer token is predicted from the logit of the last prompt token (shared by
all answers of a prompt), and token i > 0 from the logit of answer token i - 1.
"""

from __future__ import annotations


def sequence_token_count(answer_ids: list[list[list[int]]]):
    """Token counts (EOS included) of each answer, a long tensor (B, A)."""
    import torch

    return torch.tensor([[len(a) for a in answers] for answers in answer_ids], dtype=torch.long)


def answer_logps(model, prompt_ids: list[list[int]], answer_ids: list[list[list[int]]], *,
                 prefix_sharing: bool, pad_id: int, first_token_ids=None):
    """Summed log-probs (B, A), float32, of each answer's tokens (EOS included) given its prompt.

    ``answer_ids[b]`` holds the A answers of prompt b (A equal for all b). Returns the sums and
    `sequence_token_count`. One batched forward; gradients flow to the model's parameters.
    ``model`` is a causal LM (plain, peft-wrapped or a DeepSpeed engine) taking ``position_ids``,
    a 4D additive ``attention_mask`` (or, with sliding-window layers, one per layer type) and
    ``logits_to_keep``, as transformers' Llama, Qwen2, Mistral and Gemma-3 do with sdpa or eager
    attention, and whose logits are ``get_output_embeddings()`` of the last of its
    ``hidden_states`` (no logit soft-capping or scaling: refused).

    ``first_token_ids`` (B, C), optional: also return, third, the log-probs (B, C) of those
    tokens as the first answer token of each prompt, read from the logit every answer's first
    token is read from (no extra positions run).
    """
    import torch

    num_answers = _check_shapes(prompt_ids, answer_ids)
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale")):
        raise ValueError("answer_logps applies the output embeddings to the last hidden state; this model "
                         "soft-caps or scales its logits, which that would skip")
    build = _shared_rows if prefix_sharing else _plain_rows
    seqs, positions, segments, targets = build(prompt_ids, answer_ids, num_answers)

    emb = model.get_input_embeddings().weight
    device, dtype = emb.device, emb.dtype
    width = max(map(len, seqs))
    input_ids = _pad(seqs, width, pad_id).to(device)
    rows, logit_pos, target, owner = torch.tensor(targets, dtype=torch.long, device=device).unbind(1)
    # The LM head runs on the last hidden state (the model's own head, one position per row, is all
    # it computes), at the positions whose log-probs are read, each once: the first token of every
    # answer of a prompt is predicted from one position, and ragged rows need no common tail.
    # Scoring 20 one-token candidates this way took half the time of keeping every tail position.
    kwargs = {"use_cache": False, "logits_to_keep": 1, "output_hidden_states": True}
    if prefix_sharing:
        seg = _pad(segments, width, -1).to(device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # Pads (segment -1) see only earlier pads and the prompt, so no row of the mask is empty.
        allowed = causal & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0))
        pos = _pad(positions, width, 0).to(device)
        kwargs.update(attention_mask=_shared_masks(allowed, pos, config, dtype), position_ids=pos)
    else:
        kwargs.update(attention_mask=(_pad(segments, width, -1) >= 0).long().to(device))
    hidden = model(input_ids=input_ids, **kwargs).hidden_states[-1]  # after the final norm
    positions, inverse = torch.unique(rows * width + logit_pos, return_inverse=True)
    logps = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[positions]).float().log_softmax(-1)
    token_logps = logps[inverse, target]
    sums = torch.zeros(len(prompt_ids) * num_answers, dtype=torch.float32, device=device)
    sums = sums.index_add(0, owner, token_logps)
    out = sums.view(len(prompt_ids), num_answers), sequence_token_count(answer_ids).to(device)
    if first_token_ids is None:
        return out
    # The last prompt token of prompt b (row b shared, row b·A plain) predicts every first token.
    last = torch.tensor([(b if prefix_sharing else b * num_answers) * width + len(p) - 1
                         for b, p in enumerate(prompt_ids)], dtype=torch.long, device=device)
    first = logps[torch.searchsorted(positions, last)].gather(1, first_token_ids.to(device))
    return (*out, first)


def _shared_masks(allowed, positions, config, dtype):
    """The 4D additive mask(s) of the prefix-shared rows, sliding-window layers included.

    A 4D mask is used as given for every layer, so the model's own sliding window (Gemma-2/3,
    Mistral, Qwen2 with it on) no longer applies: it is applied here, on the answer's restarted
    positions, which are what the plain layout's token indices are. Where some layers slide and
    some do not (``layer_types``, Gemma-3: 5 of 6), the model takes one mask per layer type.
    """
    import torch

    def additive(keep):
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return mask.masked_fill_(~keep, torch.finfo(dtype).min)[:, None]

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = set(getattr(text, "layer_types", None) or ())
    if not window or types == {"full_attention"}:
        return additive(allowed)
    # HF's sliding window: key j is seen from query i when i - window < j (and j <= i).
    near = allowed & (positions[:, :, None] - positions[:, None, :] < window)
    if types and types != {"sliding_attention"}:
        return {"full_attention": additive(allowed), "sliding_attention": additive(near)}
    return additive(near)


def _check_shapes(prompt_ids, answer_ids) -> int:
    if not prompt_ids or len(prompt_ids) != len(answer_ids):
        raise ValueError(f"need one answer list per prompt: {len(prompt_ids)} prompts, "
                         f"{len(answer_ids)} answer lists")
    num_answers = len(answer_ids[0])
    if num_answers == 0 or any(len(a) != num_answers for a in answer_ids):
        raise ValueError("every prompt needs the same, non-zero number of answers")
    if any(not p for p in prompt_ids) or any(not a for answers in answer_ids for a in answers):
        raise ValueError("prompts and answers must be non-empty")
    return num_answers


def _plain_rows(prompt_ids, answer_ids, num_answers):
    """Row b*A + a is prompt b + answer a; segment 0 = prompt, 1 = answer."""
    seqs, segments, targets = [], [], []
    for b, (prompt, answers) in enumerate(zip(prompt_ids, answer_ids)):
        for a, answer in enumerate(answers):
            row = b * num_answers + a
            seqs.append(list(prompt) + list(answer))
            segments.append([0] * len(prompt) + [1] * len(answer))
            targets += [(row, len(prompt) - 1 + i, t, row) for i, t in enumerate(answer)]
    return seqs, None, segments, targets


def _shared_rows(prompt_ids, answer_ids, num_answers):
    """Row b is prompt b + all its answers; segment 0 = prompt, a + 1 = answer a."""
    seqs, positions, segments, targets = [], [], [], []
    for b, (prompt, answers) in enumerate(zip(prompt_ids, answer_ids)):
        n = len(prompt)
        seq, pos, seg = list(prompt), list(range(n)), [0] * n
        for a, answer in enumerate(answers):
            start = len(seq)
            targets += [(b, n - 1 if i == 0 else start + i - 1, t, b * num_answers + a)
                        for i, t in enumerate(answer)]
            seq += answer
            pos += range(n, n + len(answer))
            seg += [a + 1] * len(answer)
        seqs.append(seq)
        positions.append(pos)
        segments.append(seg)
    return seqs, positions, segments, targets


def _pad(rows, width: int, value: int):
    import torch

    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
