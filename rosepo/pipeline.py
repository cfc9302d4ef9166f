"""The stage graph of a rosepo run, in one place.

Each stage is a function from the outputs of earlier stages (folders on storage) to one output
folder, written atomically and addressed by a hash of the config sections it depends on plus its
inputs' addresses: ``<storage>/<run name>/<stage>-<hash>/``. A folder with a ``manifest.json`` is
finished, so a rerun skips it; ``force`` redoes named stages (and so everything after them, since
their addresses do not change but their outputs are rebuilt).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from rosepo.config import RunConfig, config_hash
from rosepo.model.fetch import resolve_model
from rosepo.storage import is_complete, read_manifest

#: name -> (config sections it depends on, upstream stages). Order = execution order.
GRAPH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "samples": (("data",), ()),
    "oracle": (("oracle",), ("samples",)),
    "model": (("model",), ("samples", "oracle")),  # model.title_init: sasrec reads the oracle
    "sft": (("sft", "model"), ("samples", "model")),
    "pairs": (("pairs", "model"), ("samples", "model", "sft", "oracle")),
    "align": (("align", "model"), ("pairs", "model", "sft")),
    "eval": (("eval", "model"), ("samples", "model", "sft", "oracle", "align")),
}


def stage_key(cfg: RunConfig, stage: str) -> str:
    """The address of a stage's output: hash of its config sections and its upstream keys."""
    sections, upstream = GRAPH[stage]
    parts = [stage] + [getattr(cfg, s) for s in sections] + [stage_key(cfg, u) for u in upstream]
    return f"{stage}-{config_hash(*parts)}"


def run_dir(cfg: RunConfig) -> Path:
    """The run's folder: ``<storage>/<name>`` (absolute)."""
    return (Path(cfg.storage) / cfg.name).resolve()


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a stage's output lives."""
    return run_dir(cfg) / stage_key(cfg, stage)


def work_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a training stage keeps its Ray run (checkpoints) until it finishes; kept for resume."""
    return run_dir(cfg) / ".work" / stage_key(cfg, stage)


def base_model_path(model_stage_dir: Path) -> str:
    """The base model a ``model`` stage stands for: the built tiny model, or the configured path."""
    return read_manifest(model_stage_dir)["model_path"]


def sft_model(sft_stage_dir: Path, base: str) -> tuple[str, str | None]:
    """(base model, adapter) that the SFT stage produced: its LoRA adapter on ``base``, or, after
    full fine-tuning, the SFT model itself with no adapter."""
    model = sft_stage_dir / "model"
    if (model / "adapter_config.json").is_file():
        return base, str(model)
    return str(model), None


def _samples(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.data.samples import build_samples
    from rosepo.train.raysetup import init_ray

    return build_samples(cfg.data, out, start_ray=lambda: init_ray(cfg.ray_address))


def _model(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.data.samples import SPLITS, read_split
    from rosepo.model.factory import build_tiny_model, check_lora_targets, load_tokenizer, model_linear_layers
    from rosepo.model.tokenize import check_sample_lengths
    from rosepo.storage import atomic_dir, write_manifest

    with atomic_dir(out, overwrite=True) as tmp:
        if cfg.model.name_or_path == "tiny":
            # The tokenizer learns from the text it will see: prompts (templates + titles) and titles.
            train = read_split(inputs["samples"], "train")
            texts = train.column("prompt").to_pylist()[:: max(1, len(train) // 4000)]
            titles = {t for ts in train.column("candidate_titles").to_pylist() for t in ts}
            texts += sorted(titles)
            if cfg.model.title_tokens:  # every title a prompt can name, valid and test included
                for split in ("valid", "test"):
                    table = read_split(inputs["samples"], split)
                    for column in ("history_titles", "candidate_titles"):
                        titles.update(t for ts in table.column(column).to_pylist() for t in ts)
                titles.update(t for ts in train.column("history_titles").to_pylist() for t in ts)
            vectors = _title_vectors(inputs) if cfg.model.title_init == "sasrec" else None
            built = build_tiny_model(cfg.model, texts, tmp / "hf", titles=sorted(titles), title_vectors=vectors)
            path = str(out / "hf")  # where it will be once the folder is in place
        else:  # a named model (gemma-3-270m) is fetched into the data directory on first use
            path = built = resolve_model(cfg.model.name_or_path, cfg.data.data_dir)
        if cfg.model.finetune == "lora":  # here, before any training stage starts workers
            check_lora_targets(cfg.model, model_linear_layers(built))
        # Every prompt and answer within the token limits, refused here with the usual one line
        # rather than inside a Ray Data task of SFT, pairs or eval.
        longest = check_sample_lengths(load_tokenizer(built), {s: read_split(inputs["samples"], s) for s in SPLITS},
                                       cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens,
                                       str(inputs["samples"]))
        manifest = {"stage": "model", "model_path": path, "config": cfg.to_dict()["model"], "longest": longest}
        write_manifest(tmp, manifest)
    return manifest


def _title_vectors(inputs: dict[str, Path]) -> dict:
    """Title -> the oracle's item vector (the mean, for a title two items share)."""
    import numpy as np

    from rosepo.data.samples import read_split
    from rosepo.pairs.oracle import load_oracle

    item_vectors = load_oracle(inputs["oracle"]).item_vectors()
    by_title: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "valid", "test"):
        table = read_split(inputs["samples"], split)
        for ids_col, titles_col in (("history_item_ids", "history_titles"),
                                    ("candidate_item_ids", "candidate_titles")):
            for ids, names in zip(table.column(ids_col).to_pylist(), table.column(titles_col).to_pylist()):
                for i, t in zip(ids, names):
                    by_title.setdefault(t, {})[i] = item_vectors[i]
    return {t: np.mean(list(v.values()), axis=0) for t, v in by_title.items()}


