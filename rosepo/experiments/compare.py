"""`rosepo compare`: the baselines, DPO, cDPO, S-DPO, RosePO and its ablations in one protocol,
over several seeds, in one table.

What it does (`run_compare`):

1. runs the upstream stages once through the pipeline (samples, model, SFT, oracle; reused when
   finished) and at most two pair builds: ``mix`` (``pairs.mix: all`` over self_hard, semantic,
   popularity and random, one pair per strategy per sample, so a method only selects
   ``align.strategies``) and ``sdpo`` (3 random negatives per prompt);
2. evaluates the baselines once, into ``baselines/``: random, most popular, SASRec (the oracle)
   and the SFT model are deterministic, so they have one value and no std;
3. for each method (`METHODS`) and seed: the pipeline's ``align`` stage with the method's
   overrides (cached by config hash like any stage) and an evaluation of the aligned model on
   ``eval.split``, into ``cells/<method>/seed-<seed>/``, written atomically. A finished cell is
   skipped, so an interrupted compare resumes where it stopped (and an interrupted alignment
   from its last checkpoint);
4. writes ``table.md`` (mean ± std over seeds), ``results.json`` (per seed and aggregated),
   ``metrics.png`` (one bar chart per table metric, std as error bars) and ``eps.png`` (the
   personalised ε of the pairs, per rejected-sampling strategy), each atomically.

Everything goes to ``<storage>/<run name>/compare-<hash>/``, the hash covering the run's
config (every stage section) and ``compare.align_steps``, not the methods or seeds, so running
more of either reuses the cells already there.

What it does not do: choose hyperparameters (every method trains with the run's ``align``
section, chosen on valid; the test split, when ``eval.split`` is test, is read only here);
vary the pairs with the seed (a seed changes the LoRA initialisation and the data order only:
rebuilding pairs costs a scoring pass of the SFT model per seed); give every method its own
tuned β or learning rate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rosepo import runtime
from rosepo.config import RunConfig, apply_values, config_hash, load_config
from rosepo.eval.evaluate import BASELINES, evaluate_baselines, evaluate_model, nan_to_none
from rosepo.experiments.methods import (
    METHODS,
    PAIR_BUILDS,
    align_steps,
    cell_config,
    pairs_config,
    seeds,
    selected_methods,
)
from rosepo.experiments.noise import noise_dir, rate_config, write_noise_report
from rosepo.experiments.report import RESULTS, write_summary
from rosepo.layout import aligned_model_and_adapter, base_model_path, sft_model_and_adapter
from rosepo.pipeline import run_folder, run_pipeline, run_stage, stage_key
from rosepo.storage import atomic_dir, is_complete, read_manifest, write_manifest

log = logging.getLogger(__name__)


def compare_dir(cfg: RunConfig) -> Path:
    """``<storage>/<name>/compare-<hash>``: the hash covers every stage's config (the eval
    stage's address hashes them all) and ``compare.align_steps``, not the methods or seeds."""
    return run_folder(cfg) / f"compare-{config_hash('compare', stage_key(cfg, 'eval'), cfg.compare.align_steps)}"


def prepare(cfg: RunConfig, methods: list[str]) -> dict:
    """Upstream stages (samples, oracle, model, sft) and the pair builds the methods need,
    through the pipeline (each reused when finished). Returns the stage folders, ``pairs``
    (build -> folder) and ``steps`` (align steps of every cell)."""
    upstream = run_pipeline(cfg, until="sft")  # GRAPH runs the oracle and the model before sft
    builds = [b for b in PAIR_BUILDS if any(METHODS[m].pairs == b for m in methods)]
    pairs = {b: run_stage(pairs_config(cfg, b), "pairs") for b in builds}
    train_samples = read_manifest(pairs[builds[0]])["splits"]["train"]["samples"]
    return {**upstream, "pairs": pairs, "steps": align_steps(cfg, train_samples)}


