"""The SFT stage and the shared training loop (`rosepo.train.loop`).

Fast tests pin the loop's pure parts (data order, schedule, DeepSpeed config, loss) with
hand-computed values. Slow tests run the real Ray Train + DeepSpeed loop on 2 CPU workers:
the loss falls, ZeRO-2 and ZeRO-3 agree, a paused-and-resumed run reproduces an unbroken one (so
does a run whose worker is SIGKILLed),
1 worker with gradient accumulation 2 matches 2 workers, and the export generates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from rosepo.config import ModelConfig, RunConfig, SFTConfig, load_config
from rosepo.errors import ConfigError
from rosepo.train import loop, zero_config
from rosepo.train.sft import SFTTask
from tests.conftest import REPO

# ---------------------------------------------------------------- pure helpers


def test_step_rows_read_each_epoch_once_and_straddle_epochs():
    """N=10, G=4: steps 0-4 read stream rows 0-19, i.e. two whole permutations; step 2 takes
    the last 2 rows of epoch 0 and the first 2 of epoch 1."""
    rows = [loop.step_rows(s, 10, 4, seed=7) for s in range(5)]
    stream = sum(rows, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # epochs are shuffled differently
    assert rows[2] == stream[8:12]
    assert loop.step_rows(3, 10, 4, seed=7) == rows[3]  # a function of the step alone
    assert loop.step_rows(0, 10, 4, seed=8) != rows[0]


def test_worker_micro_batches_match_gradient_accumulation():
    """Step rows [0..7]: 2 workers x accum 1 x micro 4 and 1 worker x accum 2 x micro 4 cut the
    same micro-batches; worker 1 of 2 with micro 2, accum 2 takes rows 4-7."""
    rows = list(range(8))
    two = loop.worker_micro_batches(rows, 0, 4, 1) + loop.worker_micro_batches(rows, 1, 4, 1)
    assert two == loop.worker_micro_batches(rows, 0, 4, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loop.worker_micro_batches(rows, 1, 2, 2) == [[4, 5], [6, 7]]


def test_lr_factor_warmup_then_cosine():
    """total 10, warmup 2: 0, 1/2 while warming; then 0.5(1 + cos(pi (s-2)/8)): 1 at s=2,
    0.5 at s=6, 0 at s=10."""
    assert [loop.lr_factor(s, 10, 2) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert loop.lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert loop.lr_factor(4, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert loop.lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert loop.lr_factor(0, 10, 0) == 1.0


def test_total_steps():
    """96 rows, global batch 8: 1.5 epochs = ceil(144/8) = 18 steps; max_steps wins when set."""
    assert loop.total_steps(96, 8, 1.5, 0) == 18
    assert loop.total_steps(96, 8, 1.0, 5) == 5
    assert loop.total_steps(5, 8, 1.0, 0) == 1
    # max_epochs caps max_steps: 2 passes over 96 rows in batches of 8 are 24 steps.
    assert loop.total_steps(96, 8, 1.0, 100, 2.0) == 24
    assert loop.total_steps(96, 8, 1.0, 20, 2.0) == 20
    assert loop.total_steps(96, 8, 1.0, 100, 0.01) == 1
    assert loop.total_steps(96, 8, 1.5, 0, 2.0) == 18  # without max_steps, epochs decide


def test_decoys_take_the_place_of_repeated_passes_only():
    """sft.decoys 3 with a budget of 48,000 rows (1,500 steps of 32): MovieLens-100K's ~75k
    samples are covered once at most, no decoys; 2,515 samples 19 times, 3; 20,000 samples
    2.4 times, 1 (one repeat); exactly one pass, none."""
    from rosepo.train.sft import budget_rows, decoys_for

    assert decoys_for(3, 48_000, 74_731) == 0
    assert decoys_for(3, 48_000, 2_515) == 3
    assert decoys_for(3, 48_000, 20_000) == 1
    assert decoys_for(3, 48_000, 48_000) == 0
    assert decoys_for(0, 48_000, 2_515) == 0 and decoys_for(3, 48_000, 0) == 0
    assert budget_rows(SFTConfig(max_steps=1500, num_workers=2, micro_batch_size=16), 2_515) == 48_000
    assert budget_rows(SFTConfig(max_steps=0, epochs=3.0), 2_515) == 3 * 2_515


def test_for_data_size_raises_the_candidate_weight_where_every_sample_gets_its_decoys():
    """The default's sft section (1,500 steps of 32 rows, 3 decoys, candidate weight 1, 3 where
    each sample gets all 3 decoys): unchanged on MovieLens-100K's 74,731 samples; 1 decoy and
    weight 1 on 20,000 (2.4 passes); 3 decoys and weight 3 on 12,000 (4 passes) and on 2,515.
    Without repeat_candidate_weight the weight stays; without decoys too."""
    from rosepo.train.sft import for_data_size

    cfg = load_config(REPO / "configs" / "ml100k-tiny.yaml").sft
    assert (cfg.decoys, cfg.candidate_weight, cfg.repeat_candidate_weight) == (3, 1.0, 3.0)
    assert for_data_size(cfg, 74_731) == dataclasses.replace(cfg, decoys=0)
    assert for_data_size(cfg, 20_000) == dataclasses.replace(cfg, decoys=1)
    for n in (12_000, 2_515):
        assert for_data_size(cfg, n) == dataclasses.replace(cfg, candidate_weight=3.0), n
    assert for_data_size(cfg, 12_001) == dataclasses.replace(cfg, decoys=2)
    assert for_data_size(dataclasses.replace(cfg, repeat_candidate_weight=0.0), 2_515).candidate_weight == 1.0
    assert for_data_size(dataclasses.replace(cfg, decoys=0), 2_515).candidate_weight == 1.0


def test_deepspeed_config_fills_training_fields_over_the_template():
    cfg = SFTConfig(micro_batch_size=3, grad_accum=2, max_grad_norm=0.5, zero_stage=3)
    ds = loop.deepspeed_config(cfg, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 50000000  # from zero3.json
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_deepspeed_config_offload_follows_the_config_not_the_template():
    template = str(zero_config.DEEPSPEED_DIR / "zero3_offload.json")
    off = loop.deepspeed_config(SFTConfig(deepspeed_config=template, zero_stage=2), bf16=False)
    assert "offload_optimizer" not in off["zero_optimization"]
    assert off["zero_optimization"]["stage"] == 2
    on = loop.deepspeed_config(SFTConfig(zero_stage=3, offload=True), bf16=False)
    assert on["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert on["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert on["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="offload needs zero_stage"):
        loop.deepspeed_config(SFTConfig(zero_stage=0, offload=True), bf16=False)
    with pytest.raises(ConfigError, match="does not exist"):
        loop.deepspeed_config(SFTConfig(deepspeed_config="nope/zero9.json"), bf16=False)


def test_find_latest_checkpoint_picks_the_highest_step(tmp_path):
    for name, step in (("checkpoint_b", 6), ("checkpoint_a", 3), ("checkpoint_c", None)):
        (tmp_path / name).mkdir()
        if step is not None:
            (tmp_path / name / loop.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, not a checkpoint
    assert loop.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_b"
    assert loop.find_latest_checkpoint(tmp_path / "missing") is None


def test_fit_refuses_what_is_not_a_training_task():
    with pytest.raises(ConfigError, match="fit trains a TrainingTask"):
        loop.fit("sft", ModelConfig(), model_path="unused", adapter=None, datasets={}, output_dir=".", run_name="r")
    with pytest.raises(TypeError, match="abstract"):  # a task must implement the interface
        type("Half", (loop.TrainingTask,), {"collate": lambda self, rows, pad_id: {}})()


def test_worker_env_vars():
    """The job's environment says nothing of the device: a GPU worker handed DS_ACCELERATOR=cpu
    would run DeepSpeed's CPU accelerator beside an NCCL process group (each CPU training
    worker sets it for itself). The Makefile exports no device either."""
    from rosepo.runtime import worker_env_vars

    env = worker_env_vars()
    assert "DS_ACCELERATOR" not in env
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert float(env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) <= 0.1
    assert "DS_ACCELERATOR" not in (Path(__file__).resolve().parents[2] / "Makefile").read_text()


def test_token_cross_entropy_hand_computed():
    """One row, vocab 2, labels [-100, 1, 0, -100]. Logits at t predict label t+1:
    t=0 [0, ln3] -> label 1, p = 3/4; t=1 [ln3, 0] -> label 0, p = 3/4; t=2 predicts a -100
    (ignored), t=3 has no next token. Loss = ln(4/3), both argmaxes right: accuracy 1."""
    import torch

    from rosepo.train.sft import token_cross_entropy

    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [ln3, 0.0], [9.0, -9.0], [5.0, 5.0]]])
    loss, acc = token_cross_entropy(logits, torch.tensor([[-100, 1, 0, -100]]))
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert acc.item() == 1.0
    loss, acc = token_cross_entropy(logits, torch.tensor([[-100, 0, 0, -100]]))
    assert loss.item() == pytest.approx((math.log(4) + math.log(4 / 3)) / 2, abs=1e-6)
    assert acc.item() == 0.5


# ---------------------------------------------------------------- end to end (Ray + DeepSpeed)
#
# One reference run (ZeRO-2, 2 workers, 40 steps of 16 rows over 96 samples, ~6.7 epochs) is
# compared with shorter runs of the same config paused by ``stop_at_step``: the learning-rate
# schedule spans the 40 steps in all of them, so their first losses must match the reference.
# The tiny model is random: LoRA alone barely moves it, hence ``lm_head`` in modules_to_save.

STEPS = 40


def _run_cfg(**sft) -> RunConfig:
    base = dict(num_workers=2, micro_batch_size=8, learning_rate=5e-3, warmup_ratio=0.0,
                max_steps=STEPS, tensorboard=False)
    return RunConfig(model=ModelConfig(modules_to_save=("lm_head",)),
                     sft=SFTConfig(**{**base, **sft})).validate()


def _samples_ds(ray_session, rows):
    import pandas as pd

    return ray_session.data.from_pandas(pd.DataFrame(rows))


def _fit(cfg, ray_session, tiny_model_dir, sft_samples, out, run_name, **kw):
    from rosepo.train.loop import fit
    from rosepo.train.sft import sft_dataset

    ds = sft_dataset(cfg, _samples_ds(ray_session, sft_samples), str(tiny_model_dir))
    return fit(SFTTask(cfg.sft), cfg.model, model_path=str(tiny_model_dir), adapter=None,
               datasets={"train": ds}, output_dir=str(out), run_name=run_name, **kw)


def _losses(result) -> list[float]:
    return [h["loss"] for h in result["history"]]


def _export_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sft_dataset_tokenises_and_slices_by_sample_id(ray_session, tiny_model_dir, sft_samples):
    """max_samples=10 keeps the 10 smallest sample ids whatever the input order; rows hold
    prompt + answer + EOS ids with the prompt labelled -100."""
    from rosepo.model.factory import load_tokenizer
    from rosepo.train.sft import sft_dataset

    cfg = _run_cfg(max_samples=10)
    rows = sft_dataset(cfg, _samples_ds(ray_session, sft_samples[::-1]), str(tiny_model_dir)).take_all()
    assert sorted(r["sample_id"] for r in rows) == sorted(r["sample_id"] for r in sft_samples)[:10]
    eos = load_tokenizer(str(tiny_model_dir)).eos_token_id
    for r in rows:
        ids, labels = list(r["input_ids"]), list(r["labels"])
        n_prompt = labels.count(-100)
        assert len(ids) == len(labels) and ids[-1] == eos and n_prompt > 0
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fit_refuses_to_resume_with_another_data_geometry(ray_session, tmp_path):
    """A checkpoint made over 50 rows cannot be resumed over 96: its data position would point
    elsewhere. Refused in the driver, before any worker starts."""
    ckpt = tmp_path / "r" / "checkpoint_2026"
    ckpt.mkdir(parents=True)
    (ckpt / loop.TRAINER_STATE).write_text(json.dumps({"global_step": 3, "num_rows": 50,
                                                        "global_batch": 16, "history": []}))
    cfg = _run_cfg()
    ds = ray_session.data.range(96)
    with pytest.raises(ConfigError, match="cannot resume .* 50 rows"):
        loop.fit(SFTTask(cfg.sft), cfg.model, model_path="unused", adapter=None, datasets={"train": ds},
                 output_dir=str(tmp_path), run_name="r")


@pytest.fixture(scope="module")
def zero2_run(ray_session, tiny_model_dir, sft_samples, tmp_path_factory):
    """The reference: run_sft with 2 workers, ZeRO-2, a checkpoint at step 20 and at the end."""
    from rosepo.train.sft import run_sft

    out = tmp_path_factory.mktemp("sft-z2")
    cfg = _run_cfg(zero_stage=2, tensorboard=True, checkpoint_every=20)
    return out, run_sft(cfg, _samples_ds(ray_session, sft_samples), str(tiny_model_dir), str(out), "z2")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_zero2_loss_falls_and_exports(zero2_run):
    out, result = zero2_run
    losses = _losses(result)
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    m = result["metrics"]
    assert m["step"] == STEPS and m["epoch"] == pytest.approx(STEPS * 16 / 96)
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert m["perf/tokens_per_second"] > 0 and m["perf/samples_per_second"] > 0
    assert 0 <= m["sft/token_accuracy"] <= 1 and m["learning_rate"] > 0
    tensors = _export_tensors(out / "model")
    assert any("lora_A" in k for k in tensors) and any("lm_head" in k for k in tensors)
    assert all(t.numel() > 0 for t in tensors.values())
    assert (out / "model" / "adapter_config.json").is_file()
    assert list((out / "z2" / "tensorboard").glob("events.out.tfevents.*"))
    state = json.loads((Path(result["checkpoint_path"]) / loop.TRAINER_STATE).read_text())
    assert state["global_step"] == STEPS and state["data_position"] == STEPS * 16
    # num_to_keep=2: the step-20 and the final checkpoint
    assert len([d for d in (out / "z2").glob("checkpoint_*") if d.is_dir()]) == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_zero3_matches_zero2_and_exports_gathered_weights(zero2_run, ray_session, tiny_model_dir,
                                                            sft_samples, tmp_path):
    """ZeRO-3 partitions the parameters but computes the same thing: its first 10 losses equal
    ZeRO-2's, and its export (gathered before saving) holds the same non-empty tensors.
    It also evaluates 16 held-out rows before training and every 5 steps (no_grad forwards on
    every rank, which ZeRO-3's collectives need), without changing the training losses."""
    from rosepo.train.loop import fit
    from rosepo.train.sft import sft_dataset

    z2_out, z2 = zero2_run
    cfg = _run_cfg(zero_stage=3)
    train = sft_dataset(cfg, _samples_ds(ray_session, sft_samples), str(tiny_model_dir))
    z3 = fit(SFTTask(cfg.sft, eval_every=5), cfg.model, model_path=str(tiny_model_dir), adapter=None,
             # Materialised here: sorting inside the workers would wait for CPUs they hold.
             datasets={"train": train, "eval": train.sort("sample_id").limit(16).materialize()},
             output_dir=str(tmp_path),
             run_name="z3", stop_at_step=10)
    assert _losses(z3) == pytest.approx(_losses(z2)[:10], abs=1e-4)
    assert [e["step"] for e in z3["eval_history"]] == [0, 5, 10]
    evals = [e["eval/loss"] for e in z3["eval_history"]]
    assert evals[0] == pytest.approx(_losses(z2)[0], abs=0.1)  # the untrained model, other rows
    assert evals[2] < evals[0] and z3["metrics"]["eval/loss"] == evals[2]
    z3_tensors, z2_tensors = _export_tensors(z3["final_model"]), _export_tensors(z2_out / "model")
    assert z3_tensors.keys() == z2_tensors.keys()
    assert all(t.numel() > 0 and t.shape == z2_tensors[k].shape for k, t in z3_tensors.items())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_paused_run_resumes_exactly(zero2_run, ray_session, tiny_model_dir, sft_samples, tmp_path):
    """The reference run paused after step 3, then run again (paused after 6): the second run
    resumes at step 4 (steps 1-3 are not redone, their history comes from the checkpoint) and
    its steps 4-6 reproduce the unbroken run's losses."""
    _, ref = zero2_run
    cfg = _run_cfg()
    b1 = _fit(cfg, ray_session, tiny_model_dir, sft_samples, tmp_path, "b", stop_at_step=3)
    b2 = _fit(cfg, ray_session, tiny_model_dir, sft_samples, tmp_path, "b", stop_at_step=6)
    assert [h["step"] for h in b1["history"]] == [1, 2, 3] and b1["resumed_from_step"] == 0
    assert b2["resumed_from_step"] == 3 and b2["history"][:3] == b1["history"]
    assert [h["step"] for h in b2["history"]] == [1, 2, 3, 4, 5, 6] and b2["metrics"]["step"] == 6
    assert _losses(b2) == pytest.approx(_losses(ref)[:6], abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_worker_with_grad_accum_matches_two_workers(zero2_run, ray_session, tiny_model_dir,
                                                        sft_samples, tmp_path):
    """1 worker x grad_accum 2 reads the same micro-batches per step as 2 workers x 1, and
    DeepSpeed's accumulation (loss / 2) equals its all-reduce mean: the same losses."""
    _, ref = zero2_run
    one = _run_cfg(num_workers=1, grad_accum=2)
    c = _fit(one, ray_session, tiny_model_dir, sft_samples, tmp_path, "c", stop_at_step=3)
    assert _losses(c) == pytest.approx(_losses(ref)[:3], abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exported_adapter_loads_and_generates(zero2_run, tiny_model_dir, sft_samples):
    """The stage's model folder is a PEFT adapter over the base model: it loads with
    AutoModelForCausalLM + PeftModel and greedy-decodes new tokens for a prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = zero2_run
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(out / "model")).eval()
    ids = tokenizer(sft_samples[0]["prompt"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = gen[0, ids["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def test_left_padded_collate_with_logits_to_keep_equals_the_full_right_padded_loss():
    """The SFT batch is left-padded and only the last ``keep`` logits are computed; the loss and
    token accuracy equal those of the plain right-padded forward over every position."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.train import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 4 + [9, 10, 11]},
            {"input_ids": [5, 6, 7, 12, 13], "labels": [-100] * 2 + [7, 12, 13]}]
    batch = sft.collate(rows, 0)
    assert int(batch["keep"]) == 4  # row 1: last prompt token + 3 answer tokens
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 3, 4]
    with torch.no_grad():
        loss, metrics = sft.SFTTask(SFTConfig()).compute_loss(model, batch)
        right = _right_pad(rows, 0)
        logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        full, accuracy = sft.token_cross_entropy(logits, right["labels"])
    assert float(loss) == pytest.approx(float(full), abs=1e-5)
    assert float(metrics["sft/token_accuracy"]) == pytest.approx(float(accuracy))


def test_candidate_mass_logp_hand_computed():
    """Logits [0, ln3, 0, ln2] have softmax weights 1, 3, 1, 2 (sum 7). Candidates starting with
    tokens 1, 3, 3 (token 3 shared by two candidates, counted once) hold mass (3 + 2) / 7."""
    import torch

    from rosepo.train.sft import candidate_mass_logp

    logits = torch.tensor([[0.0, math.log(3), 0.0, math.log(2)]])
    got = candidate_mass_logp(logits, torch.tensor([[1, 3, 3]]))
    assert float(got) == pytest.approx(math.log(5 / 7), abs=1e-6)


def test_candidate_weight_adds_the_candidate_mass_term():
    """With candidate_weight w the loss is the SFT cross-entropy − w · mean log m, m read at the
    logit that predicts each row's first answer token: checked against the right-padded forward
    over every position, on rows whose answers differ in length (so the positions differ)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.train import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 4 + [9, 10, 11],
             "candidate_first_ids": [9, 20, 21]},
            {"input_ids": [5, 6, 7, 12, 13], "labels": [-100] * 3 + [12, 13], "candidate_first_ids": [30, 12, 30]}]
    batch = sft.collate(rows, 0)
    assert batch["first_pos"].tolist() == [0, 1]  # keep 4: row 0 answer of 3 tokens, row 1 of 2
    task = sft.SFTTask(SFTConfig(candidate_weight=0.5))
    with torch.no_grad():
        loss, metrics = task.compute_loss(model, batch)
        right = _right_pad(rows, 0)
        logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        ce, _ = sft.token_cross_entropy(logits, right["labels"])
        # Row 0's first answer token (index 4) is predicted at position 3, row 1's (index 3) at 2.
        first = torch.stack([logits[0, 3], logits[1, 2]])
        log_m = sft.candidate_mass_logp(first, torch.tensor([r["candidate_first_ids"] for r in rows]))
    assert float(loss) == pytest.approx(float(ce - 0.5 * log_m.mean()), abs=1e-5)
    assert float(metrics["sft/candidate_mass"]) == pytest.approx(float(log_m.exp().mean()), abs=1e-6)


def test_a_decoy_row_adds_only_its_candidate_term():
    """A decoy row (a prompt alone, every label -100: `prompt_only`) gives no answer
    cross-entropy; its candidate term is read at the logit after its last prompt token. The loss
    of [row, decoy] is the row's cross-entropy − w · the mean log m of both rows (the right-padded
    forward as the reference); a batch of decoys alone has a zero answer term."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.train import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    row = {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 4 + [9, 10, 11], "candidate_first_ids": [9, 20, 21]}
    decoy = {**sft.prompt_only({"input_ids": [5, 6, 7, 12, 13], "labels": [-100] * 3 + [12, 13]}),
             "candidate_first_ids": [30, 14, 31]}
    assert decoy["input_ids"] == [5, 6, 7] and decoy["labels"] == [-100] * 3
    batch = sft.collate([row, decoy], 0)
    assert batch["first_pos"].tolist() == [0, 3]  # keep 4: the row's 3 answer tokens; the decoy's last logit
    task = sft.SFTTask(SFTConfig(candidate_weight=0.5))
    with torch.no_grad():
        loss, _ = task.compute_loss(model, batch)
        right = _right_pad([row, decoy], 0)
        logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        ce, _ = sft.token_cross_entropy(logits[:1], right["labels"][:1])
        first = torch.stack([logits[0, 3], logits[1, 2]])  # the row's first answer token; after the decoy's prompt
        log_m = sft.candidate_mass_logp(first, torch.tensor([[9, 20, 21], [30, 14, 31]]))
        assert float(loss) == pytest.approx(float(ce - 0.5 * log_m.mean()), abs=1e-5)
        # sft.decoy_weight scales the decoy rows' terms: the mean of (1·log m₀, 3·log m₁).
        weighted = sft.SFTTask(SFTConfig(candidate_weight=0.5, decoy_weight=3.0))
        tagged = sft.collate([{**row, "decoy": False}, {**decoy, "decoy": True}], 0)
        assert float(weighted.compute_loss(model, tagged)[0]) == pytest.approx(
            float(ce - 0.5 * (log_m[0] + 3 * log_m[1]) / 2), abs=1e-5)
        loss, metrics = task.compute_loss(model, sft.collate([decoy], 0))
        assert float(loss) == pytest.approx(float(-0.5 * log_m[1]), abs=1e-5)
        assert float(metrics["sft/token_accuracy"]) == 0.0
    # With the history term a micro-batch of decoys (no history targets) reports the same metric
    # keys as any other: the ranks all-reduce one vector of them, and a shorter one hung a run.
    task = sft.SFTTask(SFTConfig(candidate_weight=0.5, history_weight=1.0))
    keys = []
    for rows in ([{**row, "history_positions": [1, 2]}, {**decoy, "history_positions": []}],
                 [{**decoy, "history_positions": []}]):
        with torch.no_grad():
            keys.append(sorted(task.compute_loss(model, sft.collate(rows, 0))[1]))
    assert keys[0] == keys[1] and "sft/history_loss" in keys[0]