def _sft(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    import ray

    from rosepo.storage import atomic_dir, write_manifest
    from rosepo.train.sft import run_sft

    from rosepo.data.samples import read_split, select_samples

    # A seeded random slice of users' windows, not the first ids (those are a few users only).
    train = select_samples(read_split(inputs["samples"], "train"), cfg.sft.max_samples, cfg.sft.seed)
    samples = ray.data.from_arrow(train)
    result = run_sft(cfg, samples, base_model_path(inputs["model"]), str(work_dir(cfg, "sft")), "sft")
    with atomic_dir(out, overwrite=True) as tmp:
        import shutil

        shutil.copytree(result["model_path"], tmp / "model")
        manifest = {"stage": "sft", "metrics": result["metrics"], "history": result["history"],
                    "resumed_from_step": result["resumed_from_step"]}
        write_manifest(tmp, manifest)
    return manifest


def _oracle(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.pairs.oracle import train_oracle

    return train_oracle(inputs["samples"], cfg.oracle, out)


def _pairs(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.pairs.build import build_pairs

    base, adapter = sft_model(inputs["sft"], base_model_path(inputs["model"]))
    return build_pairs(cfg, inputs["samples"], base, adapter, inputs["oracle"], out)


def _align(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.train.align import run_align

    base, adapter = sft_model(inputs["sft"], base_model_path(inputs["model"]))
    return run_align(cfg, inputs["pairs"], base, adapter, str(work_dir(cfg, "align")), out)


def _eval(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.eval.evaluate import evaluate_run

    return evaluate_run(cfg, inputs, out)


RUNNERS: dict[str, Callable[[RunConfig, Path, dict[str, Path]], dict]] = {
    "samples": _samples,
    "model": _model,
    "sft": _sft,
    "oracle": _oracle,
    "pairs": _pairs,
    "align": _align,
    "eval": _eval,
}


def run_stage(cfg: RunConfig, stage: str, *, force: bool = False, log: Callable[[str], None] = print,
              _ready: dict[str, Path] | None = None) -> Path:
    """Run one stage (its upstream must be finished or is run first); returns its output folder."""
    ready = {} if _ready is None else _ready
    if stage in ready:
        return ready[stage]
    _, upstream = GRAPH[stage]
    inputs = {u: run_stage(cfg, u, log=log, _ready=ready) for u in upstream}
    out = stage_dir(cfg, stage)
    if is_complete(out) and not force:
        log(f"[rosepo] {stage}: done earlier, skipped ({out})")
        ready[stage] = out
        return out
    if force and out.exists():
        shutil.rmtree(out)
    log(f"[rosepo] {stage}: running -> {out}")
    t0 = time.perf_counter()
    RUNNERS[stage](cfg, out, inputs)
    log(f"[rosepo] {stage}: finished in {time.perf_counter() - t0:.1f} s")
    ready[stage] = out
    return out


def run_pipeline(cfg: RunConfig, *, until: str | None = None, force: tuple[str, ...] = (),
                 log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run every stage in order (up to ``until``); ``force`` names stages to redo."""
    unknown = set(force) - set(GRAPH)
    if unknown:
        from rosepo.errors import ConfigError

        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(GRAPH)}")
    outs: dict[str, Path] = {}
    for stage in GRAPH:
        outs[stage] = run_stage(cfg, stage, force=stage in force, log=log, _ready=outs)
        if stage == until:
            break
    return outs


def manifests(outs: dict[str, Path]) -> dict[str, dict]:
    """The manifests of finished stages."""
    return {k: read_manifest(v) for k, v in outs.items() if is_complete(v)}

