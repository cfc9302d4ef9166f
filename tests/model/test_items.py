"""Hybrid item tokens (LLaRA): placeholder ids after the titles, projected oracle vectors in their
embeddings, the same log-probs in both layouts, export/load, and a projector that trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rosepo.config import AlignConfig, SFTConfig  # noqa: E402
from rosepo.data.prompts import render_prompt  # noqa: E402
from rosepo.errors import ConfigError  # noqa: E402
from rosepo.layout import ITEM_EMBEDDINGS, find_items  # noqa: E402
from rosepo.model.factory import (apply_lora, export_model, load_for_inference, load_model,  # noqa: E402
                                  load_tokenizer)
from rosepo.model.generate import greedy_ids  # noqa: E402
from rosepo.model.items import HybridItemLM, ItemTokens, attach_items, write_items  # noqa: E402
from rosepo.model.logprobs import answer_logps  # noqa: E402
from rosepo.model.tokenize import (encode_answer, encode_prompt, encode_sample_prompt, encode_sft,  # noqa: E402
                                   history_title_positions)
from rosepo.train.align import AlignTask  # noqa: E402
from rosepo.train.sft import SFTTask  # noqa: E402

ITEM_DIM = 8
TITLES = [line.split("\t")[1] for line in (Path(__file__).parents[1] / "fixtures/ml100k_titles.tsv")
          .read_text(encoding="utf-8").splitlines()]


def _sample(i: int, style: str = "paraphrase") -> dict:
    """A sample over the fixture titles with item ids (the title's index; item "7" has no vector)."""
    titles = TITLES
    hist = [(7 * i + 13 * k) % 40 for k in range(4)]
    cands = [(11 * i + 17 * k + 3) % 40 for k in range(5)]
    cands = [c for c in cands if c not in hist] + [7]
    row = {"history_item_ids": [str(k) for k in hist], "history_titles": [titles[k] for k in hist],
           "candidate_item_ids": [str(k) for k in cands], "candidate_titles": [titles[k] for k in cands]}
    row["prompt"] = render_prompt(i % 3, row["history_titles"], row["candidate_titles"], style=style)
    row["answer"] = row["candidate_titles"][0]
    return row


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def item_file(tiny_model_dir, tmp_path_factory):
    """An item file for the tiny model: random vectors for items 0..39 but 7."""
    rng = np.random.default_rng(0)
    vectors = {str(k): rng.normal(size=ITEM_DIM).astype(np.float32) for k in range(40) if k != 7}
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    return write_items(tmp_path_factory.mktemp("items") / ITEM_EMBEDDINGS, vectors, rows, hidden)


def _hybrid(tiny_model_dir, item_file, lora: bool = False):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    if lora:
        from rosepo.config import ModelConfig

        lm = apply_lora(lm, ModelConfig(lora_r=4, lora_alpha=8))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return attach_items(lm, item_file, trainable=True)


@pytest.mark.parametrize("style", ["paraphrase", "list"])
def test_each_item_token_follows_its_title_and_the_text_ids_are_unchanged(tok, item_file, style):
    items = ItemTokens.read(item_file)
    for i in range(6):
        row = _sample(i, style)
        plain = encode_prompt(tok, row["prompt"], 512)
        pairs = items.prompt_items(row)
        ids = encode_prompt(tok, row["prompt"], 512, pairs)
        assert [t for t in ids if t < items.offset] == plain
        assert [t for t in ids if t >= items.offset] == [t for _, t in pairs]
        for title, item in pairs:  # the text before each item token ends with its title
            at = ids.index(item) if ids.count(item) == 1 else None
            if at is not None:
                text = tok.decode([t for t in ids[:at] if t < items.offset])
                assert text.endswith(title), (title, text[-60:])
        # the item without a vector maps to row 0, every other item to its own row
        assert items.token("7") == items.offset and items.token("3") == items.offset + items.rows["3"] > items.offset


def test_history_positions_shift_past_the_item_tokens(tok, item_file):
    items = ItemTokens.read(item_file)
    row = _sample(2)
    pairs = items.prompt_items(row)
    plain = encode_sft(tok, row["prompt"], row["answer"], 512, 48)
    hybrid = encode_sft(tok, row["prompt"], row["answer"], 512, 48, pairs)
    p_plain = history_title_positions(tok, row["prompt"], row["history_titles"], plain["labels"].count(-100))
    p_hybrid = history_title_positions(tok, row["prompt"], row["history_titles"], hybrid["labels"].count(-100), pairs)
    assert len(p_plain) == len(p_hybrid) > 0
    assert [plain["input_ids"][p] for p in p_plain] == [hybrid["input_ids"][p] for p in p_hybrid]
    assert all(hybrid["input_ids"][p] < items.offset for p in p_hybrid)


def test_item_positions_receive_exactly_the_projected_oracle_vectors(tiny_model_dir, item_file, tok):
    model = _hybrid(tiny_model_dir, item_file)
    items = model.items
    row = _sample(1)
    ids = torch.tensor([encode_prompt(tok, row["prompt"], 512, items.prompt_items(row))])
    # What the pairs and eval scorers encode: the same ids for this model, the text alone for its LM.
    assert encode_sample_prompt(model, tok, row, 512) == ids[0].tolist()
    assert encode_sample_prompt(model.lm, tok, row, 512) == encode_prompt(tok, row["prompt"], 512)
    seen = {}
    model.lm.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
        embeds = seen["inputs_embeds"][0]
        is_item = ids[0] >= items.offset
        rows = ids[0][is_item] - items.offset
        assert torch.equal(embeds[is_item], model.projector(model.table[rows]))
        assert torch.equal(embeds[~is_item], model.lm.get_input_embeddings()(ids[0][~is_item]))
    assert torch.equal(model.table[0], torch.zeros(ITEM_DIM))  # item 7: no vector, the zero row
    assert int((rows == 0).sum()) == (row["history_item_ids"] + row["candidate_item_ids"]).count("7") >= 1


def _batch(tok, items, n=3):
    rows = [_sample(i) for i in range(n)]
    prompts = [encode_prompt(tok, r["prompt"], 512, items.prompt_items(r)) for r in rows]
    answers = [[encode_answer(tok, t, 48) for t in r["candidate_titles"][:4]] for r in rows]
    return prompts, answers


def test_prefix_sharing_with_item_tokens_equals_the_plain_forward(tiny_model_dir, item_file, tok):
    model = _hybrid(tiny_model_dir, item_file, lora=True).eval()
    prompts, answers = _batch(tok, model.items)
    with torch.no_grad():
        shared, _ = answer_logps(model, prompts, answers, prefix_sharing=True, pad_id=tok.pad_token_id)
        plain, _ = answer_logps(model, prompts, answers, prefix_sharing=False, pad_id=tok.pad_token_id)
        text_only, _ = answer_logps(model.lm, [[t for t in p if t < model.items.offset] for p in prompts], answers,
                                    prefix_sharing=True, pad_id=tok.pad_token_id)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=0)
    assert (shared - text_only).abs().max() > 1e-3  # the item tokens do change the scores


