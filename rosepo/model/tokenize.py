"""Token ids of prompts and answers, and SFT rows.

A prompt and its answer are tokenised separately and concatenated, so an answer's ids never
depend on the prompt before it: log-probs with a shared prompt prefix rely on this. Prompts
start with BOS when the tokenizer adds one by default (pretrained SentencePiece models: Gemma,
Llama-2) and end with "Answer:"; answers are the bare title ("Toy Story", no leading space) and
end with EOS. The bare title is split as the quoted title inside the prompt is (after `"`),
which the model copies from, by byte-level BPEs and by Gemma-3's SentencePiece alike, and for
both the concatenated ids are exactly the ids of the whole text "...Answer:Toy Story"
(tests/model/test_gemma.py checks it on Gemma-3-270M).
"""

from __future__ import annotations

from rosepo.errors import ConfigError, DataError

IGNORE = -100


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer, called with its defaults, starts every text with its BOS token.

    Pretrained SentencePiece models (Gemma, Llama-2, Mistral) do and were trained so; a prompt
    without it is out of distribution for them. The tiny model's tokenizer and byte-level BPEs
    of the GPT-2 family add nothing.
    """
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("x")["input_ids"][:1]) == [bos]


def encode_prompt(tokenizer, prompt: str, max_tokens: int,
                  items: list[tuple[str | None, int]] | None = None) -> list[int]:
    """Token ids of a prompt: BOS first when the tokenizer adds one by default (`adds_bos`), no
    other special tokens. With ``items`` ((title, item token id) in the order the prompt names
    the titles, `rosepo.model.items.ItemTokens.prompt_items`), each item id follows its title's
    last token, and an id whose title is None (the user token) follows the prompt's last token;
    the text's ids are unchanged. Raises `DataError` past ``max_tokens`` (BOS and item tokens
    counted)."""
    ids = _ids(tokenizer, prompt)
    if not ids:
        raise DataError("prompt is empty")
    if items:
        titled = [(t, i) for t, i in items if t is not None]
        ends = title_ends(tokenizer, prompt, [t for t, _ in titled])
        for end, (_, item) in sorted(zip(ends, titled), key=lambda e: e[0], reverse=True):
            ids.insert(end + 1, item)
        ids += [i for t, i in items if t is None]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) > max_tokens:
        raise DataError(f"prompt has {len(ids)} tokens, more than the limit of {max_tokens}; "
                        "raise model.max_prompt_tokens or lower data.max_history")
    return ids


def encode_sample_prompt(model, tokenizer, sample: dict, max_tokens: int) -> list[int]:
    """`encode_prompt` of ``sample["prompt"]`` for ``model``: with the sample's item tokens when
    the model has them (a `rosepo.model.items.HybridItemLM`, whose ``items`` names them; the
    sample then holds the history's and candidates' item ids and titles), plain text otherwise."""
    items = getattr(model, "items", None)
    return encode_prompt(tokenizer, sample["prompt"], max_tokens, items.prompt_items(sample) if items else None)


def _title_spans(prompt: str, titles: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``titles``, found in order in ``prompt``; an occurrence between quotes
    or line breaks (how every template sets a title off) is preferred to a bare one."""
    spans, start = [], 0
    for title in titles:
        at = bare = prompt.find(title, start)
        while at >= 0 and not (prompt[at - 1:at] in ('"', "\n") and prompt[at + len(title):at + len(title) + 1]
                               in ('"', "\n")):
            at = prompt.find(title, at + 1)
        at = bare if at < 0 else at
        if at < 0:
            raise DataError(f"title {title!r} is not in the prompt after character {start}")
        spans.append((at, at + len(title)))
        start = at + len(title)
    return spans


def title_ends(tokenizer, prompt: str, titles: list[str]) -> list[int]:
    """Index, among the prompt text's token ids (no special tokens), of the token holding the last
    character of each of ``titles`` (found in order, `_title_spans`)."""
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [max(i for i, (lo, hi) in enumerate(offsets) if hi > lo and lo < end)
            for _, end in _title_spans(prompt, titles)]


