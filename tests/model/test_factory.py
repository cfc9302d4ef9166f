"""The tiny model factory, tokenisation of prompts/answers, LoRA wrapping and export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")

from rosepo.config import ModelConfig, load_config  # noqa: E402
from rosepo.errors import ConfigError, DataError  # noqa: E402
from rosepo.model import factory  # noqa: E402
from rosepo.model.tokenize import encode_answer, encode_prompt, encode_sft  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "ml100k_titles.txt"
TITLES = [t for t in FIXTURE.read_text(encoding="utf-8").splitlines() if not t.startswith("#")]
SMALL = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, lora_r=4,
                    lora_alpha=8, lora_target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tokenizer():
    return factory.train_tokenizer(TITLES, 1024)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return factory.build_tiny_model(SMALL, TITLES, tmp_path_factory.mktemp("tiny") / "model")


def _word_tokenizer():
    """A word-level tokenizer with a known vocabulary, for hand-checked ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "Answer": 4, ":": 5, "Toy": 6, "Story": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_tokenizer_special_tokens_no_auto_bos_eos_and_exact_round_trip(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    # 256 byte symbols + 4 specials, plus merges learned from the titles, within the limit.
    assert 260 < len(tokenizer) <= 1024
    for title in TITLES:
        ids = tokenizer(" " + title)["input_ids"]
        assert not {1, 2, 3} & set(ids)
        assert tokenizer.decode(ids) == " " + title
    # Byte-level BPE: the leading space of an answer is part of its first token.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Toy Story")["input_ids"])[0].startswith("Ġ")


def test_title_tokens_make_each_title_one_token_matched_whole(tmp_path):
    """With titles as added tokens: each title is one id in a prompt and as an answer; the
    longest title wins ("Star Wars" inside "Star Wars Returns"), a title never matches inside a
    word ("Heat" in "Heathers", which is no title here), prompts decode back exactly, and the
    saved folder reloads with the same ids."""
    from rosepo.model.tokenize import encode_answer

    titles = ["Heat", "Star Wars", "Star Wars Returns", "Toy Story"]
    tok = factory.train_tokenizer(TITLES, 1024, titles=titles)
    title_ids = {t: tok.convert_tokens_to_ids(t) for t in titles}
    assert len(set(title_ids.values())) == 4 and min(title_ids.values()) >= len(tok) - 4
    prompt = 'History: "Heathers", "Star Wars Returns". Candidates: "Heat", "Star Wars", "Toy Story". Answer:'
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i in title_ids.values()] == [title_ids[t] for t in
                                                          ("Star Wars Returns", "Heat", "Star Wars", "Toy Story")]
    assert tok.decode(ids) == prompt
    assert encode_answer(tok, "Star Wars", 4) == [title_ids["Star Wars"], tok.eos_token_id]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path))(prompt, add_special_tokens=False)["input_ids"] == ids
    # Without titles the tokenizer is the plain BPE one: the title takes several tokens.
    assert len(factory.train_tokenizer(TITLES, 1024)("Star Wars Returns", add_special_tokens=False)["input_ids"]) > 1


def test_tokenizer_training_is_deterministic(tokenizer):
    again = factory.train_tokenizer(list(TITLES), 1024)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_build_tiny_model_round_trip(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_dir / "model.safetensors").is_file()
    assert not list(tiny_dir.parent.glob(".tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    c = model.config
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads) == ("llama", 32, 64, 2, 4, 2)
    assert c.vocab_size == len(tok) == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok("Answer: Toy Story")["input_ids"] == tokenizer("Answer: Toy Story")["input_ids"]
    # Seeded init: rebuilding gives the same weights.
    rebuilt = AutoModelForCausalLM.from_pretrained(
        factory.build_tiny_model(SMALL, TITLES, tiny_dir.parent / "again"))
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def test_resolve_dtype(monkeypatch):
    """``auto``: bfloat16 on a GPU that computes in it, float32 on the CPU and on older cards
    (T4, V100), where an explicit ``bfloat16`` is refused naming the card."""
    monkeypatch.setattr(factory, "gpu_has_bf16", lambda: True)
    assert factory.resolve_dtype("auto", use_gpu=True) == torch.bfloat16
    assert factory.resolve_dtype("auto", use_gpu=False) == torch.float32
    assert factory.resolve_dtype("float32", use_gpu=True) == torch.float32
    assert factory.resolve_dtype("bfloat16", use_gpu=False) == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype"):
        factory.resolve_dtype("fp8", use_gpu=True)
    monkeypatch.setattr(factory, "gpu_has_bf16", lambda: False)
    assert factory.resolve_dtype("auto", use_gpu=True) == torch.float32
    with pytest.raises(ConfigError, match="does not compute in bfloat16.*float32 or auto"):
        factory.resolve_dtype("bfloat16", use_gpu=True)


def test_load_tokenizer_pads_with_eos_on_the_right(tmp_path):
    tok = _word_tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    loaded = factory.load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == 2
    assert loaded.padding_side == "right"


def test_encode_sft_labels_only_the_answer_and_eos():
    tok = _word_tokenizer()
    # "Answer" "Toy" "Story" -> 4 6 7, ":" -> 5, EOS -> 2; labels -100 under the two prompt tokens.
    row = encode_sft(tok, "Answer:", " Toy Story", 8, 4)
    assert row == {"input_ids": [4, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]}
    assert encode_prompt(tok, "Answer:", 2) == [4, 5]
    assert encode_answer(tok, " Toy Story", 3) == [6, 7, 2]


def test_encode_sft_with_bpe_splits_at_the_prompt_answer_boundary(tokenizer):
    prompt, answer = 'History: "Heat", "Fargo". Answer:', " Toy Story"
    row = encode_sft(tokenizer, prompt, answer, 64, 16)
    n = row["labels"].count(-100)
    assert row["labels"][:n] == [-100] * n and -100 not in row["labels"][n:]
    assert tokenizer.decode(row["input_ids"][:n]) == prompt
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][n:-1]) == answer