def test_greedy_decoding_with_the_kv_cache_matches_a_full_forward_per_step(tiny_model_dir, item_file, tok):
    model = _hybrid(tiny_model_dir, item_file, lora=True).eval()
    prompts, _ = _batch(tok, model.items, n=2)
    out = greedy_ids(model, prompts, 5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for prompt, got in zip(prompts, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(len(got)):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == got


def test_export_then_load_gives_the_same_log_probs(tiny_model_dir, item_file, tok, tmp_path):
    model = _hybrid(tiny_model_dir, item_file, lora=True)
    with torch.no_grad():
        model.projector[2].bias.add_(0.3)  # a projector unlike the initial one in the file
    model.eval()
    prompts, answers = _batch(tok, model.items)
    with torch.no_grad():
        before, _ = answer_logps(model, prompts, answers, prefix_sharing=True, pad_id=tok.pad_token_id)
    out = export_model(model, tok, tmp_path / "adapter")
    assert find_items(out) == str(out / ITEM_EMBEDDINGS) and (out / "adapter_config.json").is_file()
    loaded = load_for_inference(str(tiny_model_dir), str(out))
    assert isinstance(loaded, HybridItemLM)
    assert torch.equal(loaded.projector[2].bias, model.projector[2].bias)
    with torch.no_grad():
        after, _ = answer_logps(loaded, prompts, answers, prefix_sharing=True, pad_id=tok.pad_token_id)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def _grad_norm(module) -> float:
    return float(sum(p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5)


def test_the_projector_gets_a_gradient_in_sft_and_in_alignment(tiny_model_dir, item_file, tok):
    model = _hybrid(tiny_model_dir, item_file, lora=True)
    items = model.items
    rows = [_sample(i) for i in range(4)]
    sft_rows = [encode_sft(tok, r["prompt"], r["answer"], 512, 48, items.prompt_items(r)) for r in rows]
    task = SFTTask(SFTConfig())
    loss, _ = task.compute_loss(model, task.collate(sft_rows, tok.pad_token_id))
    loss.backward()
    assert _grad_norm(model.projector) > 0
    model.zero_grad()
    for p in model.projector.parameters():
        p.grad = None

    pairs = []
    for k, (r, s) in enumerate(zip(rows, sft_rows)):
        prompt = s["input_ids"][:s["labels"].count(-100)]
        pairs.append({"prompt_ids": prompt, "chosen_ids": encode_answer(tok, r["answer"], 48),
                      "rejected_ids": [encode_answer(tok, r["candidate_titles"][1], 48)],
                      "ref_chosen_logp": -5.0 - k, "ref_rejected_logp": [-4.0], "oracle_chosen": 1.0,
                      "oracle_rejected": [0.5]})
    from rosepo.config import ModelConfig

    align = AlignTask(AlignConfig(), ModelConfig(), tok.pad_token_id)
    loss, _ = align.compute_loss(model, align.collate(pairs, tok.pad_token_id))
    loss.backward()
    assert _grad_norm(model.projector) > 0


def test_an_item_file_of_another_model_is_refused(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    wrong = write_items(tmp_path / ITEM_EMBEDDINGS, {"1": np.ones(ITEM_DIM)}, rows + 5, hidden)
    with pytest.raises(ConfigError, match="embedding rows"):
        attach_items(lm, wrong, trainable=False)
    with pytest.raises(ConfigError, match="not an item-embeddings file"):
        ItemTokens.read(tiny_model_dir / "model.safetensors")
