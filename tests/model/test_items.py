"""Hybrid item tokens (LLaRA): placeholder ids after the titles, projected oracle vectors in their
embeddings, the same log-probs in both layouts, export/load, and a projector that trains; the
user token (CoLLM): last in the prompt, the projected oracle user state of the history in its
embedding, in every one of those checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rosepo.config import AlignConfig, OracleConfig, SFTConfig  # noqa: E402
from rosepo.data.prompts import render_prompt  # noqa: E402
from rosepo.errors import ConfigError  # noqa: E402
from rosepo.layout import ITEM_EMBEDDINGS, find_items  # noqa: E402
from rosepo.model.factory import (apply_lora, export_model, load_for_inference, load_model,  # noqa: E402
                                  load_tokenizer)
from rosepo.model.generate import greedy_ids  # noqa: E402
from rosepo.model.items import HybridItemLM, ItemTokens, attach_items, title_projection, write_items  # noqa: E402
from rosepo.model.logprobs import answer_logps  # noqa: E402
from rosepo.model.tokenize import (encode_answer, encode_prompt, encode_sample_prompt, encode_sft,  # noqa: E402
                                   history_title_positions)
from rosepo.pairs.sasrec import ItemVocab, Oracle, build_model  # noqa: E402
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


def _oracle() -> Oracle:
    """A SASRec over items 0..39 but 7, random weights, its vocabulary in a shuffled order (the
    item file's rows are sorted: the user encoder must reorder), histories cut to 3 items."""
    items = [str(k) for k in np.random.default_rng(1).permutation(40) if k != 7]
    cfg = OracleConfig(hidden_size=ITEM_DIM, num_heads=2, max_len=3)
    torch.manual_seed(2)
    model = build_model(cfg, len(items) + 1)
    with torch.no_grad():
        for p in model.parameters():  # no zero biases or unit norms: every weight matters
            p.add_(torch.randn(p.shape) * 0.1)
    return Oracle(model, ItemVocab(items), cfg)


@pytest.fixture(scope="module")
def oracle():
    return _oracle()


@pytest.fixture(scope="module", params=["items", "items+user"])
def item_file(request, tiny_model_dir, tmp_path_factory, oracle):
    """An item file for the tiny model: the oracle's vectors for items 0..39 but 7; with the user
    token too (``items+user``)."""
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    return write_items(tmp_path_factory.mktemp("items") / ITEM_EMBEDDINGS, oracle.item_vectors(), rows, hidden,
                       oracle=oracle if request.param == "items+user" else None)


@pytest.fixture(scope="module")
def user_file(tiny_model_dir, tmp_path_factory, oracle):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    return write_items(tmp_path_factory.mktemp("user") / ITEM_EMBEDDINGS, oracle.item_vectors(), rows, hidden,
                       oracle=oracle)


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
        if items.user_base is not None:  # the user token last, naming the history's length
            assert pairs[-1] == (None, ids[-1]) and ids[-1] == items.offset + len(items.item_ids) + 1 + 4
        # the text before each item token ends with its title
        for title, item in (p for p in pairs if p[0] is not None):
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
        if items.user_base is not None:
            is_item &= ids[0] < items.user_base
        rows = ids[0][is_item] - items.offset
        assert torch.equal(embeds[is_item], model.projector(model.table[rows]))
        is_text = ids[0] < items.offset
        assert torch.equal(embeds[is_text], model.lm.get_input_embeddings()(ids[0][is_text]))
    assert torch.equal(model.table[0], torch.zeros(ITEM_DIM))  # item 7: no vector, the zero row
    assert int((rows == 0).sum()) == (row["history_item_ids"] + row["candidate_item_ids"]).count("7") >= 1


def test_the_user_token_receives_the_projected_oracle_state_of_its_history(tiny_model_dir, user_file, tok, oracle):
    """Computed here from the samples' item ids through the oracle's own vocabulary (not the
    model's reordered copy): the last 3 (``max_len``) history items, an item without a vector as
    padding; rows in one batch, left-padded, each get their own history's state."""
    model = _hybrid(tiny_model_dir, user_file)
    items = model.items
    rows = [_sample(i) for i in (1, 3, 4)]
    prompts = [encode_prompt(tok, r["prompt"], 512, items.prompt_items(r)) for r in rows]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    seen = {}
    model.lm.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
        seqs = torch.tensor([[0] * (3 - len(h[-3:])) + [oracle.vocab.index.get(i, 0) for i in h[-3:]]
                             for h in (r["history_item_ids"] for r in rows)])
        state = oracle.model.encode(seqs)[:, -1]
        expected = model.user_projector(state)
        got = seen["inputs_embeds"][:, -1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # histories differ, so do their states
    assert all(items.prompt_items(r)[-1] == (None, items.user_base + len(r["history_item_ids"])) for r in rows)
    assert any("7" in r["history_item_ids"][-3:] for r in rows)  # the padding case is exercised


def test_an_aligned_user_projector_maps_the_oracle_state_by_the_title_projection(tiny_model_dir, tok, oracle,
                                                                                 tmp_path):
    """``model.user_init: sasrec``: the user token's embedding is a · P · u, P the orthonormal
    `title_projection` the title vectors were added through, u the oracle's state (computed here
    through the oracle's own vocabulary), a = 1 / |(gamma, beta)| of its final layer norm; so its
    dot product with a title vector s · P · v is a · s · u·v, the oracle's score, up to scale."""
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    path = write_items(tmp_path / ITEM_EMBEDDINGS, oracle.item_vectors(), rows, hidden, oracle=oracle,
                       user_init="sasrec")
    model = attach_items(lm, path, trainable=True)
    rows_ = [_sample(i) for i in (1, 3, 4)]
    prompts = [encode_prompt(tok, r["prompt"], 512, model.items.prompt_items(r)) for r in rows_]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        got = model.embed(ids)[:, -1]
        seqs = torch.tensor([[0] * (3 - len(h[-3:])) + [oracle.vocab.index.get(i, 0) for i in h[-3:]]
                             for h in (r["history_item_ids"] for r in rows_)])
        u = oracle.model.encode(seqs)[:, -1]
        norm = oracle.model.norm
        a = 1.0 / torch.cat([norm.weight, norm.bias]).norm()
        proj = title_projection(hidden, ITEM_DIM)
        torch.testing.assert_close(got, a * u @ proj.T, atol=1e-5, rtol=0)
        v = torch.from_numpy(np.stack(list(oracle.item_vectors().values())))
        torch.testing.assert_close(got @ (proj @ v.T), a * u @ v.T, atol=1e-5, rtol=0)
    assert got.norm(dim=1).min() > 0.1
    model.embed(ids)[:, -1].pow(2).sum().backward()
    first, second = model.user_projector[0], model.user_projector[2]
    assert float(first.weight.grad[:2 * ITEM_DIM].abs().sum()) > 0  # it still trains from there,
    assert float(second.weight.grad[:, 2 * ITEM_DIM:].abs().sum()) > 0  # the silent units too
    with pytest.raises(ConfigError, match="oracle's width"):
        write_items(tmp_path / "narrow.safetensors", oracle.item_vectors(), rows, 2 * ITEM_DIM - 1, oracle=oracle,
                    user_init="sasrec")
    from rosepo.config import load_config

    with pytest.raises(ConfigError, match="model.user_init"):
        load_config("configs/ml100k-tiny.yaml", ["model.title_init=random"])
    with pytest.raises(ConfigError, match="model.user_init"):
        load_config("configs/ml100k-tiny.yaml", ["model.user_token=none"])
    with pytest.raises(ConfigError, match="oracle.hidden_size <= model.hidden_size / 2"):
        load_config("configs/ml100k-tiny.yaml", ["oracle.hidden_size=65"])
    assert load_config("configs/ml100k-tiny.yaml", ["oracle.hidden_size=64"]).model.user_init == "sasrec"


def test_user_token_needs_item_tokens_and_is_counted_in_the_prompt_limit(tok, user_file):
    import pyarrow as pa

    from rosepo.config import load_config
    from rosepo.errors import DataError
    from rosepo.model.tokenize import check_sample_lengths

    with pytest.raises(ConfigError, match="model.user_token"):
        load_config("configs/smoke.yaml", ["model.user_token=sasrec", "model.item_embeddings=none"])
    row = _sample(3)
    table = pa.Table.from_pylist([{"sample_id": "s0", **row}])
    n = len(encode_prompt(tok, row["prompt"], 512, ItemTokens.read(user_file).prompt_items(row)))
    assert check_sample_lengths(tok, {"train": table}, n, 48, "x", items=True, user=True)["train"]["prompt_tokens"] == n
    with pytest.raises(DataError, match="more than model.max_prompt_tokens"):
        check_sample_lengths(tok, {"train": table}, n - 1, 48, "x", items=True, user=True)


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
        for m in (model.projector, model.user_projector):  # projectors unlike the initial ones in the file
            if m is not None:
                m[2].bias.add_(0.3)
    model.eval()
    prompts, answers = _batch(tok, model.items)
    with torch.no_grad():
        before, _ = answer_logps(model, prompts, answers, prefix_sharing=True, pad_id=tok.pad_token_id)
    out = export_model(model, tok, tmp_path / "adapter")
    assert find_items(out) == str(out / ITEM_EMBEDDINGS) and (out / "adapter_config.json").is_file()
    loaded = load_for_inference(str(tiny_model_dir), str(out))
    assert isinstance(loaded, HybridItemLM)
    assert torch.equal(loaded.projector[2].bias, model.projector[2].bias)
    if model.user_projector is not None:
        assert torch.equal(loaded.user_projector[2].bias, model.user_projector[2].bias)
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
    trained = [model.projector] + ([model.user_projector] if model.user_projector is not None else [])
    assert all(_grad_norm(m) > 0 for m in trained)
    assert not any(p.requires_grad for p in (model._user.encoder.parameters() if model._user else []))
    model.zero_grad()
    for m in trained:
        for p in m.parameters():
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
    assert all(_grad_norm(m) > 0 for m in trained)


def test_an_item_file_of_another_model_is_refused(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    rows, hidden = lm.get_input_embeddings().weight.shape
    wrong = write_items(tmp_path / ITEM_EMBEDDINGS, {"1": np.ones(ITEM_DIM)}, rows + 5, hidden)
    with pytest.raises(ConfigError, match="embedding rows"):
        attach_items(lm, wrong, trainable=False)
    with pytest.raises(ConfigError, match="not an item-embeddings file"):
        ItemTokens.read(tiny_model_dir / "model.safetensors")
