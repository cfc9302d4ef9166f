"""``rosepo tune``: hyperparameter search over RosePO alignment with Ray Tune (ASHA early stopping).

A search is a YAML file (`rosepo.experiments.search.load_search`): a space of dotted ``align.*`` config keys mapped to
distributions, the metric to optimise (an ``eval/...`` key of the align task's held-out
evaluation: ``eval/hr@1`` by default), the scheduler, the search algorithm and the trials'
failure budget. `run_tune`:

1. builds (or reuses) the pairs ONCE in the driver through the pipeline, so every trial trains
   on the same pairs and precomputed reference log-probs (ε is computed from the pairs' oracle
   scores at training time, and ``align.strategies`` selects pairs, so smoothing and the strategy
   mix are searchable without rebuilding pairs; keys outside ``align`` are refused);
2. runs one Tune trial per sampled config: `rosepo.experiments.trial.tune_trial` applies the values to
   the run config and calls `rosepo.train.loop.fit` (a Ray Train V2 TorchTrainer + DeepSpeed) under the trial's
   folder; every evaluation is reported to Tune, which is one Tune iteration, so ASHA's
   ``max_t`` / ``grace_period`` count evaluations. A trial that raises is restarted up to
   ``max_failures`` times (its ``fit`` resumes from its last align checkpoint, if any);
3. writes (`rosepo.experiments.results`) ``best.yaml`` (the whole run config with the best trial's values, loadable by
   `rosepo.config.load_config`), ``trials.csv``, ``trials.md`` and ``trials.png`` into the
   experiment folder ``<storage>/<name>``; each trial's TensorBoard logs are under
   ``<storage>/<name>/trials/<trial id>/align/tensorboard``.

Resume: ``resume=True`` restores an interrupted experiment (``Tuner.restore``); finished trials
are kept, unfinished ones restart (their ``fit`` resumes from the trial's last align checkpoint
when one was written, see ``align.checkpoint_every``).

Not supported: Tune checkpoints of the trial itself (trials restart through ``fit``'s own
resume), population-based schedulers, multi-metric objectives, searching keys that change the
pairs or the SFT model (build those per setting and run one search each).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray.tune import Callback

from rosepo import runtime
from rosepo.config import RunConfig, load_config
from rosepo.errors import ConfigError
from rosepo.experiments.results import write_results
from rosepo.experiments.search import (
    check_search,
    eval_reports,
    load_search,
    search_algorithm,
    search_space,
    validate_search,
)
from rosepo.experiments.trial import FAULT_ENV, TRIAL_RESOURCES, tune_trial
from rosepo.layout import base_model_path, read_pairs, sft_model_and_adapter
from rosepo.model.factory import load_tokenizer
from rosepo.pipeline import run_folder, run_stage, stage_dir
from rosepo.storage import confined
from rosepo.train.schedule import total_steps

log = logging.getLogger(__name__)


def prepare_inputs(run_cfg: RunConfig) -> dict:
    """Build (or reuse) the pairs and everything before them through the pipeline, once;
    return what every trial reads: ``pairs``, ``model_path``, ``adapter``, ``pad_id``."""
    pairs = run_stage(run_cfg, "pairs")
    model_path, adapter = sft_model_and_adapter(stage_dir(run_cfg, "sft"), base_model_path(stage_dir(run_cfg, "model")))
    return {"pairs": str(pairs), "model_path": model_path, "adapter": adapter,
            "pad_id": load_tokenizer(model_path).pad_token_id}


class Progress(Callback):
    """One log line per finished, failed or restarted trial (jobs' logs; the resume test waits
    for "finished")."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info("trial %s finished after %s evaluations", trial.trial_id,
                 trial.last_result.get("training_iteration", 0))

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.info("trial %s failed, restarting (failure %s of at most %s)", trial.trial_id, trial.num_failures,
                 trial.max_failures)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.info("trial %s failed for good after %s failure(s); see %s", trial.trial_id, trial.num_failures,
                 trial.path)


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id, as our ``trials/<id>`` folder (the default name holds
    the config values and a date)."""
    return trial.trial_id


def run_tune(run_cfg: RunConfig, search: dict, *, storage: str | Path, name: str, resume: bool = False,
             inputs: dict | None = None) -> dict:
    """Run (or, with ``resume``, continue) the search ``search`` over ``run_cfg``; write the
    results into ``<storage>/<name>`` and return ``{"experiment", "best", "best_metric",
    "best_config", "trials", "csv", "md", "plot"}``.

    ``inputs`` (see `prepare_inputs`) skips the pipeline when pairs were built elsewhere.
    """
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search = validate_search(search)
    check_search(run_cfg, search, ray.cluster_resources(), can_grow=runtime.cluster_can_grow())
    experiment = confined(storage, name)  # a --name leading outside the run folder is refused
    restorable = ray.tune.Tuner.can_restore(str(experiment))
    if restorable and not resume:
        raise ConfigError(f"Tune experiment {experiment} exists; pass resume (--resume) to continue "
                          "it, or choose another name")
    inputs = inputs or prepare_inputs(run_cfg)
    a = run_cfg.align
    num_train = read_pairs(inputs["pairs"], "train").num_rows
    reports = eval_reports(total_steps(num_train, a.num_workers * a.micro_batch_size * a.grad_accum,
                                       a.epochs, a.max_steps, a.max_epochs), a.eval_every)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trial, base=run_cfg, inputs=inputs, metric=search["metric"],
                                 experiment=str(experiment), fault=os.environ.get(FAULT_ENV)),
        TRIAL_RESOURCES)
    if restorable:
        tuner = ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True)
    else:
        sched = search["scheduler"]
        scheduler = FIFOScheduler() if sched["name"] == "fifo" else ASHAScheduler(
            time_attr="training_iteration", max_t=sched["max_t"] or reports,
            grace_period=sched["grace_period"], reduction_factor=sched["reduction_factor"])
        tuner = ray.tune.Tuner(
            trainable,
            param_space=search_space(search["space"]),
            tune_config=ray.tune.TuneConfig(
                metric=search["metric"], mode=search["mode"], scheduler=scheduler,
                search_alg=search_algorithm(search["search_alg"], search["metric"], search["mode"]),
                num_samples=search["num_samples"], max_concurrent_trials=search["max_concurrent_trials"],
                trial_dirname_creator=_trial_dirname),
            run_config=ray.tune.RunConfig(name=name, storage_path=str(experiment.parent),
                                          failure_config=ray.tune.FailureConfig(max_failures=search["max_failures"]),
                                          callbacks=[Progress()], verbose=1))
    grid = tuner.fit()
    return write_results(run_cfg, search, grid, experiment)


def tune_command(config: str | None, search_path: str, overrides: list[str], *, name: str = "tune",
                 resume: bool = False) -> dict:
    """``rosepo tune`` and ``jobs/tune.py``: load the run config (plus overrides) and the search,
    start or join Ray (``ray_address``), run or resume the search into
    ``<storage>/<run name>/<name>``, and log where the dashboards and results are."""
    cfg = load_config(config, overrides)
    search = load_search(search_path)
    check_search(cfg, search)  # before Ray starts; the cluster's resources are checked after
    dashboard = runtime.init_ray(cfg.ray_address)
    runtime.check_gpus(cfg.gpu_demand())
    experiment = confined(run_folder(cfg), name)
    log.info("Ray dashboard: %s (Jobs, Cluster, Logs)", dashboard or "off")
    log.info("TensorBoard:   tensorboard --logdir %s", experiment)
    out = run_tune(cfg, search, storage=run_folder(cfg), name=name, resume=resume)
    log.info("best %s = %.4g with %s", search["metric"], out["best_metric"], out["best"])
    for key in ("best_config", "md", "csv", "plot"):
        log.info("  %-11s %s", key, out[key])
    return out
