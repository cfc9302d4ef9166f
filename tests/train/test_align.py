"""RosePO alignment on real MovieLens-100K pairs: the align task and the shared loop.

The pairs come from the real pipeline pieces on a slice of ML-100K: a tiny model whose tokenizer is
trained on the samples' prompts (standing in for the SFT model: pairs are scored by it), a SASRec
oracle trained for one epoch, and the pair builder on Ray Data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rosepo.config import AlignConfig, ModelConfig, OracleConfig, PairsConfig, RunConfig

STEPS = 8


def _cfg(**align) -> RunConfig:
    base = dict(num_workers=2, zero_stage=2, micro_batch_size=4, learning_rate=2e-3, warmup_ratio=0.0,
                max_steps=STEPS, tensorboard=False, finetune="lora", beta=0.5)
    return RunConfig(model=ModelConfig(lora_r=8, lora_alpha=16),
                     pairs=PairsConfig(embedder="tfidf", num_actors=1, batch_size=16, eval_samples=16),
                     align=AlignConfig(**{**base, **align})).validate()


@pytest.fixture(scope="session")
def ml100k_pairs(ml100k_samples, tmp_path_factory):
    """(base model dir, pairs dir) built from the real samples (48 train, 16 valid samples)."""
    from rosepo.data.samples import read_split
    from rosepo.model.factory import build_tiny_model
    from rosepo.pairs.build import build_pairs
    from rosepo.pairs.oracle import train_oracle

    root = tmp_path_factory.mktemp("align")
    train = read_split(ml100k_samples, "train")
    texts = train.column("prompt").to_pylist()[::40] + train.column("answer").to_pylist()[::10]
    model = build_tiny_model(_cfg().model, texts, root / "model")
    oracle = root / "oracle"
    train_oracle(ml100k_samples, OracleConfig(epochs=1, max_samples=3000), oracle)
    pairs = root / "pairs"
    build_pairs(_cfg(), ml100k_samples, str(model), None, oracle, pairs, splits={"train": 48, "valid": 16})
    return model, pairs


def _fit(cfg, model, pairs, out, run_name, **kw):
    import ray

    from rosepo.layout import read_pairs
    from rosepo.model.factory import load_tokenizer
    from rosepo.train.align import AlignTask
    from rosepo.train.loop import fit

    datasets = {"train": ray.data.from_arrow(read_pairs(pairs, "train")),
                "eval": ray.data.from_arrow(read_pairs(pairs, "valid"))}
    task = AlignTask(dataclasses.replace(cfg.align, eval_every=4), cfg.model, load_tokenizer(str(model)).pad_token_id)
    return fit(task, cfg.model, model_path=str(model), adapter=None, datasets=datasets,
               output_dir=str(out), run_name=run_name, **kw)


def test_pair_invariants(ml100k_pairs, ml100k_samples):
    """Every rejected item is a candidate of its prompt and never the target; ids and reference
    log-probs line up with the chosen/rejected titles."""
    from rosepo.data.samples import read_split
    from rosepo.layout import read_pairs

    _, pairs = ml100k_pairs
    samples = {r["sample_id"]: r for r in read_split(ml100k_samples, "train").to_pylist()}
    rows = read_pairs(pairs, "train").to_pylist()
    assert len(rows) == 48 and {r["strategy"] for r in rows} <= {"self_hard", "semantic", "popularity"}
    for r in rows:
        s = samples[r["sample_id"]]
        assert r["chosen"] == s["target_title"] == s["candidate_titles"][r["chosen_index"]]
        assert all(s["candidate_titles"][i] == t for i, t in zip(r["rejected_index"], r["rejected"]))
        assert r["chosen_index"] not in r["rejected_index"] and s["target_title"] not in r["rejected"]
        assert len(r["rejected_ids"]) == len(r["ref_rejected_logp"]) == len(r["oracle_rejected"]) == 1


def test_strategies_pick_their_argmax(ml100k_pairs, ml100k_samples):
    """self_hard = argmax of the model's candidate scores (recomputed directly with the model),
    popularity = max train count, semantic = max similarity (recomputed); reference log-probs
    equal a direct computation with the reference model."""
    import torch

    from rosepo.data.popularity import train_popularity
    from rosepo.data.samples import length_batches, read_split
    from rosepo.layout import CATALOG_FILE, read_pairs
    from rosepo.model.factory import load_model, load_tokenizer
    from rosepo.model.logprobs import answer_logps
    from rosepo.model.tokenize import encode_answer, encode_prompt
    from rosepo.pairs.embed import history_similarity, tfidf_embed

    model_dir, pairs = ml100k_pairs
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    train = read_split(ml100k_samples, "train")
    samples = {r["sample_id"]: r for r in train.to_pylist()}
    popularity = train_popularity(ml100k_samples)
    rows = read_pairs(pairs, "train").to_pylist()
    corpus = pq.read_table(Path(ml100k_samples) / CATALOG_FILE, columns=["title"]).column("title").to_pylist()
    # The builder scores the samples in its batches (by prompt length, 16 each): recomputed so, the
    # scores agree to float32 rounding (near-ties aside, the argmax is the same candidate).
    ids = {r["sample_id"] for r in rows}
    chosen = train.filter(pa.array([i in ids for i in train.column("sample_id").to_pylist()]))
    all_scores = {}
    with torch.no_grad():
        for batch in length_batches(chosen, 16):
            logps, _ = answer_logps(model, [encode_prompt(tok, p, 512) for p in batch.column("prompt").to_pylist()],
                                    [[encode_answer(tok, t, 48) for t in ts]
                                     for ts in batch.column("candidate_titles").to_pylist()],
                                    prefix_sharing=True, pad_id=tok.pad_token_id)
            all_scores.update(zip(batch.column("sample_id").to_pylist(), logps.double().numpy()))
    checked = set()
    for r in rows:
        s = samples[r["sample_id"]]
        target = r["chosen_index"]
        wrong = [i for i in range(20) if i != target]
        if r["strategy"] == "self_hard":
            scores = all_scores[r["sample_id"]]
            assert scores[r["rejected_index"][0]] >= max(scores[i] for i in wrong) - 1e-5
            assert r["ref_chosen_logp"] == pytest.approx(float(scores[target]), abs=1e-5)
            assert r["ref_rejected_logp"][0] == pytest.approx(float(scores[r["rejected_index"][0]]), abs=1e-5)
        elif r["strategy"] == "popularity":
            counts = [popularity.get(i, 0) for i in s["candidate_item_ids"]]
            assert counts[r["rejected_index"][0]] == max(counts[i] for i in wrong)
        elif r["strategy"] == "semantic":
            # the builder's TF-IDF takes its IDF from the whole catalogue the samples stage wrote
            titles = sorted(set(s["history_titles"]) | set(s["candidate_titles"]))
            vec = dict(zip(titles, tfidf_embed(titles, corpus=corpus)))
            sim = history_similarity(np.stack([vec[t] for t in s["history_titles"]]),
                                     np.stack([vec[t] for t in s["candidate_titles"]]))
            assert sim[r["rejected_index"][0]] >= max(sim[i] for i in wrong) - 1e-6
        checked.add(r["strategy"])
    assert checked == {"self_hard", "semantic", "popularity"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pairs_same_hash_for_any_actor_count_and_rounding_for_another_batch_size(ml100k_pairs, ml100k_samples,
                                                                               tmp_path):
    """The pair build gives the content hash of the fixture's build (1 actor, batches of 16) on 2 Ray
    Data actors: the driver cuts the batches (by prompt length), so which samples share a forward
    does not depend on the actors. Batches of another size (8) pad differently, which moves the
    reference log-probs in the last bits only (< 1e-4)."""
    from rosepo.layout import read_pairs
    from rosepo.pairs.build import build_pairs
    from rosepo.storage import read_manifest

    model_dir, pairs = ml100k_pairs
    expected = read_manifest(pairs)["splits"]
    for num_actors, batch_size in ((2, 16), (1, 8)):
        cfg = dataclasses.replace(_cfg(), pairs=dataclasses.replace(_cfg().pairs, num_actors=num_actors,
                                                                   batch_size=batch_size))
        out = tmp_path / f"p{num_actors}-{batch_size}"
        m = build_pairs(cfg, ml100k_samples, str(model_dir), None, pairs.parent / "oracle", out,
                        splits={"train": 48, "valid": 16})
        if batch_size == 16:
            assert {s: v["content_hash"] for s, v in m["splits"].items()} == \
                {s: v["content_hash"] for s, v in expected.items()}
        else:
            ours, theirs = read_pairs(out, "train"), read_pairs(pairs, "train")
            diff = np.abs(np.array(ours.column("ref_chosen_logp").to_pylist())
                          - np.array(theirs.column("ref_chosen_logp").to_pylist()))
            assert diff.max() < 1e-4


def test_pairs_exclude_the_sft_slice(ml100k_pairs, ml100k_samples, tmp_path):
    """With ``exclude_train`` (the sft stage's slice, ``pairs.exclude_sft``) the train pairs come
    from the other samples only: the same seeded slice of what is left, none of the excluded ids;
    the valid pairs are untouched. Excluding every train sample is a DataError naming the remedy."""
    from rosepo.data.samples import read_split, select_samples
    from rosepo.errors import DataError
    from rosepo.layout import read_pairs
    from rosepo.pairs.build import build_pairs
    from rosepo.storage import read_manifest

    model_dir, pairs = ml100k_pairs
    seen = set(read_pairs(pairs, "train").column("sample_id").to_pylist())
    assert len(seen) == 48
    m = build_pairs(_cfg(), ml100k_samples, str(model_dir), None, pairs.parent / "oracle", tmp_path / "p",
                    splits={"train": 48, "valid": 16}, exclude_train=seen)
    drawn = set(read_pairs(tmp_path / "p", "train").column("sample_id").to_pylist())
    train = read_split(ml100k_samples, "train")
    rest = train.filter([i not in seen for i in train.column("sample_id").to_pylist()])
    assert len(drawn) == 48 and not drawn & seen
    assert drawn == set(select_samples(rest, 48, _cfg().pairs.seed).column("sample_id").to_pylist())
    assert m["excluded_train_samples"] == 48
    assert m["splits"]["valid"]["content_hash"] == read_manifest(pairs)["splits"]["valid"]["content_hash"]
    everything = set(train.column("sample_id").to_pylist())
    with pytest.raises(DataError, match="none is left for pairs.exclude_sft; lower sft.max_samples"):
        build_pairs(_cfg(), ml100k_samples, str(model_dir), None, pairs.parent / "oracle", tmp_path / "q",
                    splits={"train": 48, "valid": 16}, exclude_train=everything)
    assert not (tmp_path / "q").exists()


def test_batched_scores_differ_only_in_rounding(ml100k_pairs, ml100k_samples):
    """Scoring all train samples in one padded batch, or each alone, moves the reference log-probs
    by rounding only (< 1e-4): the builder's (batches of 16) are the per-sample ones up to float32
    noise."""
    import torch

    from rosepo.data.samples import read_split
    from rosepo.layout import read_pairs
    from rosepo.model.factory import load_model, load_tokenizer
    from rosepo.model.logprobs import answer_logps
    from rosepo.model.tokenize import encode_answer, encode_prompt

    model_dir, pairs = ml100k_pairs
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    samples = {r["sample_id"]: r for r in read_split(ml100k_samples, "train").to_pylist()}
    rows = read_pairs(pairs, "train").to_pylist()
    prompts = [encode_prompt(tok, samples[r["sample_id"]]["prompt"], 512) for r in rows]
    cands = [[encode_answer(tok, t, 48) for t in r["candidate_titles"]] for r in rows]
    with torch.no_grad():
        batched = answer_logps(model, prompts, cands, prefix_sharing=True, pad_id=tok.pad_token_id)[0].double()
        alone = torch.stack([answer_logps(model, [p], [c], prefix_sharing=True, pad_id=tok.pad_token_id)[0][0]
                             for p, c in zip(prompts, cands)]).double()
    stored = torch.tensor([r["ref_chosen_logp"] for r in rows], dtype=torch.float64)
    chosen = torch.tensor([r["chosen_index"] for r in rows])
    assert float((stored - alone[torch.arange(len(rows)), chosen]).abs().max()) < 1e-4
    assert float((batched - alone).abs().max()) < 1e-4


def test_online_reference_equals_precomputed(ml100k_pairs):
    """A fresh LoRA on the SFT model, disabled, is the SFT model: online reference log-probs equal
    the precomputed ones in the pair rows, so the first-step losses agree."""
    import torch

    from rosepo.layout import read_pairs
    from rosepo.model.factory import apply_lora, load_model
    from rosepo.train import align

    model_dir, pairs = ml100k_pairs
    cfg = _cfg()
    model = apply_lora(load_model(str(model_dir), dtype=torch.float32), cfg.align.model_config(cfg.model)).eval()
    rows = read_pairs(pairs, "train").to_pylist()[:6]
    batch = align.collate(rows, 3)
    online_cfg = dataclasses.replace(cfg.align, reference="online")
    online = align.reference_logps(model, batch, online_cfg, 3)
    pre = align.reference_logps(model, batch, cfg.align, 3)
    np.testing.assert_allclose(online.numpy(), pre.numpy(), atol=2e-3)
    with torch.no_grad():
        l_on, _ = align.AlignTask(online_cfg, cfg.model, 3).compute_loss(model, batch)
        l_pre, _ = align.AlignTask(cfg.align, cfg.model, 3).compute_loss(model, batch)
    assert float(l_on) == pytest.approx(float(l_pre), abs=1e-3)


def test_candidate_weight_adds_the_candidate_mass_of_the_first_answer_token(ml100k_pairs):
    """With align.candidate_weight w the loss is the preference loss − w · mean log m, m the mass
    of the first answer token on the candidates' first tokens (shared ones counted once): m
    checked against the full softmax of a plain forward of each prompt (`sft.candidate_mass_logp`)."""
    import torch

    from rosepo.layout import read_pairs
    from rosepo.model.factory import apply_lora, load_model, load_tokenizer
    from rosepo.train import align, sft

    model_dir, pairs = ml100k_pairs
    cfg = _cfg()
    tok = load_tokenizer(str(model_dir))
    model = apply_lora(load_model(str(model_dir), dtype=torch.float32), cfg.align.model_config(cfg.model)).eval()
    table = align.with_candidate_first_ids(read_pairs(pairs, "train").slice(0, 6), tok, 48)
    rows = table.to_pylist()
    assert any(len(set(r["candidate_first_ids"])) < 20 for r in rows)  # BPE titles share first tokens
    batch = align.collate(rows, tok.pad_token_id)
    with_term = dataclasses.replace(cfg.align, candidate_weight=0.5)
    with torch.no_grad():
        plain, plain_metrics = align.AlignTask(cfg.align, cfg.model, tok.pad_token_id).compute_loss(model, batch)
        loss, metrics = align.AlignTask(with_term, cfg.model, tok.pad_token_id).compute_loss(model, batch)
        first = torch.stack([model(input_ids=torch.tensor([r["prompt_ids"]])).logits[0, -1] for r in rows])
        log_m = sft.candidate_mass_logp(first, batch["candidate_first_ids"])
    assert float(loss) == pytest.approx(float(plain - 0.5 * log_m.mean()), abs=1e-5)
    assert float(metrics["candidate_mass"]) == pytest.approx(float(log_m.exp().mean()), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(float(plain_metrics["rewards/margins"]), abs=1e-6)


def test_eps_enters_the_loss(ml100k_pairs):
    """On the same batch with the policy moved off the reference, RosePO's loss differs from DPO's
    and equals the hand formula −[(1−ε)log σ(βh) + ε log σ(−βh)] with the batch's ε."""
    import torch
    import torch.nn.functional as F

    from rosepo.train import align

    _, pairs = ml100k_pairs
    from rosepo.layout import read_pairs

    rows = read_pairs(pairs, "train").to_pylist()[:8]
    batch = align.collate(rows, 3)
    policy = batch["ref"] + torch.tensor([[0.4, -0.3]]).repeat(len(rows), 1)
    counts = torch.ones_like(policy)
    d = _cfg().align
    eps = align.pair_eps(batch["oracle"], d)
    assert float(eps.max()) > 0
    rosepo, m = align.loss_and_metrics(policy, batch["ref"], counts, eps, d)
    dpo_cfg = dataclasses.replace(d, loss="dpo")
    dpo, _ = align.loss_and_metrics(policy, batch["ref"], counts, align.pair_eps(batch["oracle"], dpo_cfg), dpo_cfg)
    z = torch.tensor(0.5 * 0.7)  # β·h, h = 0.4 − (−0.3)
    expected = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    assert float(rosepo) == pytest.approx(float(expected), abs=1e-5)
    assert float(dpo) == pytest.approx(float(-F.logsigmoid(z)), abs=1e-5) and float(rosepo) != pytest.approx(float(dpo))
    assert m["rewards/margins"] == pytest.approx(0.35, abs=1e-5) and m["rewards/accuracies"] == 1.0


@pytest.fixture(scope="module")
def rosepo_run(ml100k_pairs, tmp_path_factory):
    model, pairs = ml100k_pairs
    out = tmp_path_factory.mktemp("align-run")
    return _fit(_cfg(checkpoint_every=4), model, pairs, out, "rosepo")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rosepo_trains_with_zero2_on_two_workers(rosepo_run):
    """Held-out rewards/accuracies rise above their start (policy = reference), train margins turn
    positive, the DPO metric
    names are reported, and ε is in the batch."""
    ev = rosepo_run["eval_history"]
    assert [e["step"] for e in ev] == [0, 4, 8]
    # at step 0 policy = reference: the rewards are 0 up to float32 rounding (the pairs were scored in
    # batches of other shapes), so their accuracy is a coin flip on that noise, and the loss log 2
    assert abs(ev[0]["eval/rewards/margins"]) < 1e-5 and abs(ev[0]["eval/loss"] - np.log(2)) < 1e-4
    assert rosepo_run["metrics"]["rewards/margins"] > 0  # the train pairs are being separated
    m = rosepo_run["metrics"]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "smoothing/eps_mean", "perf/tokens_per_second"):
        assert np.isfinite(m[key]), key
    assert 0 < m["smoothing/eps_mean"] <= 0.3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_trajectory_differs_and_resume_is_exact(rosepo_run, ml100k_pairs, tmp_path):
    """A paused RosePO run resumed reproduces the unbroken run's losses; DPO on the same pairs
    starts at the same loss (log 2: policy = reference) and then differs (ε enters the gradient)."""
    model, pairs = ml100k_pairs
    ref = [h["loss"] for h in rosepo_run["history"]]
    _fit(_cfg(checkpoint_every=4), model, pairs, tmp_path, "paused", stop_at_step=2)
    resumed = _fit(_cfg(checkpoint_every=4), model, pairs, tmp_path, "paused", stop_at_step=4)
    assert resumed["resumed_from_step"] == 2
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(ref[:4], abs=1e-5)
    dpo = _fit(_cfg(loss="dpo"), model, pairs, tmp_path, "dpo", stop_at_step=3)
    d = [h["loss"] for h in dpo["history"]]
    assert d[0] == pytest.approx(np.log(2), abs=1e-4) and ref[0] == pytest.approx(np.log(2), abs=1e-4)
    assert abs(d[2] - ref[2]) > 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkilled_worker_is_replaced_and_rosepo_resumes_exactly(rosepo_run, ml100k_pairs, tmp_path,
                                                                 kill_a_worker_midrun):
    """RosePO with max_failures=1: SIGKILL one of the 2 workers after the step-2 checkpoint;
    the new worker group resumes from a checkpoint (not step 0) and the run ends at step 8 with
    the unbroken run's losses."""
    model, pairs = ml100k_pairs
    cfg = _cfg(checkpoint_every=2, max_failures=1)
    result, killed_at, seconds = kill_a_worker_midrun(
        lambda: _fit(cfg, model, pairs, tmp_path, "killed"), tmp_path / "killed", 2)
    resumed = result["resumed_from_step"]
    print(f"\nRosePO worker SIGKILL after checkpoint {killed_at}: resumed from step {resumed}, "
          f"finished {seconds:.1f} s after the kill")
    assert 2 <= killed_at <= resumed < STEPS, "the new worker group did not resume from the last checkpoint"
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in result["history"]] == pytest.approx([h["loss"] for h in rosepo_run["history"]],
                                                                    abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_non_finite_loss_stops_the_run_naming_the_batch(ml100k_pairs, tmp_path, monkeypatch):
    """One pair whose reference log-prob is NaN (a bad row) makes its batch's loss NaN: the run stops
    at that step with one `TrainingError` naming the stage, the step and the pair, raised in the
    driver as rosepo's own error (not Ray's), without the retries `max_failures` allows for a
    worker that dies (they would fail again on the same batch); the checkpoints before it stay,
    none is written after."""
    import pyarrow.compute as pc
    import ray

    from rosepo.errors import TrainingError
    from rosepo.layout import read_pairs
    from rosepo.model.factory import load_tokenizer
    from rosepo.train.align import AlignTask
    from rosepo.train import loop
    from rosepo.train.schedule import find_latest_checkpoint, step_rows, worker_micro_batches

    model, pairs = ml100k_pairs
    cfg = _cfg(checkpoint_every=2, max_failures=2)
    table = read_pairs(pairs, "train").sort_by("pair_id")
    geometry = cfg.align.num_workers * cfg.align.micro_batch_size
    bad_step = 4  # the first pair of rank 0's micro-batch at step 4 (1-based) goes bad
    bad_index = worker_micro_batches(step_rows(bad_step - 1, len(table), geometry, cfg.align.seed), 0,
                                     cfg.align.micro_batch_size, 1)[0][0]
    bad_id = table.column("pair_id")[bad_index].as_py()
    ref = pc.if_else(pc.equal(table.column("pair_id"), bad_id), float("nan"), table.column("ref_chosen_logp"))
    table = table.set_column(table.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp", ref)
    task = AlignTask(cfg.align, cfg.model, load_tokenizer(str(model)).pad_token_id)

    def failed_through_ray(error):
        raise AssertionError(f"the run failed through Ray Train's failure handling: {error}")

    monkeypatch.setattr(loop, "worker_error", failed_through_ray)
    with pytest.raises(TrainingError) as e:
        loop.fit(task, cfg.model, model_path=str(model), adapter=None,
                 datasets={"train": ray.data.from_arrow(table)}, output_dir=str(tmp_path), run_name="nan")
    assert f"align: non-finite loss at step {bad_step}; the batch: pair_id " in str(e.value)
    assert bad_id in str(e.value)
    latest = find_latest_checkpoint(tmp_path / "nan")
    assert latest is not None and "global_step\": 2" in (latest / "trainer_state.json").read_text()


def _step0_margins(pairs_dir, model, cfg, dtype):
    """|policy margin - reference margin| of every train pair at step 0: the policy is the SFT model
    (here the fixture's model) with a fresh LoRA, as the align stage starts it, in ``dtype``."""
    import torch

    from rosepo.layout import read_pairs
    from rosepo.model.factory import apply_lora, load_model
    from rosepo.train import align

    policy = apply_lora(load_model(str(model), dtype=dtype), cfg.align.model_config(cfg.model)).eval()
    rows = read_pairs(pairs_dir, "train").to_pylist()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), cfg.align.micro_batch_size):
            batch = align.collate(rows[i:i + cfg.align.micro_batch_size], 3)
            logps, _ = align.pair_logps(policy, batch, cfg.align, 3)
            out.append(((logps[:, 0].float() - batch["ref"][:, 0]) - (logps[:, 1].float() - batch["ref"][:, 1])).abs())
    return torch.cat(out).numpy()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reference_logps_give_a_zero_margin_at_step_0_in_float32_and_bfloat16(ml100k_pairs, ml100k_samples, tmp_path):
    """The pairs' reference log-probs are scored as the policy computes at its first step (adapter
    unmerged, the training dtype), so the step-0 margin is zero up to that dtype's rounding: 1e-6 in
    float32 (batches of other shapes round differently), 1.6e-4 on average in bfloat16, where a
    reference scored in float32 with the adapter merged (as before) was 3.0e-3 off the bfloat16 policy."""
    import torch

    from rosepo.pairs.build import build_pairs

    model, pairs = ml100k_pairs
    assert _step0_margins(pairs, model, _cfg(), torch.float32).max() < 1e-4
    bf16 = dataclasses.replace(_cfg(), model=dataclasses.replace(_cfg().model, dtype="bfloat16"))
    build_pairs(bf16, ml100k_samples, str(model), None, pairs.parent / "oracle", tmp_path / "p", splits={"train": 24})
    margins = _step0_margins(tmp_path / "p", model, bf16, torch.bfloat16)
    assert margins.mean() < 1e-3 and margins.max() < 1e-2, margins


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_label_noise_flips_a_seeded_share_of_the_train_pairs_only(ml100k_pairs, ml100k_samples, tmp_path):
    """``pairs.label_noise: 0.25`` swaps chosen and rejected (with their scores and ids) in 12 of the
    48 train pairs, recorded per pair and in the manifest; the held-out pairs stay clean."""
    from rosepo.layout import read_pairs
    from rosepo.pairs.build import build_pairs
    from rosepo.pairs.noise import SWAPPED

    model, pairs = ml100k_pairs
    cfg = _cfg()
    noisy = dataclasses.replace(cfg, pairs=dataclasses.replace(cfg.pairs, label_noise=0.25))
    m = build_pairs(noisy, ml100k_samples, str(model), None, pairs.parent / "oracle", tmp_path / "p",
                    splits={"train": 48, "valid": 16})
    assert m["splits"]["train"]["flipped"] == 12 and m["splits"]["valid"]["flipped"] == 0
    clean = {r["pair_id"]: r for r in read_pairs(pairs, "train").to_pylist()}
    for r in read_pairs(tmp_path / "p", "train").to_pylist():
        c = clean[r["pair_id"]]
        if not r["flipped"]:
            assert r == c
            continue
        for one, many in SWAPPED:
            assert r[one] == c[many][0] and r[many][0] == c[one], one
    assert read_pairs(tmp_path / "p", "valid").to_pylist() == read_pairs(pairs, "valid").to_pylist()
    assert set(m["splits"]["train"]["false_negatives"]) <= {"self_hard", "semantic", "popularity"}
