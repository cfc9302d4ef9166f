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
from rosepo.storage import is_complete, read_manifest

#: name -> (config sections it depends on, upstream stages)
GRAPH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "samples": (("data",), ()),
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


def _samples(cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> dict:
    from rosepo.data.samples import build_samples

    return build_samples(cfg.data, out)


RUNNERS: dict[str, Callable[[RunConfig, Path, dict[str, Path]], dict]] = {
    "samples": _samples,
}


def run_stage(cfg: RunConfig, stage: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run one stage (its upstream must be finished or is run first); returns its output folder."""
    _, upstream = GRAPH[stage]
    inputs = {u: run_stage(cfg, u, log=log) for u in upstream}
    out = stage_dir(cfg, stage)
    if is_complete(out) and not force:
        log(f"[rosepo] {stage}: done earlier, skipped ({out})")
        return out
    if force and out.exists():
        shutil.rmtree(out)
    log(f"[rosepo] {stage}: running -> {out}")
    t0 = time.perf_counter()
    RUNNERS[stage](cfg, out, inputs)
    log(f"[rosepo] {stage}: finished in {time.perf_counter() - t0:.1f} s")
    return out


def run_pipeline(cfg: RunConfig, *, until: str | None = None, force: tuple[str, ...] = (),
                 log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run every stage in order (up to ``until``); ``force`` names stages to redo."""
    unknown = set(force) - set(GRAPH)
    if unknown:
        from rosepo.errors import ConfigError

        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(GRAPH)}")
    outs = {}
    for stage in GRAPH:
        outs[stage] = run_stage(cfg, stage, force=stage in force, log=log)
        if stage == until:
            break
    return outs


def manifests(outs: dict[str, Path]) -> dict[str, dict]:
    """The manifests of finished stages."""
    return {k: read_manifest(v) for k, v in outs.items() if is_complete(v)}

