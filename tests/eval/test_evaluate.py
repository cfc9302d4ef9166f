"""Evaluation: LLM-free baselines on real ML-100K samples, metric assembly, and a tiny model end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rosepo.config import EvalConfig, ModelConfig, RunConfig
from rosepo.data.popularity import train_popularity
from rosepo.data.samples import read_split
from rosepo.errors import ConfigError
from rosepo.eval.evaluate import EvalScorer, baseline_scores, evaluate_model, evaluate_ranker, score_metrics

SMALL = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024,
                    max_prompt_tokens=1024, max_answer_tokens=64, lora_r=4, lora_alpha=8,
                    lora_target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def popularity(ml100k_samples):
    return train_popularity(ml100k_samples)


def test_random_and_most_popular_baselines_on_ml100k(ml100k_samples, popularity):
    """Random ranks the target uniformly among 20: HR@1 ~ 1/20, HR@10 ~ 1/2 (n ~ 470, sd ~ 0.01
    and 0.023); the most popular candidate is a far better guess on MovieLens."""
    n = len(read_split(ml100k_samples, "valid"))
    rnd = evaluate_ranker(ml100k_samples, "valid",
                          lambda rows: baseline_scores("random", rows, popularity, 0))
    pop = evaluate_ranker(ml100k_samples, "valid",
                          lambda rows: baseline_scores("most_popular", rows, popularity))
    assert rnd["eval/n"] == pop["eval/n"] == n > 400
    assert 0.02 < rnd["eval/rank/hr@1"] < 0.09 and 0.4 < rnd["eval/rank/hr@10"] < 0.6
    # Continuous scores have no ties: the top-1 answer is right exactly when rank 1 is.
    assert rnd["eval/hr@1"] == rnd["eval/rank/hr@1"] == rnd["eval/rank/ndcg@1"]
    assert rnd["eval/valid_ratio"] == pop["eval/valid_ratio"] == 1.0
    assert rnd["eval/hallucination/no_candidate"] == rnd["eval/hallucination/out_of_candidates"] == 0.0
    assert pop["eval/rank/hr@5"] > rnd["eval/rank/hr@5"] + 0.15
    assert pop["eval/pop/percentile_rec"] > rnd["eval/pop/percentile_rec"] + 0.2
    assert pop["eval/pop/percentile_target"] == rnd["eval/pop/percentile_target"]


def test_baseline_scores_by_hand():
    rows = [{"sample_id": "u1:5", "candidate_item_ids": ["a", "b", "c"]},
            {"sample_id": "u2:7", "candidate_item_ids": ["c", "z", "a"]}]
    counts = {"a": 3, "b": 0, "c": 8}
    assert baseline_scores("most_popular", rows, counts).tolist() == [[3, 0, 8], [8, 0, 3]]
    both = baseline_scores("random", rows, counts, seed=1)
    assert both.shape == (2, 3) and ((0 <= both) & (both < 1)).all()
    # Seeded per sample: a row's scores do not depend on the other rows of its batch.
    assert (baseline_scores("random", rows[1:], counts, seed=1) == both[1:]).all()
    assert not (baseline_scores("random", rows, counts, seed=2) == both).any()
    with pytest.raises(ConfigError, match="unknown baseline"):
        baseline_scores("oracle", rows, counts)


def test_score_metrics_hand_computed():
    """Two samples, three candidates each.

    Sample 1 (target b): answer names "Heat", a wrong candidate; scores rank b 2nd.
    Sample 2 (target z): answer names z; scores tie z with x (tie counts against z: rank 2).
    Generation HR@1 = 1/2, valid 2/2. Rank HR@1 = 0, HR@5 = 1; NDCG@5 = 1/log2(3) both.
    Constrained picks [1, 0]: only sample 1 right, HR@1 = 1/2.
    """
    samples = pa.Table.from_pylist([
        {"sample_id": "s1", "candidate_titles": ["Heat", "Fargo", "Alien"],
         "candidate_item_ids": ["a", "b", "c"], "target_item_id": "b"},
        {"sample_id": "s2", "candidate_titles": ["Jaws", "Brazil", "Heat and Dust"],
         "candidate_item_ids": ["x", "y", "z"], "target_item_id": "z"},
    ])
    scores = np.array([[-1.0, -2.0, -3.0], [-1.0, -5.0, -1.0]])
    metrics, rows = score_metrics(samples, ["Heat", "I pick Heat and Dust"], scores, [1, 0],
                                  {"a": 5, "b": 1, "c": 0, "z": 2}, ["Heat", "Fargo", "Alien", "Jaws"])
    assert metrics["eval/hr@1"] == 0.5 and metrics["eval/valid_ratio"] == 1.0
    assert metrics["eval/rank/hr@1"] == 0.0 and metrics["eval/rank/hr@5"] == 1.0
    assert metrics["eval/rank/ndcg@5"] == pytest.approx(1 / math.log2(3))
    assert metrics["eval/constrained/hr@1"] == 0.5
    # Recommended items a (count 5) and z (count 2); catalog counts [0, 1, 2, 5]: percentiles 3/4, 2/4.
    assert metrics["eval/pop/percentile_rec"] == pytest.approx(0.625) and metrics["eval/pop/n"] == 2
    assert rows.column("target_index").to_pylist() == [1, 2]
    assert rows.column("named_index").to_pylist() == [0, 2]
    assert rows.column("correct").to_pylist() == [False, True]
    # "Alien" is in the catalog but not among sample 2's candidates: a hallucinated item.
    plain, _ = score_metrics(samples, ["nothing", "Alien"], scores, None, {"a": 1}, ["Alien"])
    assert "eval/constrained/hr@1" not in plain and plain["eval/hallucination/no_candidate"] == 1.0
    assert plain["eval/hallucination/out_of_candidates"] == 0.5
    assert math.isnan(plain["eval/pop/percentile_rec"])


@pytest.fixture(scope="module")
def tiny_eval_model(ml100k_samples, tmp_path_factory):
    """A tiny untrained Llama whose tokenizer is trained on the valid prompts and titles."""
    from rosepo.model.factory import build_tiny_model

    valid = read_split(ml100k_samples, "valid").slice(0, 200)
    titles = [t for ts in valid.column("candidate_titles").to_pylist() for t in ts]
    texts = valid.column("prompt").to_pylist() + titles
    return build_tiny_model(SMALL, texts, tmp_path_factory.mktemp("tiny-eval") / "model")


@pytest.mark.slow
def test_evaluate_model_end_to_end(ml100k_samples, tiny_eval_model, ray_session, tmp_path):
    """16 valid samples through the actor pool; then the scorer with a zero LoRA adapter.

    LoRA's B matrices start at zero, so the merged model is the base: same scores, same answers.
    """
    import torch

    from rosepo.eval.metrics import ranking_metrics
    from rosepo.model.factory import apply_lora, export_model, load_model, load_tokenizer

    cfg = RunConfig(model=SMALL, eval=EvalConfig(split="valid", max_samples=16, max_new_tokens=8,
                                                 batch_size=8, num_actors=1, constrained=True))
    metrics = evaluate_model(cfg, ml100k_samples, tiny_eval_model, None, tmp_path / "base")
    expected = {"eval/valid_ratio", "eval/hr@1", "eval/hr@1_valid", "eval/hallucination/no_candidate",
                "eval/hallucination/out_of_candidates", "eval/hallucination/out_of_catalog",
                "eval/constrained/hr@1", "eval/pop/percentile_rec",
                "eval/pop/percentile_target", "eval/pop/head_share_rec", "eval/pop/head_share_target",
                "eval/pop/tail_coverage"}
    expected |= {f"eval/rank/{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10)}
    assert set(metrics) == expected | {"eval/n", "eval/pop/n"}
    assert metrics["eval/n"] == 16
    assert all(0 <= metrics[k] <= 1 for k in expected if not math.isnan(metrics[k]))

    rows = pq.read_table(tmp_path / "base" / "answers.parquet")
    want_ids = read_split(ml100k_samples, "valid").column("sample_id").to_pylist()[:16]
    assert rows.column("sample_id").to_pylist() == want_ids
    scores = np.array(rows.column("scores").to_pylist())
    targets = rows.column("target_index").to_pylist()
    assert scores.shape == (16, 20) and (scores < 0).all()
    direct = float(np.mean([s[t] > np.delete(s, t).max() for s, t in zip(scores, targets)]))
    assert metrics["eval/rank/hr@1"] == direct == ranking_metrics(scores, targets)["hr@1"]
    assert all(0 <= i < 20 for i in rows.column("constrained_index").to_pylist())
    on_disk = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert on_disk == {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    assert json.loads((tmp_path / "base" / "manifest.json").read_text())["samples"] == 16

    # The adapter path, without a second actor pool: the scorer itself, base vs base + zero LoRA.
    tok = load_tokenizer(tiny_eval_model)
    lora = apply_lora(load_model(str(tiny_eval_model), dtype=torch.float32), SMALL)
    adapter = export_model(lora, tok, tmp_path / "adapter")
    batch = read_split(ml100k_samples, "valid").slice(0, 4)
    with_adapter = EvalScorer(cfg, str(tiny_eval_model), str(adapter))(batch)
    base = EvalScorer(cfg, str(tiny_eval_model), None)(batch)
    assert np.allclose(with_adapter.column("scores").to_pylist(), scores[:4], atol=1e-4)
    assert np.allclose(base.column("scores").to_pylist(), scores[:4], atol=1e-5)
    assert with_adapter.column("answer").to_pylist() == rows.column("answer").to_pylist()[:4]
