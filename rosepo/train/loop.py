"""The distributed training loop shared by SFT and alignment: Ray Train V2 + DeepSpeed ZeRO.

`fit` runs one *task* (a `TrainingTask`: `rosepo.train.sft.SFTTask`,
`rosepo.train.align.AlignTask`) on N Ray Train workers. The task object holds what differs
between stages, and its own typed config section (``task.cfg``: the batch geometry, optimiser and
checkpoint fields of `rosepo.config.TrainConfig`, and the stage's own); it is pickled into the
workers as it is. See `TrainingTask` for the methods.

Evaluation (optional): with an ``eval`` dataset, all its rows (sorted by the task's ``key``) are
scored with the task's ``compute_loss`` under ``no_grad`` before training, every ``task.eval_every``
steps and at the end; the means, and the task's ``eval_metrics``, are reported as ``eval/<name>``
and returned as ``eval_history``. Every rank scores all eval rows: ZeRO-3 needs the same forward passes on every
rank, and the set is small.

Data order. Every worker receives the whole ``train`` dataset (no streaming split), sorts it by
the task's ``key`` and reads it through one stream of per-epoch permutations seeded by ``(seed, epoch)``.
Optimiser step ``s`` consumes stream rows ``[s*G, (s+1)*G)``, ``G = workers * micro_batch *
grad_accum``; worker ``r`` takes the ``r``-th contiguous block of ``micro_batch * grad_accum``
rows. The position in the data is therefore a function of the global step alone, so resuming
mid-epoch is exact, and 1 worker with ``grad_accum=2`` sees the same micro-batches per step as
2 workers with ``grad_accum=1``. A step may straddle two epochs; ``epoch`` is reported as the
fraction of rows consumed. Total steps: ``max_steps`` (at most ``ceil(max_epochs * N / G)``) or
``ceil(epochs * N / G)``.

Console and metrics. Rank 0 shows its progress (steps, ETA, loss): on a terminal one bar (Ray's
``tqdm_ray``, which the driver draws), in a log file a plain line every fifth of the run
(`LineProgress`); and, every ``logging_steps`` (HF's convention: below 1, a fraction of the run's
steps; the default 0.1 gives about ten lines a stage), one line of metrics to the ``rosepo``
logger, as HF's Trainer prints them (`metrics_line`). Every step's metrics go to TensorBoard from
rank 0, each under its console name (`_log_scalars`).
Ray Train hears of the run only at evaluations and checkpoints (``ray.train.report``): a report
every step cost a round trip through the controller per step and logged a ``TrainingReport`` line
per rank (BENCHMARKS.md).

Checkpoints (every ``checkpoint_every`` steps, at the end and at ``stop_at_step``): each rank
saves its ZeRO shards with ``engine.save_checkpoint`` (frozen base weights excluded); rank 0
adds ``trainer_state.json`` and the HF export (``hf/``: the LoRA adapter, or the full model);
every rank reports the folder and Ray merges them under ``<output_dir>/<run_name>``. Running
the same `fit` again with the same ``run_name`` resumes from the checkpoint with the highest
global step, and refuses when the data size or batch geometry changed.

The data order and schedule are pure functions in `rosepo.train.schedule`; the DeepSpeed config
comes from a template (`rosepo.train.zero_config`).

Not supported: datasets other than ``train`` and ``eval`` (ignored), more rows than fit in each
worker's memory (the training set is token ids, small)."""

from __future__ import annotations

import abc
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from rosepo.config import ModelConfig, TrainConfig
from rosepo.errors import ConfigError, RosepoError, TrainingError
from rosepo.model.factory import apply_lora, cuda_settings, export_model, load_model, load_tokenizer, resolve_dtype
from rosepo.model.items import attach_items
from rosepo.runtime import is_verbose, train_logging
from rosepo.train.schedule import (TRAINER_STATE, check_resumable, find_latest_checkpoint, lr_factor, step_rows,
                                   total_steps, worker_micro_batches)
from rosepo.train.zero_config import deepspeed_config, skip_shm_comm_build

#: Ray Train's seconds per try to place a worker group, and the variable that changes it.
START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
HF_EXPORT = "hf"
DS_SUBDIR = "deepspeed"
DS_TAG = "state"

