"""The stage graph of a rosepo run, in one place, and the only code that maps config sections and
stage folders to stage calls.

Each stage is a function from the outputs of earlier stages (folders on storage) to one output
folder, written atomically and addressed by a hash of the config sections it depends on plus its
inputs' addresses: ``<storage>/<run name>/<stage>-<hash>/``. A stage's runner receives exactly
those sections (`stage_sections`), so it cannot read a setting its address does not hash. A
folder with a ``manifest.json`` is finished, so a rerun skips it; ``force`` redoes the named stages
only: their addresses do not change, so the finished stages after them are kept (name them too).
A forced stage's old output stays in place until the new one replaces it whole, so a rebuild that
fails or is killed leaves the finished output as it was.

`run_pipeline` also records the run in its folder: ``config.yaml`` (the resolved config, loadable
by `rosepo.config.load_config`: what ``rosepo recommend --run`` reads) and ``run.json`` (each
stage's folder and the seconds it took to build; `read_run_record`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from rosepo.config import RunConfig, config_hash
from rosepo.data.samples import build_samples
from rosepo.errors import ConfigError
from rosepo.eval.evaluate import evaluate_run
from rosepo.layout import WORK_DIR, base_model_path, find_items, sft_model_and_adapter
from rosepo.model.base import build_base_model
from rosepo.pairs.build import build_pairs
from rosepo.pairs.oracle import train_oracle
from rosepo.runtime import init_ray
from rosepo.storage import atomic_write_text, confined, is_complete
from rosepo.train.align import run_align
from rosepo.train.sft import build_sft, sft_samples

log = logging.getLogger(__name__)

#: In the run folder: the config of the latest `run_pipeline`, and its stages' record.
RUN_CONFIG, RUN_RECORD = "config.yaml", "run.json"

#: name -> (config sections it depends on, upstream stages). Order = execution order.
GRAPH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "samples": (("data",), ()),
    "oracle": (("oracle",), ("samples",)),
    # data: where a named model is fetched to; oracle: model.title_init: sasrec reads it.
    "model": (("model", "data"), ("samples", "oracle")),
    # oracle: sft.oracle_weight distils its ranking.
    "sft": (("sft", "model"), ("samples", "model", "oracle")),
    # sft: pairs.exclude_sft leaves out the sft stage's slice of the train samples.
    "pairs": (("pairs", "model", "sft"), ("samples", "model", "sft", "oracle")),
    "align": (("align", "model"), ("pairs", "model", "sft")),
    # data: the random baseline's seed; align: the aligned method's name in the table.
    "eval": (("eval", "model", "data", "align"), ("samples", "model", "sft", "oracle", "align")),
}


def stage_key(cfg: RunConfig, stage: str) -> str:
    """The address of a stage's output: hash of its config sections and its upstream keys."""
    sections, upstream = GRAPH[stage]
    parts = [stage] + [getattr(cfg, s) for s in sections] + [stage_key(cfg, u) for u in upstream]
    return f"{stage}-{config_hash(*parts)}"


def stage_sections(cfg: RunConfig, stage: str) -> SimpleNamespace:
    """The config sections `GRAPH` lists for ``stage``, and only those, as attributes, and
    ``ray_address`` (where the work runs, not what it makes)."""
    return SimpleNamespace(**{s: getattr(cfg, s) for s in GRAPH[stage][0]}, ray_address=cfg.ray_address)


def run_folder(cfg: RunConfig) -> Path:
    """The run's folder, which holds every stage folder: ``<storage>/<name>`` (absolute); a
    ``name`` that leads outside ``storage`` (``..``, an absolute path, a link) is refused."""
    return confined(cfg.storage, cfg.name)


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """Where a stage's output lives."""
    return run_folder(cfg) / stage_key(cfg, stage)


def work_dir(out: Path) -> Path:
    """Where the training stage writing ``out`` keeps its Ray run (checkpoints) until it
    finishes; kept for resume: ``<run folder>/.work/<stage key>``."""
    return out.parent / WORK_DIR / out.name


