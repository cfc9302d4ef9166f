"""Token ids of prompts and answers, and SFT rows.

A prompt and its answer are tokenised separately and concatenated, so an answer's ids never
depend on the prompt before it: log-probs with a shared prompt prefix rely on this. Prompts end
with "Answer:" and answers are the bare title ("Toy Story", no leading space: the byte-level
pre-tokenizer then splits it as it splits the quoted title inside the prompt, which the model
copies from); answers end with EOS.
"""

from __future__ import annotations

from rosepo.errors import ConfigError, DataError

IGNORE = -100


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of a prompt, no special tokens. Raises `DataError` past ``max_tokens``."""
    ids = _ids(tokenizer, prompt)
    if not ids:
        raise DataError("prompt is empty")
    if len(ids) > max_tokens:
        raise DataError(f"prompt has {len(ids)} tokens, more than the limit of {max_tokens}; "
                        "raise model.max_prompt_tokens or lower data.max_history")
    return ids


def encode_answer(tokenizer, answer: str, max_tokens: int) -> list[int]:
    """Token ids of an answer followed by EOS. Raises `DataError` past ``max_tokens`` (EOS counted)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; answers need one to end")
    ids = _ids(tokenizer, answer) + [tokenizer.eos_token_id]
    if len(ids) > max_tokens:
        raise DataError(f"answer {answer!r} has {len(ids)} tokens with EOS, more than the limit of "
                        f"{max_tokens}; raise model.max_answer_tokens")
    return ids


def encode_sft(tokenizer, prompt: str, answer: str, max_prompt_tokens: int,
               max_answer_tokens: int) -> dict:
    """One SFT row: ``input_ids`` = prompt + answer + EOS; ``labels`` -100 on the prompt."""
    p = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    a = encode_answer(tokenizer, answer, max_answer_tokens)
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}