def test_oracle_distillation_hand_computed():
    """Logits [0, ln3, 0, ln2] give p = (1, 3, 1, 2) / 7. Candidates are tokens 1 and 3, the
    oracle's distribution over them q = (1/4, 3/4). Cross-entropy −(¼ ln 3/7 + ¾ ln 2/7); over the
    candidates p renormalises to (3/5, 2/5), so KL = ¼ ln((1/4)/(3/5)) + ¾ ln((3/4)/(2/5))."""
    import torch

    from rosepo.train.sft import oracle_distillation

    logits = torch.tensor([[0.0, math.log(3), 0.0, math.log(2)]])
    q = torch.tensor([[0.25, 0.75]])
    ce, kl = oracle_distillation(logits, torch.tensor([[1, 3]]), q.log())
    assert float(ce) == pytest.approx(-(0.25 * math.log(3 / 7) + 0.75 * math.log(2 / 7)), abs=1e-6)
    assert float(kl) == pytest.approx(0.25 * math.log(0.25 / 0.6) + 0.75 * math.log(0.75 / 0.4), abs=1e-6)
    # Ranking the candidates as the oracle does gives KL 0, whatever mass goes elsewhere (token 0).
    _, kl = oracle_distillation(torch.tensor([[5.0, 0.0, 2.0, math.log(3)]]), torch.tensor([[1, 3]]), q.log())
    assert float(kl) == pytest.approx(0.0, abs=1e-6)