log = logging.getLogger(__name__)


class TrainingTask(abc.ABC):
    """What a stage trains through `fit`: its rows, batches, loss and optional evaluation.

    ``cfg`` is the stage's own typed config section (a `TrainConfig` subclass); the methods read
    their settings from it, never from a dict. ``model`` (``model.module`` being the HF/PEFT
    model) is the DeepSpeed engine during training. Metrics are scalars averaged over the
    worker's micro-batches, then over workers.
    """

    #: Name of the run (progress bar).
    name: str = ""
    #: Column that orders the training rows (see the data order above).
    key: str = ""
    #: Evaluate on the eval rows every N steps (0 = only before and after training).
    eval_every: int = 0
    cfg: TrainConfig

    @abc.abstractmethod
    def collate(self, rows: list[dict], pad_id: int) -> dict:
        """A micro-batch (``str -> Tensor``) from materialised rows."""

    @abc.abstractmethod
    def compute_loss(self, model, batch: dict) -> tuple[Any, dict]:
        """(loss, metrics) of a micro-batch. The metrics have the same keys for every micro-batch:
        every rank all-reduces one vector of them per step."""

    @abc.abstractmethod
    def num_tokens(self, batch: dict) -> int:
        """Tokens of a micro-batch the forward runs, for ``perf/tokens_per_second``."""

    def prepare_model(self, model, adapter: str | None):
        """Called after LoRA, before DeepSpeed; returns the model to train."""
        return model

    def eval_setup(self, rows: list[dict], tokenizer) -> Any:
        """State for `eval_metrics` from all the eval rows; a falsy state turns them off."""
        return None

    def eval_metrics(self, model, tokenizer, state: Any) -> dict:
        """More held-out metrics at every evaluation (the eval loss is always computed)."""
        return {}


# ---------------------------------------------------------------- driver

def fit(task: TrainingTask, model_cfg: ModelConfig, *, model_path: str, adapter: str | None,
        datasets: dict, output_dir: str, run_name: str, stop_at_step: int = 0,
        callbacks: list | None = None, report_every_step: bool = False, items_path: str | None = None) -> dict:
    """Train ``task`` (batch geometry, optimiser, checkpoints from ``task.cfg``; dtype, gradient
    checkpointing and LoRA from ``model_cfg``) on ``datasets["train"]`` with Ray Train + DeepSpeed;
    resume if ``<output_dir>/<run_name>`` holds a checkpoint of an interrupted run.

    ``stop_at_step`` (> 0) pauses the run at that global step (checkpointed); the learning-rate
    schedule still spans the whole run, so a later `fit` without it continues exactly as if never
    stopped. ``callbacks``: Ray Train callbacks for the run's controller (Tune's, in a trial); they
    see the evaluations and checkpoints, or every step with ``report_every_step`` (a round trip
    per step: BENCHMARKS.md, ``python -m bench report``). ``items_path``: an item file
    (`rosepo.model.items`): the model is wrapped with its item tokens, and the projector trains
    and is exported with the model.

    Returns ``metrics`` (the last step's), ``history`` (``[{"step", "loss"}]``, resumed steps
    included), ``eval_history`` (``[{"step", "eval/...": ...}]``), ``resumed_from_step``,
    ``checkpoint_path`` (the latest checkpoint folder) and ``final_model`` (its HF export).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if not isinstance(task, TrainingTask):
        raise ConfigError(f"fit trains a TrainingTask, got {task!r}")
    if "train" not in datasets:
        raise ConfigError("fit needs a 'train' dataset")
    tcfg = task.cfg
    ray_run_dir = Path(output_dir).resolve() / run_name
    resume_from = find_latest_checkpoint(ray_run_dir)
    if resume_from is not None:
        check_resumable(resume_from, datasets["train"].count(),
                         tcfg.num_workers * tcfg.micro_batch_size * tcfg.grad_accum)
    if not is_verbose():
        for ds in datasets.values():  # each worker reads every dataset: one progress bar per worker is noise
            ds.context.enable_progress_bars = False
    resources = {"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": task,
            "model_cfg": model_cfg,
            "model_path": str(model_path),
            "adapter": str(adapter) if adapter else None,
            "items_path": str(items_path) if items_path else None,
            # bf16 is set in the worker, which sees the card (`_train_dtype`).
            "ds_config": deepspeed_config(tcfg, bf16=False),
            "resume_from": str(resume_from) if resume_from else None,
            "stop_at_step": stop_at_step,
            "has_eval": "eval" in datasets,
            "tensorboard_dir": str(ray_run_dir / "tensorboard") if tcfg.tensorboard else None,
            "report_every_step": report_every_step,
            "log_level": logging.getLogger("rosepo").getEffectiveLevel(),
            "console_tty": sys.stderr.isatty(),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(ray_run_dir.parent),
            # A controller failure (the workers could not be placed in time) is retried until
            # ``start_timeout_s`` is spent, then fails the run; running fit again resumes.
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures,
                                                   controller_failure_limit=start_retries(tcfg.start_timeout_s)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=train_logging(),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise worker_error(e) from None
    return _fit_result(result, resume_from)


def start_retries(start_timeout_s: float) -> int:
    """Ray Train's ``controller_failure_limit`` for a stage that waits ``start_timeout_s`` for its
    workers: each try waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray's default 60 s)."""
    per_try = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    return max(0, math.ceil(start_timeout_s / per_try) - 1)