def test_too_long_prompt_or_answer_is_refused_with_the_remedy():
    tok = _word_tokenizer()
    with pytest.raises(DataError, match=r"2 tokens, more than the limit of 1.*model\.max_prompt_tokens"):
        encode_prompt(tok, "Answer:", 1)
    with pytest.raises(DataError, match=r"3 tokens with EOS.*limit of 2.*model\.max_answer_tokens"):
        encode_sft(tok, "Answer:", " Toy Story", 8, 2)


def _lora_model(tiny_dir):
    model = factory.apply_lora(factory.load_model(str(tiny_dir), dtype=torch.float32), SMALL)
    # LoRA B starts at zero (a no-op adapter); make it matter so the round trips test something.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_apply_lora_trains_only_the_adapters(tiny_dir):
    model = _lora_model(tiny_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Two layers x (q_proj, v_proj) x (A, B).
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)
    full = factory.load_model(str(tiny_dir), dtype=torch.float32)
    assert factory.apply_lora(full, ModelConfig(finetune="full")) is full


def test_unknown_lora_targets_are_refused_with_the_models_linear_layers(tiny_dir):
    """peft alone trains q_proj and ignores "qkv" (it refuses only when no name matches)."""
    import dataclasses

    want = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert factory.model_linear_layers(tiny_dir) == want
    model = factory.load_model(str(tiny_dir), dtype=torch.float32)
    assert factory.linear_layer_names(model) == want
    with pytest.raises(ConfigError, match="names qkv, not a linear layer of this model; its linear layers: "
                                          "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        factory.apply_lora(model, dataclasses.replace(SMALL, lora_target_modules=("q_proj", "qkv")))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_export_and_reload_give_identical_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_dir)
    tok = factory.load_tokenizer(tiny_dir)
    ids = torch.tensor([tok("Answer: Toy Story")["input_ids"]])
    with torch.no_grad():
        want = model(ids).logits
        base = factory.load_model(str(tiny_dir), dtype=torch.float32)(ids).logits
    assert not torch.allclose(want, base, atol=1e-3)

    out = factory.export_model(model, tok, tmp_path / "sft", merged=True)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "merged" / "model.safetensors").is_file()

    reloaded = factory.load_model(str(tiny_dir), dtype=torch.float32, adapter=str(out),
                                  trainable_adapter=False).eval()
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = factory.load_model(str(tiny_dir), dtype=torch.float32, adapter=str(out))
    assert sum(p.requires_grad for p in trainable.parameters()) == 8
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, want, atol=1e-6)
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)
    assert factory.load_tokenizer(out / "merged")("Toy")["input_ids"] == tok("Toy")["input_ids"]


def test_load_model_refuses_a_folder_without_adapter(tiny_dir):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        factory.load_model(str(tiny_dir), dtype=torch.float32, adapter=str(tiny_dir))