class _OnlyStage(logging.Filter):
    """Passes the pipeline's lines about one stage only."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith(f"{self.stage}:")


def run_cell(cell_cfg: RunConfig, method: str, seed: int, upstream: dict, out: Path) -> dict:
    """Align (the pipeline's align stage, reused when finished) and evaluate one method × seed
    into ``out`` atomically: ``eval/`` (answers.parquet, metrics.json) and a manifest with the
    metrics, the align stage's folder, its pairs, ε summary and held-out pair metrics."""
    t0 = time.perf_counter()
    # Only the align stage's own lines: `prepare` has finished every stage before it.
    only_align = _OnlyStage("align")
    pipeline_log = logging.getLogger("rosepo.pipeline")
    pipeline_log.addFilter(only_align)
    try:
        align = run_stage(cell_cfg, "align")
    finally:
        pipeline_log.removeFilter(only_align)
    t1 = time.perf_counter()
    base, _ = sft_model_and_adapter(upstream["sft"], base_model_path(upstream["model"]))
    with atomic_dir(out, overwrite=True) as tmp:
        metrics = evaluate_model(cell_cfg, upstream["samples"], *aligned_model_and_adapter(align, base), tmp / "eval")
        am = read_manifest(align)
        manifest = {"method": method, "seed": seed, "align": str(align), "pairs": am["pairs"], "eps": am["eps"],
                    "align_steps": cell_cfg.align.max_steps, "align_seconds": round(t1 - t0, 1),
                    "eval_seconds": round(time.perf_counter() - t1, 1),
                    "valid_pairs": {k: v for k, v in am["metrics"].items() if k.startswith("eval/")},
                    "overrides": METHODS[method].align, "metrics": nan_to_none(metrics)}
        write_manifest(tmp, manifest)
    return manifest


def run_cells(cfg: RunConfig, methods: list[str], upstream: dict, out: Path) -> dict[str, list[dict]]:
    """Every method × seed cell into ``out/cells/<method>/seed-<seed>``, skipping finished ones,
    seed by seed (every method's first seed before any second one: a comparison stopped early
    has every method); one log line per cell with its time, the elapsed time and an estimate of
    what is left. Returns method -> the cells' manifests, in seed order."""
    cells = [(m, s) for s in seeds(cfg) for m in methods]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    start, ran = time.perf_counter(), 0
    for i, (method, seed) in enumerate(cells, 1):
        cell = out / "cells" / method / f"seed-{seed}"
        t0 = time.perf_counter()
        if is_complete(cell):
            manifest, done = read_manifest(cell), "done earlier, skipped"
        else:
            manifest = run_cell(cell_config(cfg, method, seed, upstream["steps"]), method, seed, upstream, cell)
            ran += 1
            done = f"{time.perf_counter() - t0:.0f} s"
        results[method].append(manifest)
        elapsed = time.perf_counter() - start
        left = (len(cells) - i) * elapsed / ran if ran else 0.0
        m = manifest["metrics"]
        log.info("compare %d/%d %s seed %d: %s; hr@1 %s, rank/hr@1 %s; elapsed %.1f min, ~%.0f min left",
                 i, len(cells), method, seed, done, _num(m["eval/hr@1"]), _num(m["eval/rank/hr@1"]),
                 elapsed / 60, left / 60)
    return results


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run_compare(cfg: RunConfig) -> dict:
    """The whole comparison (see the module docstring); returns the paths of the outputs."""
    methods = selected_methods(cfg)
    out = compare_dir(cfg)
    log.info("compare: %d methods x %d seeds -> %s", len(methods), cfg.compare.seeds, out)
    upstream = prepare(cfg, methods)
    baselines_dir = out / "baselines"
    if not is_complete(baselines_dir):
        t0 = time.perf_counter()
        base, sft_adapter = sft_model_and_adapter(upstream["sft"], base_model_path(upstream["model"]))
        with atomic_dir(baselines_dir, overwrite=True) as tmp:
            refs = evaluate_baselines(cfg, upstream["samples"], upstream["oracle"], base, sft_adapter, tmp)
            write_manifest(tmp, {"results": {k: nan_to_none(v) for k, v in refs.items()}})
        log.info("compare: baselines (%s) in %.0f s", ", ".join(BASELINES), time.perf_counter() - t0)
    stored = read_manifest(baselines_dir)["results"]
    baselines = {name: stored[name] for name in BASELINES}
    cells = run_cells(cfg, methods, upstream, out)
    paths = write_summary(cfg, out, baselines, cells, upstream)
    log.info("compare: %s, %s, %s, %s", paths["table"], paths["results"], paths["metrics_png"], paths["eps_png"])
    return paths


def compare_command(config: str | None, overrides: list[str], *, seeds_arg: int | None = None,
                    methods_arg: str | None = None) -> dict:
    """``rosepo compare`` and ``jobs/compare.py``: load the config (plus overrides, ``--seeds``
    and ``--methods`` as ``compare.seeds`` / ``compare.methods``), refuse a bad one before
    Ray starts, start or join Ray, and run the comparison."""
    cfg = load_config(config, overrides)
    values: dict = {}
    if seeds_arg is not None:
        values["compare.seeds"] = seeds_arg
    if methods_arg is not None:
        values["compare.methods"] = [m.strip() for m in methods_arg.split(",") if m.strip()]
    cfg = apply_values(cfg, values) if values else cfg
    runtime.init_ray(cfg.ray_address)
    runtime.check_gpus(cfg.gpu_demand())
    return run_noise_compare(cfg) if cfg.compare.noise_rates else run_compare(cfg)


def run_noise_compare(cfg: RunConfig) -> dict:
    """The comparison at every rate of ``compare.noise_rates`` (`rosepo.experiments.noise.rate_config`:
    each a comparison of its own, cached and resumable), then the noise report
    (`rosepo.experiments.noise.write_noise_report`); returns its paths."""
    rates = sorted(cfg.compare.noise_rates)
    runs = {}
    for rate in rates:
        log.info("compare: label noise %g (rates %s)", rate, ", ".join(f"{r:g}" for r in rates))
        runs[rate] = json.loads((Path(run_compare(rate_config(cfg, rate))["dir"]) / RESULTS).read_text())
    return write_noise_report(cfg, runs, noise_dir(cfg))
