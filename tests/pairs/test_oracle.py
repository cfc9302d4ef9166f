"""The SASRec preference oracle: vocabulary, model, scoring, evaluation, and a Ray Train run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rosepo.config import DataConfig, OracleConfig
from rosepo.errors import ConfigError, DataError
from rosepo.pairs import sasrec as oracle_mod
from rosepo.pairs.oracle import train_oracle
from rosepo.pairs.sasrec import ItemVocab, Oracle, SASRec, build_model, evaluate_oracle, load_oracle
from rosepo.schema import SAMPLES


def write_samples(folder, rows_by_split: dict[str, list[tuple]]) -> None:
    """A samples folder from ``(sample_id, history, target, candidates)`` tuples per split."""
    import pyarrow.parquet as pq

    for split, rows in rows_by_split.items():
        (folder / split).mkdir(parents=True)
        data = [{"sample_id": sid, "user_id": sid.split(":")[0], "split": split,
                 "history_item_ids": hist, "history_titles": hist, "target_item_id": target,
                 "target_title": target, "candidate_item_ids": cands, "candidate_titles": cands,
                 "template_id": 0, "prompt": "p", "answer": target}
                for sid, hist, target, cands in rows]
        pq.write_table(pa.Table.from_pylist(data, schema=SAMPLES), folder / split / "part-0.parquet")


def tiny_oracle(item_ids: list[str], max_len: int = 4) -> Oracle:
    torch.manual_seed(0)
    cfg = OracleConfig(hidden_size=8, num_layers=1, num_heads=2, dropout=0.0, max_len=max_len)
    vocab = ItemVocab(item_ids)
    return Oracle(build_model(cfg, len(vocab)), vocab, cfg)


def test_vocab_encoding_and_round_trip(tmp_path):
    """Ids keep their given order from index 1; histories are left-padded and keep their last items.

    Vocab ["b", "a", "c"]: b=1, a=2, c=3. With max_len 3, ["a"] -> [0, 0, 2] and
    ["b", "c", "a", "b"] -> its last three, c a b -> [3, 2, 1].
    """
    vocab = ItemVocab(["b", "a", "c"])
    assert len(vocab) == 4 and vocab.encode(["c", "b"]) == [3, 1]
    enc = vocab.encode_histories([["a"], ["b", "c", "a", "b"]], max_len=3)
    np.testing.assert_array_equal(enc, [[0, 0, 2], [3, 2, 1]])
    vocab.save(tmp_path / "vocab.json")
    back = ItemVocab.load(tmp_path / "vocab.json")
    assert back.item_ids == ["b", "a", "c"] and back.index == vocab.index
    with pytest.raises(DataError, match="'zz'"):
        vocab.encode(["a", "zz"])
    with pytest.raises(DataError, match="row 1 is empty"):
        vocab.encode_histories([["a"], []], max_len=3)
    with pytest.raises(DataError, match="duplicate"):
        ItemVocab(["a", "a"])
    (tmp_path / "bad.json").write_text(json.dumps(["a"]))
    with pytest.raises(DataError, match="not an oracle vocabulary"):
        ItemVocab.load(tmp_path / "bad.json")


def test_vocab_from_samples_covers_every_split(tmp_path):
    """History, target and candidate ids of all splits are in; items only in test candidates too."""
    write_samples(tmp_path, {
        "train": [("u1:000003", ["1", "2"], "3", ["3", "4"])],
        "valid": [("u2:000003", ["5"], "6", ["6", "7"])],
        "test": [("u3:000003", ["1"], "8", ["10", "8"])],
    })
    assert ItemVocab.from_samples(tmp_path).item_ids == ["1", "10", "2", "3", "4", "5", "6", "7", "8"]


def test_sasrec_shapes_padding_and_causality():
    """Shapes; padding index never scores; position t ignores positions > t; padding is invisible."""
    torch.manual_seed(0)
    model = SASRec(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0, max_len=6)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7]])
    for train_mode in (True, False):  # eval + no_grad takes torch's fused encoder path
        model.train(train_mode)
        with torch.set_grad_enabled(train_mode):
            hidden = model.encode(seq)
            logits = model(seq)
            assert hidden.shape == (3, 6, 16) and logits.shape == (3, 20)
            assert torch.isneginf(logits[:, 0]).all() and torch.isfinite(logits[:, 1:]).all()
            assert torch.allclose(logits[:, 1:], hidden[:, -1] @ model.item_emb.weight[1:].T, atol=1e-5)
            later = seq.clone()
            later[:, 4:] = torch.tensor([11, 12])
            changed = model.encode(later)
            assert torch.allclose(changed[:, :4], hidden[:, :4], atol=1e-6)
            assert not torch.allclose(changed[:2, 4:], hidden[:2, 4:], atol=1e-3)
            # Left padding is invisible: row 0 without its two pads gives the same user.
            assert torch.allclose(model(seq[:1, 2:]), logits[:1], atol=1e-5)
            earlier = seq.clone()
            earlier[0, 1] = 9  # an item where row 0 had padding: now it must matter
            assert not torch.allclose(model(earlier)[0], logits[0], atol=1e-3)


def test_score_matches_model_and_batches(monkeypatch):
    """score() gathers the model's scores of each candidate; batching does not change them."""
    oracle = tiny_oracle(["a", "b", "c", "d", "e"])
    histories = [["a", "b"], ["c"], ["e", "d", "c", "b", "a"]]
    candidates = [["c", "d"], ["a", "e"], ["b", "a"]]
    scores = oracle.score(histories, candidates)
    assert scores.shape == (3, 2) and scores.dtype == np.float32
    with torch.no_grad():
        full = oracle.model(torch.tensor([[0, 0, 1, 2], [0, 0, 0, 3], [4, 3, 2, 1]]))
    np.testing.assert_allclose(scores, [[full[0, 3], full[0, 4]], [full[1, 1], full[1, 5]],
                                        [full[2, 2], full[2, 1]]], rtol=1e-6)
    monkeypatch.setattr(oracle_mod, "SCORE_BATCH", 2)
    np.testing.assert_allclose(oracle.score(histories, candidates), scores, rtol=1e-6)


