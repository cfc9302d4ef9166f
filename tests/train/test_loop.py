"""The training loop's console line (`rosepo.train.loop.metrics_line`)."""

from __future__ import annotations

from rosepo.train.loop import metrics_line


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
    lookup, not a matmul, and stay out. Full fine-tuning: 6 FLOPs per other weight and token
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
