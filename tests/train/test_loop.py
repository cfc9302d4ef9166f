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