def test_oracle_weight_adds_the_distillation_term():
    """With oracle_weight w the loss is the SFT cross-entropy + w · the mean distillation
    cross-entropy −Σ q_c log p(c), read at the logit that predicts each row's first answer token
    (the right-padded forward as the reference, answers of different lengths)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.train import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    q = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 4 + [9, 10, 11],
             "candidate_first_ids": [9, 20, 21], "oracle_logp": [math.log(x) for x in q[0]]},
            {"input_ids": [5, 6, 7, 12, 13], "labels": [-100] * 3 + [12, 13], "candidate_first_ids": [30, 12, 31],
             "oracle_logp": [math.log(x) for x in q[1]]}]
    task = sft.SFTTask(SFTConfig(oracle_weight=0.7))
    with torch.no_grad():
        loss, metrics = task.compute_loss(model, sft.collate(rows, 0))
        right = _right_pad(rows, 0)
        logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        ce, _ = sft.token_cross_entropy(logits, right["labels"])
        # Row 0's first answer token (index 4) is predicted at position 3, row 1's (index 3) at 2.
        logp = torch.stack([logits[0, 3], logits[1, 2]]).log_softmax(-1)
        distill = [-sum(q[i][c] * float(logp[i, t]) for c, t in enumerate(rows[i]["candidate_first_ids"]))
                   for i in range(2)]
    assert float(loss) == pytest.approx(float(ce) + 0.7 * sum(distill) / 2, abs=1e-5)
    assert "sft/oracle_kl" in metrics and "sft/candidate_mass" not in metrics


def test_tokenize_batch_gives_the_oracles_candidate_distribution(sft_samples, tiny_model_dir, tmp_path):
    """With an oracle folder the UDF adds ``oracle_logp``: the oracle's scores of the row's
    candidates (`Oracle.score`) over the temperature, log-softmaxed; without one, no such column."""
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from rosepo.config import OracleConfig
    from rosepo.pairs.sasrec import ItemVocab, build_model, load_oracle
    from rosepo.train.sft import tokenize_batch

    titles = sorted({r["answer"] for r in sft_samples})
    ids = {t: f"i{k}" for k, t in enumerate(titles)}
    torch.manual_seed(0)
    cfg, vocab = OracleConfig(hidden_size=8, num_layers=1, num_heads=2), ItemVocab(ids.values())
    save_file(build_model(cfg, len(vocab)).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"vocab_size": len(vocab)}))
    vocab.save(tmp_path / "vocab.json")
    rng = np.random.default_rng(0)
    rows = [{"sample_id": r["sample_id"], "prompt": r["prompt"], "answer": r["answer"],
             "history_item_ids": [ids[t] for t in rng.choice(titles, 3)],
             "candidate_titles": (cands := [r["answer"]] + [t for t in titles if t != r["answer"]][:2]),
             "candidate_item_ids": [ids[t] for t in cands]} for r in sft_samples[:6]]
    batch = pd.DataFrame(rows)
    out = tokenize_batch(batch, str(tiny_model_dir), 512, 48, candidates=True, oracle_path=str(tmp_path),
                         oracle_temperature=2.0)
    scores = load_oracle(tmp_path).score([r["history_item_ids"] for r in rows], [r["candidate_item_ids"] for r in rows])
    expected = torch.from_numpy(scores / 2.0).double().log_softmax(-1).numpy()
    np.testing.assert_allclose(np.stack(out["oracle_logp"]), expected, atol=1e-6)
    assert not np.allclose(expected, np.log(1 / 3))  # the oracle does rank: a uniform q would pass trivially
    assert "oracle_logp" not in tokenize_batch(batch, str(tiny_model_dir), 512, 48, candidates=True)


def test_decoys_follow_their_sample_and_tokenise_to_their_prompt(ml100k_samples, tiny_model_dir):
    """`add_decoys` puts each sample's k decoys after it (``decoy`` True), drawn and rendered by
    `decoy_sample` with the samples' own data config; `tokenize_batch` cuts a decoy to its prompt
    (labels all -100, no history targets) and leaves the samples as they were."""
    import pyarrow.parquet as pq

    from rosepo.data.samples import decoy_sample, read_split
    from rosepo.layout import CATALOG_FILE
    from rosepo.model.factory import load_tokenizer
    from rosepo.model.tokenize import encode_prompt
    from rosepo.storage import read_manifest
    from rosepo.train.sft import add_decoys, tokenize_batch

    train = read_split(ml100k_samples, "train").slice(0, 4).to_pandas()
    out = add_decoys(train, str(ml100k_samples), 2)
    assert list(out["decoy"]) == [False, True, True] * 4
    assert list(out["sample_id"][:3]) == [train["sample_id"][0], f"{train['sample_id'][0]}~1",
                                          f"{train['sample_id'][0]}~2"]
    catalog = pq.read_table(ml100k_samples / CATALOG_FILE)
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    data = read_manifest(ml100k_samples)["config"]
    first = {k: list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v
             for k, v in train.iloc[0].to_dict().items()}
    assert out.iloc[2]["prompt"] == decoy_sample(first, list(titles), titles, data["seed"], 2, data["prompt_style"],
                                                 data["domain"])["prompt"]
    # The fixture tokenizer: ML-100K's titles in pieces, the prompts short enough in the list style.
    small = out.iloc[:6].copy()
    small["prompt"] = [p.replace("\n", " ")[:300] for p in small["prompt"]]
    tokens = tokenize_batch(small, str(tiny_model_dir), 512, 48)
    tok = load_tokenizer(str(tiny_model_dir))
    for i, r in tokens.iterrows():
        prompt = encode_prompt(tok, small["prompt"].iloc[i], 512)
        if small["decoy"].iloc[i]:
            assert list(r["input_ids"]) == prompt and list(r["labels"]) == [-100] * len(prompt) and r["decoy"]
        else:
            assert list(r["input_ids"][:len(prompt)]) == prompt and len(r["input_ids"]) > len(prompt)


def _right_pad(rows: list[dict], pad_id: int) -> dict:
    """The plain right-padded batch the left-padded `collate` must agree with."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkilled_worker_is_replaced_and_the_run_resumes_exactly(zero2_run, ray_session, tiny_model_dir,
                                                                  sft_samples, tmp_path, kill_a_worker_midrun):
    """SIGKILL one of the 2 Ray Train workers once Ray registered the step-8 checkpoint: with FailureConfig
    max_failures=1 Ray Train starts a new worker group, which resumes from the last reported
    checkpoint (not step 0), and the run ends at step 40 with the unbroken run's losses."""
    _, ref = zero2_run
    cfg = _run_cfg(checkpoint_every=4, max_failures=1)
    result, killed_at, seconds = kill_a_worker_midrun(
        lambda: _fit(cfg, ray_session, tiny_model_dir, sft_samples, tmp_path, "k"), tmp_path / "k", 8)
    resumed = result["resumed_from_step"]
    print(f"\nSFT worker SIGKILL after checkpoint {killed_at}: resumed from step {resumed}, "
          f"finished {seconds:.1f} s after the kill")
    assert 8 <= killed_at <= resumed < STEPS, "the new worker group did not resume from the last checkpoint"
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert _losses(result) == pytest.approx(_losses(ref), abs=1e-5)