def encode_answer(tokenizer, answer: str, max_tokens: int) -> list[int]:
    """Token ids of an answer followed by EOS. Raises `DataError` past ``max_tokens`` (EOS counted)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; answers need one to end")
    ids = _ids(tokenizer, answer) + [tokenizer.eos_token_id]
    if len(ids) > max_tokens:
        raise DataError(f"answer {answer!r} has {len(ids)} tokens with EOS, more than the limit of "
                        f"{max_tokens}; raise model.max_answer_tokens")
    return ids


def candidate_first_ids(tokenizer, candidate_titles, max_tokens: int) -> list[list[int]]:
    """Per row of ``candidate_titles`` (lists of titles), the first token of each title as an
    answer (`encode_answer`): what the candidate-set terms of SFT and alignment read. Titles
    recur across rows; each is tokenised once."""
    first: dict[str, int] = {}
    out = []
    for titles in candidate_titles:
        for t in titles:
            if t not in first:
                first[t] = encode_answer(tokenizer, t, max_tokens)[0]
        out.append([first[t] for t in titles])
    return out


def encode_sft(tokenizer, prompt: str, answer: str, max_prompt_tokens: int,
               max_answer_tokens: int, items: list[tuple[str, int]] | None = None) -> dict:
    """One SFT row: ``input_ids`` = prompt (with ``items``, `encode_prompt`) + answer + EOS;
    ``labels`` -100 on the prompt."""
    p = encode_prompt(tokenizer, prompt, max_prompt_tokens, items)
    a = encode_answer(tokenizer, answer, max_answer_tokens)
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


def history_title_positions(tokenizer, prompt: str, history_titles: list[str], prompt_len: int,
                            items: list[tuple[str, int]] | None = None) -> list[int]:
    """Positions, in a prompt of ``prompt_len`` ids (`encode_prompt`, with the same ``items``), of
    the tokens of history titles 2..n: the targets of next-item prediction over the history
    (item j given items < j).

    Titles are found in order in the prompt text (every template lists the history first) and a
    token counts when its characters lie inside a title; with title tokens that is the title's
    one token. Special tokens `encode_prompt` put before the text shift every position alike;
    an item token after a title shifts the tokens after it.
    """
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    titled = [t for t, _ in items or [] if t is not None]
    ends = title_ends(tokenizer, prompt, titled) if titled else []
    shift = prompt_len - len(enc["input_ids"]) - len(items or [])  # BOS: what is neither text nor an item id
    spans = _title_spans(prompt, history_titles)
    positions = []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(lo <= a and b <= hi for lo, hi in spans[1:]):
            positions.append(i + shift + sum(e < i for e in ends))
    return positions


def check_sample_lengths(tokenizer, splits: dict, max_prompt_tokens: int, max_answer_tokens: int,
                         samples_dir: str, batch_rows: int = 4096, items: bool = False, user: bool = False) -> dict:
    """Refuse the first sample of ``splits`` (split name -> samples table, sorted by sample id,
    of ``samples_dir``) whose prompt, or one of whose candidate titles as an answer, is longer
    than the limits; return the longest of each per split. Prompts count what `encode_prompt`
    adds: BOS, with ``items`` an item token per history and candidate title, with ``user`` the
    user token.

    Run at the model stage, when the tokenizer is known: the later stages tokenise inside Ray
    tasks (SFT, pairs, eval), where a refusal would surface wrapped in Ray's traceback.
    """
    import pyarrow.compute as pc

    longest = {}
    bos = int(adds_bos(tokenizer))
    for split, table in splits.items():
        prompts = table.column("prompt").to_pylist()
        extra = [bos + int(user)] * len(prompts)
        if items:
            extra = [bos + int(user) + h + c
                     for h, c in zip(pc.list_value_length(table.column("history_titles")).to_pylist(),
                                     pc.list_value_length(table.column("candidate_titles")).to_pylist())]
        most = 0
        for start in range(0, len(prompts), batch_rows):
            lengths = [len(ids) + n for ids, n in zip(tokenizer(prompts[start:start + batch_rows],
                                                                add_special_tokens=False)["input_ids"],
                                                      extra[start:start + batch_rows])]
            i = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[i] > max_prompt_tokens:
                i = next(j for j, n in enumerate(lengths) if n > max_prompt_tokens)
                raise DataError(f"sample {table.column('sample_id')[start + i].as_py()!r}: the prompt has "
                                f"{lengths[i]} tokens, more than model.max_prompt_tokens ({max_prompt_tokens}); "
                                "raise model.max_prompt_tokens or lower data.max_history",
                                file=f"{samples_dir}/{split}", row=start + i + 1, column="prompt")
            most = max(most, lengths[i])
        titles = sorted({t for ts in table.column("candidate_titles").to_pylist() for t in ts})
        answers = [len(ids) + 1 for ids in tokenizer(titles, add_special_tokens=False)["input_ids"]] if titles else []
        for title, n in zip(titles, answers):
            if n > max_answer_tokens:
                raise DataError(f"the title {title[:80]!r} has {n} tokens as an answer (EOS included), more than "
                                f"model.max_answer_tokens ({max_answer_tokens}); raise model.max_answer_tokens",
                                file=f"{samples_dir}/{split}", column="candidate_titles")
        longest[split] = {"prompt_tokens": most, "answer_tokens": max(answers, default=0)}
    return longest
