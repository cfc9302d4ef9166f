"""``rosepo export``: a run's trained model as a self-contained folder that leaves rosepo.

The folder is a Hugging Face model folder (``AutoModelForCausalLM.from_pretrained(folder)``
loads it) with what rosepo's recommender needs beside it:

- ``model.safetensors``, ``config.json``: the model (a LoRA adapter, where one was trained, merged
  into its weights) in the dtype it computes in on a CPU (float32 under ``model.dtype: auto``,
  bfloat16 where the config says so), and its tokenizer files;
- ``generation_config.json``: greedy decoding, the evaluation's answer length, EOS and padding;
- ``item_embeddings.safetensors``, for a model with hybrid item tokens: the item table, the
  trained projector(s) and the oracle's user encoder (`rosepo.model.items`); such a model reads
  prompts with item tokens, so it answers through rosepo only;
- ``catalog.parquet``: the catalogue (``item_id``, ``title``) candidates are drawn from;
- ``rosepo.json``: what the recommender is (stage, base model, prompt settings, whether plain
  transformers can run it) and the metrics of its run; ``run-config.yaml``: the run's config;
- ``README.md``: the model card: what it is, its data, its metrics, how to load it.

Nothing in it points outside it: copy it anywhere, delete the run, and
``rosepo.Recommender.from_pretrained(folder)`` gives the same recommendations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from rosepo.config import RunConfig
from rosepo.errors import ConfigError
from rosepo.eval.evaluate import markdown_table
from rosepo.experiments.recommend import (EXPORT_CARD, EXPORT_CONFIG, FORMAT_VERSION, Recommender, load_run,
                                         run_catalog, run_model)
from rosepo.experiments.summary import SUMMARY_METRICS
from rosepo.layout import CATALOG_FILE, ITEM_EMBEDDINGS
from rosepo.model.items import HybridItemLM
from rosepo.pipeline import stage_key
from rosepo.storage import atomic_dir, atomic_write_text, is_complete, read_manifest


def export_run(run_dir: str | Path, out: str | Path, *, stage: str = "align") -> Path:
    """Write the model of ``stage`` (``align`` or ``sft``) of the finished run in ``run_dir`` into the new
    folder ``out`` (atomically; an existing ``out`` is refused); returns ``out``."""
    import pyarrow.parquet as pq
    import yaml
    from transformers import GenerationConfig

    run, out = Path(run_dir).resolve(), Path(out).resolve()
    if out.exists():
        raise ConfigError(f"{out} exists: export into a new folder")
    cfg = load_run(run)
    base, adapter, samples = run_model(run, cfg, stage)
    recommender = Recommender(cfg, base, adapter, run_catalog(samples, cfg), device="cpu")
    model, tok = recommender.scorer.model, recommender.scorer.tok
    metrics = _run_metrics(run, cfg, stage)
    with atomic_dir(out) as tmp:
        lm = model.lm if isinstance(model, HybridItemLM) else model
        if isinstance(model, HybridItemLM):
            model.save_items(tmp / ITEM_EMBEDDINGS)
        lm.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        GenerationConfig(do_sample=False, max_new_tokens=cfg.eval.max_new_tokens, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id).save_pretrained(tmp)
        catalog = pa.table({"item_id": recommender.item_ids,
                            "title": [recommender.titles[i] for i in recommender.item_ids]})
        pq.write_table(catalog, tmp / CATALOG_FILE)
        atomic_write_text(tmp / EXPORT_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        card = {"format_version": FORMAT_VERSION, "stage": stage, "run": cfg.name,
                "base_model": cfg.model.name_or_path, "text_only": not isinstance(model, HybridItemLM),
                "lora_merged": adapter is not None,
                "items": len(catalog), "prompt_style": cfg.data.prompt_style, "domain": cfg.data.domain,
                "num_candidates": cfg.data.num_candidates, "max_history": cfg.data.max_history, "metrics": metrics}
        atomic_write_text(tmp / EXPORT_CARD, json.dumps(card, indent=2, sort_keys=True))
        atomic_write_text(tmp / "README.md", model_card(cfg, card, recommender))
    return out


def _run_metrics(run: Path, cfg: RunConfig, stage: str) -> dict:
    """The eval stage's results of the run, when it ran: the exported model's row and the
    baselines (method -> metric -> value); {} otherwise."""
    folder = run / stage_key(cfg, "eval")
    if not is_complete(folder):
        return {}
    results = read_manifest(folder)["results"]
    mine = f"aligned ({cfg.align.loss})" if stage == "align" else "sft"
    keep = [m for m in ("random", "most_popular", "sasrec", "sft", mine) if m in results]
    return {"split": read_manifest(folder)["split"],
            "results": {m: {k: results[m].get(k) for k in SUMMARY_METRICS} for m in keep}}


def model_card(cfg: RunConfig, card: dict, recommender: Recommender) -> str:
    """The folder's README.md: what the model is, its data and metrics, how to load it."""
    base = cfg.model.name_or_path
    what = "the built-in tiny Llama (trained from scratch)" if base == "tiny" else f"`{base}`"
    stage = "supervised fine-tuning"
    if card["stage"] == "align":
        stage = f"SFT, then alignment ({cfg.align.loss} loss, {cfg.align.smoothing} smoothing)"
    history = list(recommender.titles.values())[:3]
    lines = [
        f"# {cfg.name}: an LLM sequential recommender ({card['stage']})", "",
        f"A causal LM that reads a user's history of {cfg.data.domain} titles and {cfg.data.num_candidates} "
        f"candidate titles and answers with one title. Base model: {what}; trained by rosepo with {stage}"
        + ("; a LoRA adapter is merged into these weights." if card["lora_merged"] else "; every weight trained."),
        "",
        "## Data", "",
        f"`{cfg.data.format}` ({card['items']} items in `{CATALOG_FILE}`), histories of up to {cfg.data.max_history} "
        f"titles, prompts in the `{cfg.data.prompt_style}` style.", "",
    ]
    metrics = card["metrics"]
    if metrics:
        lines += [f"## Metrics (the run's {metrics['split']} split)", "",
                  markdown_table(metrics["results"], SUMMARY_METRICS).rstrip("\n"), ""]
    lines += [
        "## Use", "", "With rosepo (`pip install rosepo`, or a checkout):", "", "```python",
        "from rosepo import Recommender", "", "rec = Recommender.from_pretrained(\"path/to/this/folder\")",
        f"print(rec.recommend({history!r}, k=5))", "```", "",
        "or `rosepo recommend --run path/to/this/folder --history TITLE ...`.", "",
    ]
    if card["text_only"]:
        lines += [
            "With plain transformers (the prompt must be rosepo's: `rosepo.data.prompts.render_prompt`; "
            "the answer is greedy):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            "tok = AutoTokenizer.from_pretrained(\"path/to/this/folder\")",
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
            "ids = tok(prompt, return_tensors=\"pt\")",
            "out = model.generate(**ids)  # greedy, generation_config.json",
            "print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip())", "```", "",
        ]
    else:
        lines += ["Its prompts carry item tokens (`item_embeddings.safetensors`: the items' collaborative vectors "
                  "through a trained projector), so it runs through rosepo only.", ""]
    lines += ["## Licence", "",
              "The weights inherit the base model's terms (the Gemma terms of use for Gemma-3-270M)."
              if base != "tiny" else "Trained from scratch by rosepo (Apache-2.0) on the run's data; the data's own "
              "terms apply (MovieLens: the GroupLens usage licence).", ""]
    return "\n".join(lines)