def test_history_weight_adds_next_item_prediction_over_the_history():
    """With history_weight w the loss is the SFT cross-entropy + w · the mean cross-entropy of the
    history targets, each read at the position before it: checked against the right-padded full
    forward, on two rows of different lengths (so their left pads differ)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.train import sft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 4 + [9, 10, 11], "history_positions": [2, 3]},
            {"input_ids": [5, 6, 7, 12, 13], "labels": [-100] * 3 + [12, 13], "history_positions": [1]}]
    batch = sft.collate(rows, 0)
    assert batch["history_targets"].tolist() == [7, 8, 6]
    task = sft.SFTTask(SFTConfig(history_weight=2.0))
    with torch.no_grad():
        loss, metrics = task.compute_loss(model, batch)
        right = _right_pad(rows, 0)
        logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        ce, _ = sft.token_cross_entropy(logits, right["labels"])
        history = F.cross_entropy(torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]), torch.tensor([7, 8, 6]))
    assert float(metrics["sft/history_loss"]) == pytest.approx(float(history), abs=1e-5)
    assert float(loss) == pytest.approx(float(ce + 2.0 * history), abs=1e-5)


@pytest.mark.parametrize("style", ["paraphrase", "list"])
def test_history_title_positions_cover_titles_two_to_n(style):
    """The positions are those of the tokens of history titles 2..n (not the first, nor any
    candidate, even one that repeats a history title), with plain BPE and with title tokens."""
    from rosepo.data.prompts import render_prompt
    from rosepo.model.factory import train_tokenizer
    from rosepo.model.tokenize import encode_prompt, history_title_positions

    history, cands = ["Heat", "Toy Story", "Fargo"], ["Fargo", "Heat and Dust"]
    prompt = render_prompt(0, history, cands, style)
    for titles in ((), history + cands):
        tok = train_tokenizer([prompt] * 5, 300, titles)
        ids = encode_prompt(tok, prompt, 512)
        positions = history_title_positions(tok, prompt, history, len(ids))
        assert tok.decode([ids[i] for i in positions]).replace(" ", "") == "ToyStoryFargo", titles
        assert positions == sorted(positions)
        if titles:
            assert [ids[i] for i in positions] == tok.convert_tokens_to_ids(["Toy Story", "Fargo"])