def worker_error(error: Exception) -> Exception:
    """What a failed run raises in the driver: the `RosepoError` a worker raised (the one that
    names most, e.g. the batch's samples), so the console shows rosepo's one line; else Ray's error."""
    found: list[RosepoError] = []
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        while failure is not None and not isinstance(failure, RosepoError):
            failure = failure.__cause__
        if failure is not None:
            found.append(failure)
    return max(found, key=lambda e: len(str(e))) if found else error


def _fit_result(result, resume_from: Path | None) -> dict:
    """`fit`'s return value from Ray's result (rank 0's return value, the last checkpoint)."""
    out = result.return_value or {}
    if out.get("error"):
        raise TrainingError(out["error"])
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else resume_from
    return {
        "metrics": out.get("metrics") or dict(result.metrics or {}),
        "history": out.get("history", []),
        "eval_history": out.get("eval_history", []),
        "resumed_from_step": out.get("resumed_from_step", 0),
        "checkpoint_path": str(checkpoint) if checkpoint else None,
        "final_model": str(checkpoint / HF_EXPORT) if checkpoint else None,
    }


# ---------------------------------------------------------------- worker

def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker: set up model + DeepSpeed, resume, train, checkpoint. Rank 0 returns
    ``{"history", "metrics", "resumed_from_step"}``."""
    import ray.train
    import torch

    task: TrainingTask = config["task"]
    tcfg = task.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _worker_logging(rank, config["log_level"])

    rows = _sorted_rows("train", task.key)
    eval_rows = _sorted_rows("eval", task.key) if config["has_eval"] else []
    global_batch = world * tcfg.micro_batch_size * tcfg.grad_accum
    total = total_steps(len(rows), global_batch, tcfg.epochs, tcfg.max_steps, tcfg.max_epochs)
    stop = min(total, config["stop_at_step"]) if config["stop_at_step"] > 0 else total

    engine, tokenizer = _setup_engine(config, total)
    finetune = tcfg.model_config(config["model_cfg"]).finetune
    peak = gpu_peak_flops() if tcfg.use_gpu and engine.bfloat16_enabled() else None
    flops_per_token = training_flops_per_token(engine.module, finetune)
    start_step, history, eval_history = _resume(engine, config["resume_from"], len(rows), global_batch)
    evaluate = _evaluator(engine, task, tokenizer, eval_rows)
    writer = _tensorboard(config["tensorboard_dir"] if rank == 0 else None)
    bar = _progress(task.name, total, start_step, config["console_tty"]) if rank == 0 else None
    every = logging_interval(tcfg.logging_steps, total)
    metrics: dict = {}
    losses: list[float] = []  # since the last metrics line
    if eval_rows and start_step == 0:
        eval_history.append({"step": 0, **evaluate()})
        _log_scalars(writer, eval_history[-1], 0)
    engine.train()
    error = None
    for step in range(start_step, stop):
        # Per-step seed: dropout noise depends only on (seed, step, rank), so resume is exact.
        torch.manual_seed(tcfg.seed * 1_000_003 + step * 1009 + rank)
        micro = worker_micro_batches(step_rows(step, len(rows), global_batch, tcfg.seed), rank,
                                     tcfg.micro_batch_size, tcfg.grad_accum)
        try:
            metrics = _train_step(engine, task, [[rows[i] for i in idx] for idx in micro], tokenizer.pad_token_id,
                                  step)
        except TrainingError as e:  # on every rank at once: returned, not raised, so Ray Train does not retry
            error = str(e)
            break
        metrics.update(step=step + 1, epoch=(step + 1) * global_batch / len(rows))
        if peak:
            metrics["perf/mfu"] = metrics["perf/tokens_per_second"] * flops_per_token / (peak * world)
        history.append({"step": step + 1, "loss": metrics["loss"]})
        losses.append(metrics["loss"])
        evaluated = bool(eval_rows) and (step + 1 == total or (task.eval_every and (step + 1) % task.eval_every == 0))
        if evaluated:
            scores = evaluate()
            metrics.update(scores)
            eval_history.append({"step": step + 1, **scores})
        _log_scalars(writer, metrics, step + 1)
        if bar is not None:
            bar.set_description(f"{task.name} loss={metrics['loss']:.4f}")
            bar.update(1)
        if rank == 0 and every and ((step + 1) % every == 0 or step + 1 == stop):
            log.info("%s", metrics_line(metrics, losses))
            losses = []
        if step + 1 == stop or (tcfg.checkpoint_every and (step + 1) % tcfg.checkpoint_every == 0):
            state = {"global_step": step + 1, "epoch": metrics["epoch"],
                     "data_position": (step + 1) * global_batch, "num_rows": len(rows),
                     "global_batch": global_batch, "history": history, "eval_history": eval_history}
            _save_checkpoint(engine, tokenizer, state, metrics, rank, finetune)
        elif evaluated or config["report_every_step"]:
            ray.train.report(metrics)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return {"history": history, "eval_history": eval_history, "metrics": metrics,
            "resumed_from_step": start_step, "error": error}


#: Dense bfloat16 tensor-core peak of each GPU, in FLOP/s, by a substring of its name (the first
#: that matches); ``perf/mfu`` divides the step's model FLOP/s by it.
GPU_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                 ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def gpu_peak_flops() -> float | None:
    """`GPU_PEAK_BF16` of this process's CUDA device; None for a card not listed."""
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAK_BF16 if key in name), None)


