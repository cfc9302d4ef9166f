"""Where stage folders keep their models: LoRA adapters on a base, or whole fine-tuned models."""

from __future__ import annotations

import json

from rosepo.layout import ADAPTER_CONFIG, ADAPTER_DIR, SFT_MODEL_DIR, aligned_model_and_adapter, sft_model_and_adapter


def test_stage_models_are_an_adapter_on_the_base_or_the_whole_model(tmp_path):
    """A folder with adapter_config.json is an adapter on ``base``; one without (full fine-tuning:
    align.finetune: full wrote its model into the same folder) is the model, with no adapter."""
    lora, full = tmp_path / "lora", tmp_path / "full"
    for stage in (lora, full):
        (stage / SFT_MODEL_DIR).mkdir(parents=True)
        (stage / ADAPTER_DIR).mkdir()
        (stage / ADAPTER_DIR / "config.json").write_text("{}")
    for folder in (lora / SFT_MODEL_DIR, lora / ADAPTER_DIR):
        (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    assert sft_model_and_adapter(lora, "base") == ("base", str(lora / SFT_MODEL_DIR))
    assert sft_model_and_adapter(full, "base") == (str(full / SFT_MODEL_DIR), None)
    assert aligned_model_and_adapter(lora, "base") == ("base", str(lora / ADAPTER_DIR))
    assert aligned_model_and_adapter(full, "base") == (str(full / ADAPTER_DIR), None)
