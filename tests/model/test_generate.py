"""Batched greedy and candidate-constrained decoding against unbatched, cache-free references."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")

from rosepo.model.generate import candidate_trie, constrained_answers, greedy_answers, greedy_ids  # noqa: E402

VOCAB = 100
PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13], [60], [33, 34, 35, 36, 37, 38, 39]]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A wide init spreads the logits, so no argmax is a near-tie that rounding could flip.
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _word_tokenizer(eos_id: int, pad_id: int):
    """Word-level tokenizer over ids 0..VOCAB-1: "w{i}", with "</s>" and "<pad>" at the given ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    names = {i: w for w, i in vocab.items()}
    del vocab[names[eos_id]], vocab[names[pad_id]]
    vocab.update({"</s>": eos_id, "<pad>": pad_id})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w99"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="w99")


def _reference(model, prompt, max_new, eos, candidates=None):
    """One prompt, no cache, full forward per step; restricted to continuations of ``candidates``."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            if candidates is not None:
                ok = {c[len(out)] for c in candidates if c[:len(out)] == out}
                t = max(ok, key=lambda i: logits[i].item())
            else:
                t = int(logits.argmax())
            out.append(t)
            seq.append(t)
            if t == eos:
                break
    return out


def test_greedy_batched_cached_equals_unbatched_uncached_loop(model):
    """Rows of different prompt lengths that stop at different steps, token for token."""
    # EOS = the third token prompt 0 emits, so that row stops early and the others run on.
    eos = _reference(model, PROMPTS[0], 3, eos=-1)[2]
    want = [_reference(model, p, 12, eos) for p in PROMPTS]
    assert len(want[0]) <= 3 and max(map(len, want)) == 12
    got = greedy_ids(model, PROMPTS, 12, eos_id=eos, pad_id=0 if eos else 1)
    assert got == want


def test_greedy_answers_decode_the_greedy_tokens(model):
    eos = _reference(model, PROMPTS[1], 2, eos=-1)[1]
    pad = 0 if eos else 1
    tok = _word_tokenizer(eos, pad)
    want = [tok.decode(_reference(model, p, 6, eos), skip_special_tokens=True).strip() for p in PROMPTS]
    assert greedy_answers(model, tok, PROMPTS, 6) == want
    assert "</s>" not in " ".join(want) and all(want)


def test_constrained_equals_hand_trie_walk_and_is_a_candidate(model):
    """Random candidate sets over 5 tokens share prefixes, so the walk branches at many depths."""
    import numpy as np

    tok = _word_tokenizer(eos_id=2, pad_id=3)
    rng = np.random.default_rng(0)
    prompts, cands = [], []
    for b in range(12):
        seqs: set[tuple] = set()
        while len(seqs) < 6:
            seqs.add(tuple(rng.integers(10, 15, size=rng.integers(1, 4)).tolist()))
        cands.append([list(s) + [2] for s in sorted(seqs)])
        prompts.append(PROMPTS[b % len(PROMPTS)])
    got = constrained_answers(model, tok, prompts, cands)
    want = [cs.index(_reference(model, p, 5, 2, cs)) for p, cs in zip(prompts, cands)]
    assert got == want
    assert len(set(got)) > 1


def test_constrained_toy_case_by_hand(model):
    """Candidates [7,2], [8,9,2], [8,10,2]: pick 7 vs 8 first, then 9 vs 10, from the logits."""
    tok = _word_tokenizer(eos_id=2, pad_id=3)
    prompt = PROMPTS[1]
    with torch.no_grad():
        first = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        second = model(input_ids=torch.tensor([prompt + [8]])).logits[0, -1]
    want = 0 if first[7] > first[8] else (1 if second[9] > second[10] else 2)
    assert constrained_answers(model, tok, [prompt], [[[7, 2], [8, 9, 2], [8, 10, 2]]]) == [want]


def test_trie_rejects_candidates_without_final_eos():
    assert candidate_trie([[4, 2], [4, 5, 2]], 2) == {4: {2: {-1: 0}, 5: {2: {-1: 1}}}}
    with pytest.raises(ValueError, match="must end with EOS"):
        candidate_trie([[4, 5]], 2)
    with pytest.raises(ValueError, match="must end with EOS"):
        candidate_trie([[4, 2, 5, 2]], 2)