def training_flops_per_token(model, finetune: str) -> float:
    """Model FLOPs per trained token: 2N forward and 2N for the activations' gradients over the N
    weights outside the embeddings, plus 2N for the weights' own gradients where they train (all
    of them with ``finetune: full``, the adapters' with LoRA). Attention scores and the LM head,
    which runs on the answer positions only, are left out: MFU is slightly understated."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = {id(model.get_input_embeddings().weight)} | ({id(output.weight)} if output is not None else set())
    counted = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()
               if id(p) not in embeddings]
    weights = sum(n for n, _ in counted)
    trained = weights if finetune == "full" else sum(n for n, grad in counted if grad)
    return 4.0 * weights + 2.0 * trained


def metrics_line(metrics: dict, losses: list[float]) -> str:
    """One line of a step's metrics as HF's Trainer logs them, ``{'loss': 0.4123, 'grad_norm': 1.02,
    'learning_rate': 0.0005, ..., 'epoch': 0.12}``: ``loss`` is the mean over ``losses`` (the steps
    since the last line), the rest are the step's own, held-out ``eval/...`` metrics included;
    throughput (``perf/...``) and the step number are left to TensorBoard and the bar."""
    first = ("loss", "grad_norm", "learning_rate")
    rest = sorted(k for k in metrics if k not in first and k not in ("step", "epoch") and not k.startswith("perf/"))
    line = {k: float(f"{metrics[k]:.4g}") for k in (*first, *rest) if k in metrics}
    line["loss"] = float(f"{sum(losses) / len(losses):.4g}")
    line["epoch"] = round(metrics["epoch"], 2)
    return repr(line)


def logging_interval(logging_steps: float, total: int) -> int:
    """Steps between two metrics lines of a run of ``total`` steps (0 = none), as HF's Trainer reads
    ``logging_steps``: below 1, that fraction of ``total`` (at least 1 step); else that many steps."""
    if logging_steps <= 0:
        return 0
    return max(1, math.ceil(logging_steps * total)) if logging_steps < 1 else int(logging_steps)


def _progress(name: str, total: int, start: int, tty: bool):
    """Rank 0's progress from step ``start`` of ``total``: Ray's ``tqdm_ray`` bar, which the driver
    draws, when the driver's stderr is a terminal; else (a log file, where carriage-return redraws
    pile up in one line) a `LineProgress`."""
    if not tty:
        return LineProgress(name, total, start)
    from ray.experimental import tqdm_ray

    # Drawn by the driver: Ray forwards a worker's own tqdm redraws one line each.
    bar = tqdm_ray.tqdm(total=total, desc=name)
    bar.n = start
    return bar


class LineProgress:
    """The progress bar of a console that is no terminal: ``tqdm_ray``'s methods, a ``[rosepo]``
    line (steps, percent, elapsed, time left, the description) each time another fifth of the
    ``total`` steps is done (the metrics lines come every tenth by default; both every tenth made
    a make run's console 82 lines), and none on `close`."""

    def __init__(self, name: str, total: int, start: int = 0, parts: int = 5):
        import time

        self.desc, self.total, self.n, self._start, self._parts = name, total, start, start, parts
        self._t0 = time.monotonic()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        import time

        before, self.n = self.n, self.n + n
        if self.n * self._parts // self.total > before * self._parts // self.total:
            elapsed = time.monotonic() - self._t0
            left = elapsed / (self.n - self._start) * (self.total - self.n)
            log.info("%s: %d/%d steps (%d%%), %s elapsed, %s left", self.desc, self.n, self.total,
                     100 * self.n // self.total, _clock(elapsed), _clock(left))

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour, as tqdm writes times."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _worker_logging(rank: int, level: int) -> None:
    """Worker logging at the driver's ``rosepo`` ``level``: rank 0's records (the metrics lines)
    as ``[rosepo] ...`` on stderr, which Ray forwards to the driver, the other ranks' from WARNING
    up."""
    import sys

    logger = logging.getLogger("rosepo")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[rosepo] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # Ray's root handler in the worker would print each record again
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))


