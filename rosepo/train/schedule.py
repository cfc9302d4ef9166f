"""The data order, learning-rate schedule and checkpoint state of the training loop: pure
functions of the step, shared by the driver and the workers (see `rosepo.train.loop`)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from rosepo.config import TrainConfig
from rosepo.errors import ConfigError, RosepoError

TRAINER_STATE = "trainer_state.json"


def total_steps(num_rows: int, global_batch: int, epochs: float, max_steps: int, max_epochs: float = 0.0) -> int:
    """Optimiser steps of a run: ``max_steps`` when set, but no more than ``ceil(max_epochs * N /
    G)`` when ``max_epochs`` is set too; else ``ceil(epochs * N / G)``."""
    if num_rows == 0:
        raise RosepoError("the training set is empty")
    if max_steps > 0:
        return min(max_steps, max(1, math.ceil(max_epochs * num_rows / global_batch))) if max_epochs else max_steps
    return max(1, math.ceil(epochs * num_rows / global_batch))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (as HF's
    ``get_cosine_schedule_with_warmup``): the multiplier of the peak learning rate at ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@functools.lru_cache(maxsize=4)
def _permutation(num_rows: int, seed: int, epoch: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def step_rows(step: int, num_rows: int, global_batch: int, seed: int) -> list[int]:
    """Indices (into the key-sorted rows) of the ``global_batch`` rows of optimiser step ``step``."""
    out = []
    for i in range(step * global_batch, (step + 1) * global_batch):
        out.append(int(_permutation(num_rows, seed, i // num_rows)[i % num_rows]))
    return out


def worker_micro_batches(rows: list[int], rank: int, micro_batch: int, grad_accum: int) -> list[list[int]]:
    """Worker ``rank``'s micro-batches of a step: its contiguous block of the step's rows, cut in
    ``grad_accum`` pieces of ``micro_batch``."""
    block = rows[rank * micro_batch * grad_accum:(rank + 1) * micro_batch * grad_accum]
    return [block[i:i + micro_batch] for i in range(0, len(block), micro_batch)]


def find_latest_checkpoint(ray_run_dir: str | Path) -> Path | None:
    """The ``checkpoint_*`` folder of a Ray run folder whose ``trainer_state.json`` has the
    highest global step (folders without one are unfinished and ignored); None when none."""
    best, best_step = None, -1
    for d in sorted(Path(ray_run_dir).glob("checkpoint_*")):
        state = d / TRAINER_STATE
        if state.is_file():
            step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
            if step > best_step:
                best, best_step = d, step
    return best


def finished_state(ray_run_dir: str | Path, train_cfg: TrainConfig) -> dict | None:
    """The trainer state of the latest checkpoint of a Ray run folder when the run trained all
    its steps (``train_cfg``'s ``epochs`` / ``max_steps`` / ``max_epochs``), else None."""
    checkpoint = find_latest_checkpoint(ray_run_dir)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    total = total_steps(state["num_rows"], state["global_batch"], train_cfg.epochs, train_cfg.max_steps,
                        train_cfg.max_epochs)
    return state if state["global_step"] >= total else None


def check_resumable(checkpoint: Path, num_rows: int, global_batch: int) -> dict:
    """The checkpoint's trainer state; `ConfigError` when its data position means something
    else in this run (another number of rows or global batch)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    if (state["num_rows"], state["global_batch"]) != (num_rows, global_batch):
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was trained on {state['num_rows']} rows with "
            f"global batch {state['global_batch']}, this run has {num_rows} and {global_batch}; "
            "use a new run_name (or delete the old run folder)")
    return state