def _samples(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    # Ray starts (or is joined) only once the catalog and the list of input files are checked.
    return build_samples(c.data, out, start_ray=lambda: init_ray(c.ray_address))


def _model(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    return build_base_model(c.model, c.data.data_dir, inputs["samples"], inputs["oracle"], out)


def _sft(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    return build_sft(c, inputs["samples"], base_model_path(inputs["model"]), work_dir(out), out,
                     find_items(inputs["model"]), inputs["oracle"])


def _oracle(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    return train_oracle(inputs["samples"], c.oracle, out)


def _pairs(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    base, adapter = sft_model_and_adapter(inputs["sft"], base_model_path(inputs["model"]))
    seen = sft_samples(c.sft, inputs["samples"]).column("sample_id").to_pylist() if c.pairs.exclude_sft else ()
    return build_pairs(c, inputs["samples"], base, adapter, inputs["oracle"], out, exclude_train=frozenset(seen))


def _align(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    base, adapter = sft_model_and_adapter(inputs["sft"], base_model_path(inputs["model"]))
    return run_align(c, inputs["pairs"], base, adapter, str(work_dir(out)), out)


def _eval(c: SimpleNamespace, out: Path, inputs: dict[str, Path]) -> dict:
    base, sft_adapter = sft_model_and_adapter(inputs["sft"], base_model_path(inputs["model"]))
    return evaluate_run(c, inputs["samples"], inputs["oracle"], base, sft_adapter, inputs["align"], out)


#: Stage -> runner(its config sections, output folder, upstream folders).
RUNNERS: dict[str, Callable[[SimpleNamespace, Path, dict[str, Path]], dict]] = {
    "samples": _samples,
    "model": _model,
    "sft": _sft,
    "oracle": _oracle,
    "pairs": _pairs,
    "align": _align,
    "eval": _eval,
}


def run_stage(cfg: RunConfig, stage: str, *, force: bool = False, _ready: dict[str, Path] | None = None) -> Path:
    """Run one stage (its upstream must be finished or is run first); returns its output folder."""
    ready = {} if _ready is None else _ready
    if stage in ready:
        return ready[stage]
    _, upstream = GRAPH[stage]
    inputs = {u: run_stage(cfg, u, _ready=ready) for u in upstream}
    out = stage_dir(cfg, stage)
    if is_complete(out) and not force:
        log.info("%s: done earlier, skipped (%s)", stage, out)
        ready[stage] = out
        return out
    if force:
        # The finished output stays until the rebuild replaces it (every stage writes atomically),
        # so a failed or killed rebuild loses nothing. A training stage's Ray run is reset instead:
        # resumed, its finished checkpoint would only be exported again.
        shutil.rmtree(work_dir(out), ignore_errors=True)
    log.info("%s: running -> %s", stage, out)
    t0 = time.perf_counter()
    RUNNERS[stage](stage_sections(cfg, stage), out, inputs)
    log.info("%s: finished in %.1f s", stage, time.perf_counter() - t0)
    ready[stage] = out
    return out


def stages_until(stage: str | None) -> tuple[str, ...]:
    """The stages a run up to ``stage`` (every stage when None) may run, in order."""
    names = tuple(GRAPH)
    return names if stage is None else names[: names.index(stage) + 1]


def run_pipeline(cfg: RunConfig, *, until: str | None = None, force: tuple[str, ...] = ()) -> dict[str, Path]:
    """Run every stage in order (up to ``until``); ``force`` names stages to redo."""
    unknown = set(force) - set(GRAPH)
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(GRAPH)}")
    outs: dict[str, Path] = {}
    record = read_run_record(run_folder(cfg))
    for stage in GRAPH:
        reused = is_complete(stage_dir(cfg, stage)) and stage not in force
        t0 = time.perf_counter()
        outs[stage] = run_stage(cfg, stage, force=stage in force, _ready=outs)
        earlier = record.get(stage, {})
        seconds = earlier.get("seconds") if reused and earlier.get("folder") == outs[stage].name else None
        record[stage] = {"folder": outs[stage].name, "reused": reused,
                         "seconds": seconds if reused else round(time.perf_counter() - t0, 1)}
        if stage == until:
            break
    _write_run_record(cfg, record)
    return outs


def read_run_record(folder: str | Path) -> dict[str, dict]:
    """``run.json`` of a run folder: stage -> ``{"folder", "seconds", "reused"}`` (``reused``: found
    finished by the latest run; ``seconds``: how long building it took, None when unknown); {} when none."""
    path = Path(folder) / RUN_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_run_record(cfg: RunConfig, record: dict[str, dict]) -> None:
    """``config.yaml`` and ``run.json``, atomically. A stage the config no longer addresses (an
    earlier run's) is dropped; one not run this time (``until``) but still addressed is kept."""
    import yaml

    folder = run_folder(cfg)
    record = {s: r for s, r in record.items() if s in GRAPH and r["folder"] == stage_key(cfg, s)}
    atomic_write_text(folder / RUN_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(folder / RUN_RECORD, json.dumps(record, indent=2))