def _tensorboard(folder: str | None):
    """A TensorBoard event writer into ``folder`` (None: no writer)."""
    if folder is None:
        return None
    from tensorboardX import FileWriter

    return FileWriter(folder)


def _log_scalars(writer, metrics: dict, step: int) -> None:
    """A step's metrics as TensorBoard scalars, one event, each tagged with its console name
    (rank 0 holds the writer; None elsewhere or when disabled). Written as a ``Summary`` rather
    than through ``SummaryWriter.add_scalar``, which renames a tag with characters outside
    ``[-/a-zA-Z0-9_.]`` (``eval/hr@1`` to ``eval/hr_1``): a TensorFlow graph's rule for node names, not
    TensorBoard's, which shows ``eval/hr@1`` as it is."""
    if writer is not None:
        from tensorboardX.proto.summary_pb2 import Summary

        writer.add_summary(Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]),
                           step)


def _sorted_rows(name: str, key: str) -> list[dict]:
    """All rows of a Ray Train dataset (this worker's copy), as Python lists, sorted by ``key``."""
    import ray.train

    rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
            for r in ray.train.get_dataset_shard(name).iter_rows()]
    return sorted(rows, key=lambda r: r[key])


def _train_dtype(model_cfg: ModelConfig, use_gpu: bool):
    """The worker's training dtype (`resolve_dtype` on the card it holds); a GPU worker also takes
    rosepo's CUDA settings (`cuda_settings`: TF32, no cuDNN attention)."""
    if use_gpu:
        cuda_settings()
    return resolve_dtype(model_cfg.dtype, use_gpu)


