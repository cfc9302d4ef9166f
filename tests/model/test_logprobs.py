"""Answer log-probs: the prefix-shared forward computes exactly what the plain forward computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rosepo.model.logprobs import _shared_rows, answer_logps, sequence_token_count  # noqa: E402

PAD = 3
# Prompts of different lengths; per prompt 3 answers of different lengths (EOS = 2 last).
PROMPTS = [[5, 9, 14, 22, 7], [11, 4, 30, 31, 8, 6, 17, 19, 40], [25, 12, 33]]
ANSWERS = [[[41, 2], [42, 43, 44, 2], [2]],
           [[45, 46, 2], [47, 48, 2], [49, 50, 51, 52, 2]],
           [[53, 54, 55, 56, 57, 2], [58], [59, 2]]]


def _tiny_llama(attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=2)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _one_by_one(model):
    """Reference: each (prompt, answer) alone, unpadded; sum of log p(token | everything before)."""
    out = []
    with torch.no_grad():
        for prompt, answers in zip(PROMPTS, ANSWERS):
            row = []
            for answer in answers:
                logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
                row.append(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)))
            out.append(row)
    return torch.tensor(out)


def _logps_and_grad(model, prefix_sharing, param):
    model.zero_grad()
    logps, counts = answer_logps(model, PROMPTS, ANSWERS, prefix_sharing=prefix_sharing, pad_id=PAD)
    # A weighted sum, so every answer's gradient counts with its own sign and size.
    (logps * torch.linspace(-1, 2, logps.numel()).view_as(logps)).sum().backward()
    return logps.detach(), counts, param.grad.clone()


def test_shared_layout_by_hand():
    # Row: prompt 10 11 12 | answer0 20 21 | answer1 30; answers restart at position 3.
    # Token 20 and token 30 are both predicted from position 2 (the last prompt token);
    # token 21 from position 3 (token 20).
    seqs, positions, segments, targets = _shared_rows([[10, 11, 12]], [[[20, 21], [30]]], 2)
    assert seqs == [[10, 11, 12, 20, 21, 30]]
    assert positions == [[0, 1, 2, 3, 4, 3]]
    assert segments == [[0, 0, 0, 1, 1, 2]]
    assert targets == [(0, 2, 20, 0), (0, 3, 21, 0), (0, 2, 30, 1)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_sharing_equals_plain_values_and_gradients(attn):
    model = _tiny_llama(attn)
    param = model.model.layers[0].self_attn.k_proj.weight
    plain, counts, plain_grad = _logps_and_grad(model, False, param)
    shared, shared_counts, shared_grad = _logps_and_grad(model, True, param)
    assert counts.tolist() == shared_counts.tolist() == [[2, 4, 1], [3, 3, 5], [6, 1, 2]]
    assert plain.shape == (3, 3) and plain.dtype == torch.float32
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, _one_by_one(model), atol=1e-5, rtol=0)
    assert plain_grad.abs().max() > 0
    torch.testing.assert_close(shared_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_prefix_sharing_equals_plain_under_lora():
    model = _lora(_tiny_llama())
    param = next(p for n, p in model.named_parameters() if "lora_A" in n)
    plain, _, plain_grad = _logps_and_grad(model, False, param)
    shared, _, shared_grad = _logps_and_grad(model, True, param)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, _one_by_one(model), atol=1e-5, rtol=0)
    assert plain_grad.abs().max() > 0
    torch.testing.assert_close(shared_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_single_answer_equals_hf_loss():
    """With one answer, its log-prob is -(HF's mean cross-entropy over the labelled tokens) x count."""
    model = _tiny_llama()
    prompt, answer = PROMPTS[1], ANSWERS[1][2]
    labels = torch.tensor([[-100] * len(prompt) + answer])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([prompt + answer]), labels=labels).loss
        logps, counts = answer_logps(model, [prompt], [[answer]], prefix_sharing=True, pad_id=PAD)
    assert counts.tolist() == [[5]]
    torch.testing.assert_close(logps[0, 0], -loss * 5, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_first_token_logps_equal_each_prompts_own_forward(prefix_sharing):
    """``first_token_ids`` gives, per prompt, the log-softmax of the prompt's last logit at those
    ids (checked against each prompt alone), in both layouts, with the answers' sums unchanged."""
    model = _tiny_llama()
    ids = torch.tensor([[41, 42, 45, 41], [45, 47, 49, 60], [53, 58, 59, 1]])
    with torch.no_grad():
        plain_sums, _ = answer_logps(model, PROMPTS, ANSWERS, prefix_sharing=prefix_sharing, pad_id=PAD)
        sums, _, first = answer_logps(model, PROMPTS, ANSWERS, prefix_sharing=prefix_sharing, pad_id=PAD,
                                      first_token_ids=ids)
        expected = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1].log_softmax(-1)[row]
                                for p, row in zip(PROMPTS, ids)])
    torch.testing.assert_close(sums, plain_sums, atol=0, rtol=0)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)


def test_sequence_token_count_and_shape_errors():
    assert sequence_token_count(ANSWERS).tolist() == [[2, 4, 1], [3, 3, 5], [6, 1, 2]]
    model = _tiny_llama()
    with pytest.raises(ValueError, match="same"):
        answer_logps(model, PROMPTS[:2], [ANSWERS[0], ANSWERS[1][:2]], prefix_sharing=True, pad_id=PAD)
    with pytest.raises(ValueError, match="non-empty"):
        answer_logps(model, [[5]], [[[]]], prefix_sharing=False, pad_id=PAD)


def _tiny_gemma3(attn="sdpa"):
    """A random Gemma-3 with the real one's layout: sliding-window layers (window 4, shorter than
    the rows here, so it matters) and one full-attention layer, scaled embeddings, tied head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=64, pad_token_id=PAD, eos_token_id=2, bos_token_id=1)
    config._attn_implementation = attn
    return Gemma3ForCausalLM(config).float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_sharing_equals_plain_on_gemma3_sliding_window_layers(attn):
    model = _tiny_gemma3(attn)
    param = model.model.layers[0].self_attn.k_proj.weight
    plain, _, plain_grad = _logps_and_grad(model, False, param)
    shared, _, shared_grad = _logps_and_grad(model, True, param)
    torch.testing.assert_close(plain, _one_by_one(model), atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grad, plain_grad, atol=1e-5, rtol=1e-4)
