"""The training loop's console and TensorBoard output (`rosepo.train.loop`): the metrics line,
how often it is printed, the progress lines of a console that is no terminal, the scalars' tags."""

from __future__ import annotations

import logging
import struct

from rosepo.train.loop import LineProgress, _log_scalars, _tensorboard, logging_interval, metrics_line


def test_metrics_line_reads_like_hf_trainer():
    """HF's Trainer prints ``{'loss': ..., 'grad_norm': ..., 'learning_rate': ..., 'epoch': ...}``:
    the loss is the mean of the steps since the last line ((0.4 + 0.6 + 0.5) / 3 = 0.5, not the
    step's 0.45), the task's metrics follow sorted, 4 significant digits, the epoch at 2 decimals;
    throughput and the step number stay in TensorBoard."""
    metrics = {"loss": 0.45, "grad_norm": 1.23456, "learning_rate": 5e-4, "sft/token_accuracy": 0.25,
               "eval/loss": 2.345678, "perf/tokens_per_second": 1000.0, "step": 30, "epoch": 0.123456}
    assert metrics_line(metrics, [0.4, 0.6, 0.5]) == (
        "{'loss': 0.5, 'grad_norm': 1.235, 'learning_rate': 0.0005, 'eval/loss': 2.346, "
        "'sft/token_accuracy': 0.25, 'epoch': 0.12}")


def test_training_flops_per_token_counts_the_weights_that_run():
    """A Llama of hidden 8, 2 layers, vocabulary 50, tied embeddings: the 400 embedding weights are a
    lookup (and the LM head, answer positions only), and stay out. Full fine-tuning: 6 FLOPs per other weight and token
    (forward, activations' and weights' gradients); LoRA: 4 per frozen weight plus 6 per adapter
    weight."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rosepo.config import ModelConfig
    from rosepo.model.factory import apply_lora
    from rosepo.train.loop import training_flops_per_token

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    weights = sum(p.numel() for p in model.parameters()) - 50 * 8
    assert training_flops_per_token(model, "full") == 6 * weights
    lora = apply_lora(model, ModelConfig(lora_r=2, lora_target_modules=("q_proj",)))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert adapters == 2 * (8 * 2 + 2 * 8)  # 2 layers x (A: 8->2, B: 2->8)
    assert training_flops_per_token(lora, "lora") == 4 * (weights + adapters) + 2 * adapters
    # Untied: the LM head's 400 weights stay out too (it runs on the answer positions only).
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) - 2 * 50 * 8 == weights
    assert training_flops_per_token(untied, "full") == 6 * weights


def test_logging_steps_below_one_is_a_fraction_of_the_run_as_in_hf():
    """The default 0.1 prints every ceil(0.1 x steps): 150 of 1,500 steps (10 lines), 13 of 125
    (10 lines with the last step's), at least every step; a whole number is steps; 0 is none."""
    assert [logging_interval(0.1, n) for n in (1500, 125, 5)] == [150, 13, 1]
    assert logging_interval(10.0, 1500) == 10 and logging_interval(10, 3) == 10
    assert logging_interval(0, 1500) == 0


def test_line_progress_prints_a_line_per_fifth_of_the_run(caplog):
    """In a log file the bar is a line each time another fifth of the steps is done: 5 lines for
    1,500 steps; from a resumed step 600 (40%), the 3 fifths left."""
    caplog.set_level(logging.INFO, logger="rosepo")
    bar = LineProgress("sft", 1500)
    for _ in range(1500):
        bar.set_description("sft loss=1.2345")
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[0].startswith("sft loss=1.2345: 300/1500 steps (20%), ")
    assert lines[-1].startswith("sft loss=1.2345: 1500/1500 steps (100%), ") and lines[-1].endswith("0:00 left")
    caplog.clear()
    bar = LineProgress("align", 1500, start=600)
    for _ in range(900):
        bar.update(1)
    assert [r.getMessage().split(" steps")[0] for r in caplog.records] == [
        f"align: {n}/1500" for n in (900, 1200, 1500)]


def test_tensorboard_tags_are_the_console_names(tmp_path):
    """``eval/hr@1`` is stored as ``eval/hr@1`` (tensorboardX's add_scalar would store
    ``eval/hr_1``), every metric of a step in one event at that step."""
    from tensorboardX.proto import event_pb2

    writer = _tensorboard(str(tmp_path))
    _log_scalars(writer, {"loss": 0.5, "eval/hr@1": 0.25, "eval/rank/ndcg@5": 0.5}, 7)
    writer.close()
    (f,) = tmp_path.glob("events.out.tfevents.*")
    data, pos, tags = f.read_bytes(), 0, {}
    while pos < len(data):  # TFRecord: length (u64), its CRC, the record, the record's CRC
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        tags.update({v.tag: (event.step, v.simple_value) for v in event.summary.value})
    assert tags == {"loss": (7, 0.5), "eval/hr@1": (7, 0.25), "eval/rank/ndcg@5": (7, 0.5)}