def _setup_engine(config: dict, total: int):
    """Seeded model (+ LoRA unless an adapter is given) wrapped by DeepSpeed with AdamW and the
    warmup + cosine schedule over ``total`` steps; returns (engine, tokenizer).

    Under ZeRO-3 the model is loaded inside DeepSpeed's ``zero.Init`` (transformers'
    `HfDeepSpeedConfig`): each rank materialises only its shard of the weights, so a model larger
    than one GPU loads at all. The LoRA and item-token modules made afterwards are small; DeepSpeed
    partitions them at ``initialize``."""
    import random

    if not config["task"].cfg.use_gpu:
        # DeepSpeed picks its accelerator at import: a CPU worker says so (it finds the CPU by
        # itself, with a warning); a GPU worker lets it find CUDA.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import numpy as np
    import torch

    task: TrainingTask = config["task"]
    model_cfg, tcfg = config["model_cfg"], task.cfg
    dtype = _train_dtype(model_cfg, tcfg.use_gpu)
    ds_config = {**config["ds_config"], "bf16": {**config["ds_config"]["bf16"], "enabled": dtype == torch.bfloat16}}
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)  # the same LoRA initialisation on every rank
    tokenizer = load_tokenizer(config["model_path"])
    zero_init = None
    if tcfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero_init = HfDeepSpeedConfig(ds_config)  # read by from_pretrained while it lives
    model = load_model(config["model_path"], dtype=dtype, adapter=config["adapter"], trainable_adapter=True,
                       gradient_checkpointing=model_cfg.gradient_checkpointing)
    del zero_init
    if config["adapter"] is None:
        model = apply_lora(model, tcfg.model_config(model_cfg))
    model = task.prepare_model(model, config["adapter"])
    if config["items_path"]:  # after LoRA and the task's changes, which expect the HF/PEFT model
        model = attach_items(model, config["items_path"], trainable=True)
    warmup = math.ceil(tcfg.warmup_ratio * total)
    skip_shm_comm_build()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, warmup)),
        config=ds_config,
    )
    return engine, tokenizer


def _stop_if_not_finite(task: TrainingTask, step: int, what: str, value, rows: list[dict], device) -> None:
    """Raise `TrainingError` on every rank when ``value`` is not finite on any rank (``device``:
    where to agree on it, one all-reduce, and to gather the bad batches' ids from every rank; None
    when ``value`` is the same on every rank). Raised before the checkpoint of the step is
    written, so the last checkpoint holds good weights; the worker returns it
    (`train_loop_per_worker`), so Ray Train does not retry what would fail again."""
    import torch

    finite = bool(torch.isfinite(value.detach()).all())
    bad = torch.tensor([0.0 if finite else 1.0], device=device or "cpu", dtype=torch.float32)
    if device is not None:
        torch.distributed.all_reduce(bad)
    if not bad.item():
        return
    ids = [] if finite else [str(r.get(task.key)) for r in rows]
    if device is not None:
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, ids)
        ids = [i for part in parts for i in part]
    raise TrainingError(f"{task.name}: non-finite {what} at step {step + 1}; the batch: {task.key} "
                        f"{', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}. Nothing after the last checkpoint "
                        "was saved. Likely causes: a learning rate too high for the model, bfloat16 overflow "
                        "(try model.dtype: float32), or bad rows")