def test_score_refuses_unknown_items_and_ragged_input():
    oracle = tiny_oracle(["a", "b", "c"])
    with pytest.raises(DataError, match="'x'"):
        oracle.score([["a"]], [["b", "x"]])
    with pytest.raises(DataError, match="'y'"):
        oracle.score([["y", "a"]], [["b", "c"]])
    with pytest.raises(DataError, match="differ in length"):
        oracle.score([["a"], ["b"]], [["b", "c"], ["a"]])
    with pytest.raises(DataError, match="aligned"):
        oracle.score([["a"]], [])


class FixedScores:
    """A fake oracle: the scores of each row, looked up by the row's first history item."""

    def __init__(self, by_history: dict[str, list[float]]):
        self.by_history = by_history

    def score(self, histories, candidates):
        return np.array([self.by_history[h[0]] for h in histories])


def test_evaluate_oracle_hand_computed(tmp_path):
    """Three samples, six candidates each; ranks 1, 2 (a tie, counted against the target) and 6.

    hr@1 = 1/3; hr@5 = 2/3; hr@10 = 1.
    ndcg@5 = (1/log2(2) + 1/log2(3) + 0) / 3 = (1 + 0.6309298) / 3 = 0.5436433.
    ndcg@10 = (1 + 1/log2(3) + 1/log2(7)) / 3 = (1 + 0.6309298 + 0.3562072) / 3 = 0.6623790.
    """
    cands = ["c1", "c2", "c3", "c4", "c5", "c6"]
    write_samples(tmp_path, {"valid": [
        ("u1:000005", ["h1"], "c2", cands),
        ("u2:000005", ["h2"], "c3", cands),
        ("u3:000005", ["h3"], "c6", cands),
    ]})
    fake = FixedScores({
        "h1": [0.1, 0.9, 0.2, 0.3, 0.4, 0.5],   # target c2 strictly best: rank 1
        "h2": [0.7, 0.1, 0.7, 0.2, 0.3, 0.4],   # target c3 tied with c1: rank 2
        "h3": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # target c6 last: rank 6
    })
    m = evaluate_oracle(fake, tmp_path, "valid")
    assert m["n"] == 3
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == pytest.approx(2 / 3) and m["hr@10"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 3) == pytest.approx(0.5436433)
    assert m["ndcg@10"] == pytest.approx(0.6623790, abs=1e-7)
    with pytest.raises(DataError, match="no samples"):
        evaluate_oracle(fake, tmp_path, "test")


