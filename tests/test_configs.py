"""Every shipped config loads and validates; the DeepSpeed files are consistent with them; the
files their comments point at exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rosepo.config import load_config
from rosepo.train.zero_config import DEEPSPEED_DIR, deepspeed_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_builds_deepspeed(path):
    cfg = load_config(path)
    for stage in (cfg.sft, cfg.align):
        ds = deepspeed_config(stage, bf16=cfg.model.dtype == "bfloat16")
        assert ds["zero_optimization"]["stage"] == stage.zero_stage
        assert ds["train_micro_batch_size_per_gpu"] == stage.micro_batch_size


def test_7b_config_is_a_gpu_zero3_bf16_lora_run():
    """Validated without loading weights: the GPU cluster config asks for what a 7B model needs."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama-7b-lora.yaml")
    assert cfg.model.finetune == "lora" and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    for stage in (cfg.sft, cfg.align):
        assert stage.use_gpu and stage.zero_stage == 3 and stage.num_workers >= 2
    assert cfg.oracle.use_gpu and cfg.pairs.use_gpu and cfg.eval.use_gpu  # every stage on GPUs
    assert cfg.storage.startswith("/") and cfg.ray_address == "auto"


def test_the_one_gpu_gemma_config_runs_every_stage_on_one_gpu_at_llaras_scale():
    cfg = load_config(REPO / "configs" / "ml100k-gemma3-270m-gpu.yaml")
    assert cfg.gpu_demand() == {"oracle": 1, "sft": 1, "pairs": 1, "align": 1, "eval": 1}
    assert cfg.sft.max_samples == 0 and cfg.sft.epochs >= 1 and cfg.eval.max_samples == 0
    assert cfg.model.name_or_path == "gemma-3-270m" and cfg.model.item_embeddings == "none"


def test_deepspeed_templates_are_json():
    templates = sorted(DEEPSPEED_DIR.glob("*.json"))  # package data since they left configs/deepspeed
    assert len(templates) == 5
    for f in templates:
        assert "zero_optimization" in json.loads(f.read_text())


def test_files_named_in_the_configs_exist():
    """A path of the repository that a config or search file names (in a comment, say) exists."""
    named = {(path.name, m.group(0)) for path in (REPO / "configs").rglob("*.yaml")
             for m in re.finditer(r"\b(?:rosepo|docs|configs|tools|bench|jobs|cluster)/[\w./-]*\w\.(?:py|md|yaml|json)",
                                  path.read_text(encoding="utf-8"))}
    assert len(named) >= 10 and [(f, p) for f, p in sorted(named) if not (REPO / p).is_file()] == []