def test_title_vectors_are_added_to_the_title_rows_only(tmp_path):
    """model.title_init: sasrec. Each title token's (tied) embedding is its random row plus its
    item vector times s, mapped by the orthonormal `title_projection`, s scaling the vectors' mean
    norm to a random row's expected norm (0.02 · sqrt(32)); every other row is the random one."""
    import dataclasses

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    titles = ["Heat", "Star Wars", "Toy Story"]
    rng = np.random.default_rng(0)
    vectors = {t: rng.normal(size=8).astype(np.float32) for t in titles}
    cfg = dataclasses.replace(SMALL, title_tokens=True, title_init="sasrec")
    plain = AutoModelForCausalLM.from_pretrained(factory.build_tiny_model(cfg, TITLES, tmp_path / "a", titles))
    hybrid_dir = factory.build_tiny_model(cfg, TITLES, tmp_path / "b", titles, title_vectors=vectors)
    hybrid = AutoModelForCausalLM.from_pretrained(hybrid_dir)
    tok = AutoTokenizer.from_pretrained(hybrid_dir)
    e0, e1 = plain.get_input_embeddings().weight, hybrid.get_input_embeddings().weight
    proj = factory.title_projection(32, 8)
    assert torch.allclose(proj.T @ proj, torch.eye(8), atol=1e-5)
    stacked = torch.from_numpy(np.stack([vectors[t] for t in titles]))
    scale = 0.02 * 32 ** 0.5 / stacked.norm(dim=1).mean()
    ids = tok.convert_tokens_to_ids(titles)
    for t, i in zip(titles, ids):
        want = e0[i] + scale * proj @ torch.from_numpy(vectors[t])
        assert torch.allclose(e1[i], want, atol=1e-6), t
    others = [i for i in range(len(tok)) if i not in ids]
    assert torch.equal(e0[others], e1[others])
    assert hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()


def test_orthogonal_title_rows_score_a_state_in_the_oracle_space_by_the_oracle_part_alone(tmp_path):
    """model.title_orthogonal: the title row is its random row minus that row's component in P's
    column space, plus s·P·v; so for h = P·u, h·e_t = s·u·v_t exactly, the random part is kept
    outside P's space, and every other row is untouched."""
    import dataclasses

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    titles = ["Heat", "Star Wars", "Toy Story"]
    rng = np.random.default_rng(1)
    vectors = {t: rng.normal(size=8).astype(np.float32) for t in titles}
    cfg = dataclasses.replace(SMALL, title_tokens=True, title_init="sasrec", title_orthogonal=True)
    plain = AutoModelForCausalLM.from_pretrained(factory.build_tiny_model(cfg, TITLES, tmp_path / "a", titles))
    split_dir = factory.build_tiny_model(cfg, TITLES, tmp_path / "b", titles, title_vectors=vectors)
    split = AutoModelForCausalLM.from_pretrained(split_dir)
    tok = AutoTokenizer.from_pretrained(split_dir)
    e0, e1 = plain.get_input_embeddings().weight.detach(), split.get_input_embeddings().weight.detach()
    proj = factory.title_projection(32, 8)
    stacked = torch.from_numpy(np.stack([vectors[t] for t in titles]))
    scale = 0.02 * 32 ** 0.5 / stacked.norm(dim=1).mean()
    u = torch.from_numpy(rng.normal(size=8).astype(np.float32))
    ids = tok.convert_tokens_to_ids(titles)
    for t, i in zip(titles, ids):
        v = torch.from_numpy(vectors[t])
        assert torch.allclose(e1[i] @ (proj @ u), scale * (u @ v), atol=1e-5), t
        rest = e1[i] - scale * proj @ v
        assert torch.allclose(proj.T @ rest, torch.zeros(8), atol=1e-6), t  # the random part is outside P
        want = e0[i] - proj @ (proj.T @ e0[i])
        assert torch.allclose(rest, want, atol=1e-6), t
        assert rest.norm() > 0.5 * e0[i].norm(), t  # 24 of 32 random dimensions are kept
    others = [i for i in range(len(tok)) if i not in ids]
    assert torch.equal(e0[others], e1[others])
    with pytest.raises(ConfigError, match="title_orthogonal"):
        load_config(None, ["model.title_orthogonal=true"])


def test_title_vectors_for_non_tokens_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="title_tokens"):
        factory.build_tiny_model(SMALL, TITLES, tmp_path / "m", (), title_vectors={"Heat": [1.0, 2.0]})


def test_a_gpu_training_worker_turns_off_cudnn_attention(monkeypatch):
    """Gemma-3 trained to NaN within 50 steps in bfloat16 on an H200 (finite on the CPU): cuDNN's
    masked SDPA backward, which PyTorch picks on Hopper GPUs. A GPU worker turns it off (and
    TF32 on) before it computes; the CPU never takes that path, so this checks the switch."""
    from rosepo.config import ModelConfig
    from rosepo.train.loop import _train_dtype

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(factory, "gpu_has_bf16", lambda: True)
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert _train_dtype(ModelConfig(), use_gpu=False) == torch.float32
        assert torch.backends.cuda.cudnn_sdp_enabled()  # the CPU path changes nothing
        assert _train_dtype(ModelConfig(), use_gpu=True) == torch.bfloat16
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