def test_impossible_config_or_data_refused_before_ray_starts(tmp_path):
    """An impossible oracle config is refused when the run's config loads (issue 19: once only at
    the oracle stage, after the whole SFT); too little data before Ray starts."""
    from rosepo.config import load_config

    with pytest.raises(ConfigError, match="oracle.hidden_size"):
        load_config(None, ["oracle.hidden_size=30", "oracle.num_heads=4"])
    with pytest.raises(ConfigError, match="oracle.batch_size"):
        load_config(None, ["oracle.batch_size=1", "oracle.num_workers=2"])
    write_samples(tmp_path / "s", {"train": [("u1:000003", ["1"], "2", ["2", "3"])]})
    with pytest.raises(DataError, match="1 train samples"):
        train_oracle(tmp_path / "s", OracleConfig(num_workers=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # No valid samples (too small a share of few users): once refused only after training.
    write_samples(tmp_path / "s2", {"train": [("u1:000003", ["1"], "2", ["2", "3"])],
                                    "test": [("u2:000003", ["1"], "2", ["2", "3"])]})
    with pytest.raises(DataError, match="no valid samples to evaluate the oracle on"):
        train_oracle(tmp_path / "s2", OracleConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_oracle_names_missing_files(tmp_path):
    with pytest.raises(DataError, match="model.safetensors"):
        load_oracle(tmp_path)


@pytest.fixture(scope="module")
def samples_dir(request, tmp_path_factory, ray_session):
    """The shared ML-100K samples fixture where conftest has one, else built here."""
    try:
        return request.getfixturevalue("ml100k_samples")
    except pytest.FixtureLookupError:
        from pathlib import Path

        from rosepo.data.samples import build_samples

        data_dir = Path(__file__).resolve().parents[2] / "data"
        out = tmp_path_factory.mktemp("oracle") / "samples"
        build_samples(DataConfig(data_dir=str(data_dir)), out)
        return out


#: A short run on a seeded slice: about 7 s of training on one core; valid HR@1 was 0.27.
SHORT = OracleConfig(max_samples=20_000, epochs=3)


@pytest.fixture(scope="module")
def trained(samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle") / "oracle"
    return out, train_oracle(samples_dir, SHORT, out)


@pytest.mark.slow
def test_train_oracle_end_to_end(trained, samples_dir):
    """A Ray Train run writes safetensors + JSON only, learns, and its manifest is reproducible."""
    from safetensors.torch import load_file

    out, manifest = trained
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                     "vocab.json"]
    losses = manifest["loss_per_epoch"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert losses[0] < math.log(manifest["vocab_size"])  # better than uniform over the items
    saved = json.loads((out / "config.json").read_text())
    assert saved == dataclasses.asdict(SHORT) | {"vocab_size": manifest["vocab_size"]}
    assert set(load_file(str(out / "model.safetensors"))) == set(build_model(SHORT, 10).state_dict())
    oracle = load_oracle(out)
    valid = evaluate_oracle(oracle, samples_dir, "valid")
    assert valid == manifest["metrics"]["valid"]
    assert valid["hr@1"] > 0.15 and valid["ndcg@5"] > valid["hr@1"]  # random: hr@1 = 0.05
    assert manifest["metrics"]["test"]["hr@1"] > 0.1


@pytest.mark.slow
def test_two_ddp_workers_follow_the_one_worker_trajectory(trained, samples_dir, tmp_path):
    """With dropout 0, two DDP workers (half the batch each, averaged gradients) see the same global
    batches as one worker, so the loss per epoch matches up to float rounding."""
    _, one = trained
    two = train_oracle(samples_dir, dataclasses.replace(SHORT, num_workers=2), tmp_path / "oracle2")
    np.testing.assert_allclose(two["loss_per_epoch"], one["loss_per_epoch"], rtol=1e-4)
    assert abs(two["metrics"]["valid"]["hr@1"] - one["metrics"]["valid"]["hr@1"]) <= 0.02


@pytest.mark.slow
def test_a_step_budget_cycles_epochs_and_keeps_the_best_valid_weights(samples_dir, tmp_path):
    """``max_steps`` counts optimiser steps whatever the data size: 2,000 samples in batches of 512
    are 4 steps an epoch, so 40 steps are 10 epochs. Evaluated every 4 steps, the oracle keeps the
    weights of the best valid NDCG@5 along the way, not the last ones: the saved oracle scores the
    valid split exactly as the best evaluation did."""
    cfg = dataclasses.replace(SHORT, max_samples=2000, max_steps=40, eval_every=4, learning_rate=1e-2)
    manifest = train_oracle(samples_dir, cfg, tmp_path / "oracle")
    history = manifest["valid_history"]
    assert manifest["steps"] == 40 and len(manifest["loss_per_epoch"]) == 10
    assert [h["step"] for h in history] == list(range(4, 41, 4))
    best = max(history, key=lambda h: h["ndcg@5"])
    assert manifest["best_step"] == best["step"]
    assert manifest["metrics"]["valid"]["ndcg@5"] == pytest.approx(best["ndcg@5"], abs=1e-9)
    assert manifest["metrics"]["valid"]["hr@1"] == pytest.approx(best["hr@1"], abs=1e-9)
