"""The pretrained path on the real Gemma-3-270M: what the tiny Llama cannot show.

Every test uses the session fixtures ``gemma_dir`` / ``gemma`` (tests/conftest.py): fetched once
into ``data/``, loaded once; skipped only when the model cannot be downloaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rosepo.config import ModelConfig
from rosepo.errors import ConfigError
from rosepo.model.generate import greedy_ids
from rosepo.model.factory import apply_lora, linear_layer_names, model_linear_layers
from rosepo.model.fetch import fetch_model, resolve_model
from rosepo.model.logprobs import answer_logps
from rosepo.model.tokenize import encode_answer, encode_prompt, encode_sft

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: 150 ML-100K titles (the fixture of tests/conftest.py's samples).
TITLES = [line.split("\t")[1] for line in
          (REPO / "tests/fixtures/ml100k_titles.tsv").read_text(encoding="utf-8").splitlines()]


def _candidates(samples, k: int = 6):
    """``k`` candidate titles per sample, the answer first."""
    return [[s["answer"]] + TITLES[5 * i: 5 * i + k - 1] for i, s in enumerate(samples)]


def test_fetched_folder_is_a_float32_gemma3_and_the_name_resolves_to_it_without_refetching(gemma_dir):
    manifest = json.loads((gemma_dir / "manifest.json").read_text())
    assert manifest["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert manifest["architecture"] == "Gemma3ForCausalLM" and manifest["parameters"] == 268_098_176
    config = json.loads((gemma_dir / "config.json").read_text())
    assert (config["dtype"], config["vocab_size"], config["sliding_window"]) == ("float32", 262_144, 512)
    assert config["tie_word_embeddings"] and config["final_logit_softcapping"] is None
    assert "quantization_config" not in config
    assert (gemma_dir / "GEMMA_TERMS.html").is_file() and (gemma_dir / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    assert fetch_model("gemma-3-270m", REPO / "data") == gemma_dir
    assert resolve_model("gemma-3-270m", REPO / "data") == str(gemma_dir)  # model.name_or_path
    assert time.perf_counter() - t0 < 1


def test_gemma_prompts_start_with_bos_and_the_tiny_tokenizers_do_not(gemma, tiny_model_dir, sft_samples):
    from rosepo.model.factory import load_tokenizer

    tok, _ = gemma
    prompt = sft_samples[0]["prompt"]
    ids = encode_prompt(tok, prompt, 512)
    assert ids[0] == tok.bos_token_id == 2 and ids == list(tok(prompt)["input_ids"])
    tiny = load_tokenizer(tiny_model_dir)
    assert encode_prompt(tiny, prompt, 512) == list(tiny(prompt, add_special_tokens=False)["input_ids"])
    assert tiny.bos_token_id not in encode_prompt(tiny, prompt, 512)


def test_answer_ids_are_the_ids_of_the_whole_text_and_decode_back_to_the_title(gemma, sft_samples):
    """What SFT trains on (prompt + answer + EOS) is the tokenisation of the whole text, with no
    seam at "Answer:"; the answer's ids are those ranking and constrained decoding score
    (`encode_answer`, the same call), they spell the title as it is quoted in the prompt (but
    for its last piece: ')"' is one token there, ')' here), and decoded as a greedy answer
    is they give back the exact title."""
    tok, _ = gemma
    for s in sft_samples[:24]:
        row = encode_sft(tok, s["prompt"], s["answer"], 1024, 48)
        answer = encode_answer(tok, s["answer"], 48)
        assert row["input_ids"] == encode_prompt(tok, s["prompt"], 1024) + answer
        assert row["input_ids"][:-1] == list(tok(s["prompt"] + s["answer"])["input_ids"])
    for title in TITLES:
        ids = encode_answer(tok, title, 48)
        assert ids[-1] == tok.eos_token_id
        quoted = tok(f'from: "{title}".', add_special_tokens=False)["input_ids"]
        assert any(quoted[i:i + len(ids) - 2] == ids[:-2] for i in range(len(quoted))), title
        assert tok.batch_decode([ids], skip_special_tokens=True)[0].strip() == title


def test_prefix_sharing_equals_plain_forward_on_gemma3(gemma, sft_samples):
    """Within 1e-4 in float32, on real prompts and on one past the 512-token sliding window,
    where only the window that `answer_logps` applies itself keeps the two layouts equal."""
    tok, model = gemma
    short = [encode_prompt(tok, s["prompt"], 1024) for s in sft_samples[:2]]
    long = encode_prompt(tok, " ".join(s["prompt"] for s in sft_samples[2:10]), 2048)
    assert len(long) > 512 + 48
    answers = [[encode_answer(tok, t, 48) for t in ts] for ts in _candidates(sft_samples[:2])]
    diffs = []
    with torch.no_grad():
        # Two calls, so the short rows are not padded to the long one's width (CPU time).
        for prompts, cands in ((short, answers), ([long], [answers[0][:2]])):
            plain, _ = answer_logps(model, prompts, cands, prefix_sharing=False, pad_id=tok.pad_token_id)
            shared, _ = answer_logps(model, prompts, cands, prefix_sharing=True, pad_id=tok.pad_token_id)
            diffs.append((shared - plain).abs().max().item())
            if prompts is short:  # the plain layout against the model's own logits, one sequence alone
                seq = short[0] + cands[0][1]
                alone = model(input_ids=torch.tensor([seq])).logits[0].log_softmax(-1)
                by_hand = sum(alone[len(short[0]) - 1 + i, t] for i, t in enumerate(cands[0][1]))
                assert abs(plain[0, 1].item() - by_hand.item()) < 1e-4
    print(f"\ngemma-3-270m prefix-shared vs plain log-probs, max abs diff: {diffs[0]:.2e} "
          f"(prompts of ~{len(short[0])} tokens), {diffs[1]:.2e} (a {len(long)}-token prompt)")
    assert max(diffs) < 1e-4


def test_greedy_decoding_with_the_kv_cache_equals_decoding_without_it(gemma, sft_samples):
    """Left-padded batch with the cache (Gemma-3's sliding and full layers) against each prompt
    alone, the whole sequence re-run every step."""
    tok, model = gemma
    prompts = [encode_prompt(tok, s["prompt"], 1024) for s in sft_samples[:2]]
    prompts[1] = prompts[1][:-40]  # different lengths, so the batch is padded
    steps = 4
    cached = greedy_ids(model, prompts, steps, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with torch.no_grad():
        for prompt, got in zip(prompts, cached):
            seq = list(prompt)
            for _ in range(len(got)):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            assert seq[len(prompt):] == got
    assert all(len(g) == steps or g[-1] == tok.eos_token_id for g in cached)


def test_lora_targets_are_the_models_linear_layers_and_unknown_ones_are_refused(gemma, gemma_dir):
    tok, model = gemma
    layers = linear_layer_names(model)
    assert model_linear_layers(gemma_dir) == layers
    assert set(ModelConfig().lora_target_modules) <= set(layers)
    with pytest.raises(ConfigError, match=r"names qkv_proj, not a linear layer.*: down_proj, gate_proj, k_proj"):
        apply_lora(model, ModelConfig(lora_target_modules=("q_proj", "qkv_proj")))


def test_item_tokens_on_gemma3_keep_its_embedding_scale_and_prefix_sharing(gemma, sft_samples, tmp_path):
    """Through ``inputs_embeds``: without item tokens the hybrid model's logits are Gemma's own
    (its embedding module applies the sqrt(hidden) scale); with them, prefix sharing still equals
    the plain forward within 1e-4."""
    import numpy as np

    from rosepo.layout import ITEM_EMBEDDINGS
    from rosepo.model.items import attach_items, write_items

    tok, model = gemma
    rows, hidden = model.get_input_embeddings().weight.shape
    rng = np.random.default_rng(0)
    path = write_items(tmp_path / ITEM_EMBEDDINGS, {t: rng.normal(size=16) for t in TITLES}, rows, hidden)
    hybrid = attach_items(model, path, trainable=False).eval()
    sample = sft_samples[0]
    titles = [t for t in TITLES if f'"{t}"' in sample["prompt"]]
    items = [(t, hybrid.items.token(t)) for t in sorted(titles, key=sample["prompt"].index)]
    plain_ids = encode_prompt(tok, sample["prompt"], 1024)
    item_ids = encode_prompt(tok, sample["prompt"], 1024, items)
    assert len(item_ids) == len(plain_ids) + len(items) >= 6
    answers = [[encode_answer(tok, t, 48) for t in _candidates(sft_samples[:1])[0]]]
    with torch.no_grad():
        ids = torch.tensor([plain_ids])
        torch.testing.assert_close(hybrid(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
        shared, _ = answer_logps(hybrid, [item_ids], answers, prefix_sharing=True, pad_id=tok.pad_token_id)
        plain, _ = answer_logps(hybrid, [item_ids], answers, prefix_sharing=False, pad_id=tok.pad_token_id)
        text, _ = answer_logps(hybrid, [plain_ids], answers, prefix_sharing=True, pad_id=tok.pad_token_id)
    assert (shared - plain).abs().max().item() < 1e-4
    assert (shared - text).abs().max().item() > 1e-3