def _train_step(engine, task: TrainingTask, micro_batches: list[list[dict]], pad_id: int, step: int = 0) -> dict:
    """One optimiser step (number ``step``, from 0) over this worker's micro-batches (DeepSpeed
    accumulates and steps at the boundary); metrics averaged over micro-batches, then over
    workers. A non-finite loss (before its backward) or gradient norm stops the run (`TrainingError`)."""
    import time

    import torch

    t0 = time.perf_counter()
    lr = engine.lr_scheduler.get_last_lr()[0]
    sums: dict = {}
    tokens = samples = 0
    for rows in micro_batches:
        batch = {k: v.to(engine.device) for k, v in task.collate(rows, pad_id).items()}
        loss, task_metrics = task.compute_loss(engine, batch)
        _stop_if_not_finite(task, step, "loss", loss, rows, engine.device)
        engine.backward(loss)
        engine.step()
        for k, v in {"loss": loss, **task_metrics}.items():
            v = torch.as_tensor(v).detach().to(engine.device, torch.float64)
            sums[k] = sums.get(k, 0.0) + v / len(micro_batches)
        tokens += task.num_tokens(batch)
        samples += len(rows)
    keys = sorted(sums)
    world = torch.distributed.get_world_size()
    # One all-reduce for every metric, on the engine's device (NCCL needs CUDA tensors).
    counts = torch.tensor([tokens, samples], dtype=torch.float64, device=engine.device)
    vec = torch.cat([torch.stack([sums[k] / world for k in keys]), counts])
    torch.distributed.all_reduce(vec)
    reduced = vec.tolist()
    elapsed = time.perf_counter() - t0
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:  # the global norm: every rank holds the same value
        _stop_if_not_finite(task, step, "gradient norm", torch.as_tensor(float(grad_norm)),
                            [r for rows in micro_batches for r in rows], None)
    return {**dict(zip(keys, reduced[:-2])),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "learning_rate": lr,
            "perf/tokens_per_second": reduced[-2] / elapsed,
            "perf/samples_per_second": reduced[-1] / elapsed}


def _evaluator(engine, task: TrainingTask, tokenizer, rows: list[dict]):
    """A function computing the held-out metrics of `_evaluate` on ``rows`` (every rank scores
    them all), with the task's own `TrainingTask.eval_metrics` when its `eval_setup` is on."""
    state = task.eval_setup(rows, tokenizer) if rows else None
    task_eval = functools.partial(task.eval_metrics, tokenizer=tokenizer, state=state) if state else None
    return functools.partial(_evaluate, engine, task, rows, task.cfg.micro_batch_size, tokenizer.pad_token_id,
                             task_eval)


def _evaluate(engine, task: TrainingTask, rows: list[dict], micro_batch: int, pad_id: int, task_eval=None) -> dict:
    """Row-weighted means of the task's loss and metrics over ``rows``, and the task's own
    ``task_eval(engine)`` metrics when given, as ``eval/<name>``."""
    import torch

    engine.eval()
    sums: dict = {}
    with torch.no_grad():
        for i in range(0, len(rows), micro_batch):
            chunk = rows[i:i + micro_batch]
            batch = {k: v.to(engine.device) for k, v in task.collate(chunk, pad_id).items()}
            loss, task_metrics = task.compute_loss(engine, batch)
            for k, v in {"loss": loss, **task_metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        more = task_eval(engine) if task_eval else {}
    engine.train()
    return {f"eval/{k}": v for k, v in ({k: v / len(rows) for k, v in sums.items()} | more).items()}


def _resume(engine, resume_from: str | None, num_rows: int,
            global_batch: int) -> tuple[int, list, list]:
    """Load the latest checkpoint (Ray's, else the one found on storage);
    (step, history, eval_history)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint(resume_from)
    if checkpoint is None:
        return 0, [], []
    with checkpoint.as_directory() as d:
        state = check_resumable(Path(d), num_rows, global_batch)
        # Frozen base weights are not in the checkpoint: they come from the base model.
        engine.load_checkpoint(str(Path(d) / DS_SUBDIR), tag=DS_TAG, load_module_strict=False)
    return state["global_step"], list(state["history"]), list(state.get("eval_history", []))


def _save_checkpoint(engine, tokenizer, state: dict, metrics: dict, rank: int, finetune: str) -> None:
    """Every rank: ZeRO shards into a temp folder; rank 0: trainer state + HF export; report."""
    import contextlib
    import tempfile

    import deepspeed
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DS_SUBDIR), tag=DS_TAG, exclude_frozen_parameters=True)
        model = engine.module
        gather = contextlib.nullcontext()
        if engine.zero_optimization_stage() == 3:
            # ZeRO-3 params are partitioned (Size([0]) locally): gather what the export saves.
            saved = [p for p in model.parameters() if finetune == "full" or p.requires_grad]
            gather = deepspeed.zero.GatheredParameters(saved, modifier_rank=None)
        with gather:
            if rank == 0:
                export_model(model, tokenizer, Path(tmp) / HF_EXPORT, merged=False)
        if rank == 0:
            (Path(tmp) / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

