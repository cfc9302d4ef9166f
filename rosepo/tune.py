"""Hyperparameter search over RosePO alignment with Ray Tune (ASHA early stopping).

A search is a YAML file (`load_search`): a space of dotted ``align.*`` config keys mapped to
distributions, the metric to optimise (an ``eval/...`` key of the align task's held-out
evaluation: ``eval/hr@1`` by default), the scheduler, the search algorithm and the trials'
failure budget. `run_tune`:

1. builds (or reuses) the pairs ONCE in the driver through the pipeline, so every trial trains
   on the same pairs and precomputed reference log-probs (ε is computed from the pairs' oracle
   scores at training time, and ``align.strategies`` selects pairs, so smoothing and the strategy
   mix are searchable without rebuilding pairs; keys outside ``align`` are refused);
2. runs one Tune trial per sampled config: `tune_trial` applies the values to the run config and
   calls `rosepo.train.loop.fit` (a Ray Train V2 TorchTrainer + DeepSpeed) under the trial's
   folder; every evaluation is reported to Tune, which is one Tune iteration, so ASHA's
   ``max_t`` / ``grace_period`` count evaluations. A trial that raises is restarted up to
   ``max_failures`` times (its ``fit`` resumes from its last align checkpoint, if any);
3. writes ``best.yaml`` (the whole run config with the best trial's values, loadable by
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

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

from rosepo.config import RunConfig, _build, set_dotted
from rosepo.errors import ConfigError
from rosepo.storage import atomic_path, atomic_write_text

#: Keys of a search YAML and their defaults.
SEARCH_DEFAULTS: dict[str, Any] = {
    "num_samples": 4,
    "max_concurrent_trials": 1,
    "metric": "eval/hr@1",
    "mode": "max",
    "scheduler": {"name": "asha"},
    "search_alg": "random",
    "max_failures": 1,
    "space": {},
}
SCHEDULER_DEFAULTS = {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 0}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
#: Per-trial resource of the trial function itself (it only waits on its TorchTrainer, whose
#: workers ask for the CPUs). ``{"CPU": 0}`` is refused by Tune, hence a small memory request.
TRIAL_RESOURCES = {"memory": 64 * 1024 ** 2}
#: Files written into the experiment folder.
BEST, TRIALS_CSV, TRIALS_MD, PLOT = "best.yaml", "trials.csv", "trials.md", "trials.png"
#: Metrics shown for every trial in the summaries, besides the searched one.
SUMMARY = ("eval/hr@1", "eval/valid_ratio", "eval/rank/hr@1", "eval/rewards/accuracies", "eval/loss")
#: Config keys always shown in the results and plotted against the metric.
PLOTTED = ("align.beta", "align.eps_max")
#: Metrics of greedy answers on the valid slice (`rosepo.train.align.eval_metrics`): not made
#: under ZeRO-3. ``eval/rank/...`` needs only the slice.
GREEDY_METRICS = ("eval/hr@1", "eval/valid_ratio", "eval/hr@1_valid")
#: Fault injection (tests): when this variable names a file that does not exist in the
#: driver's environment, the first trial to start creates it and raises once.
FAULT_ENV = "ROSEPO_TUNE_FAULT"
#: A trial's start count, in its folder (restarts = starts - 1).
STARTS = "starts"


# ---------------------------------------------------------------- search files (pure)

def load_search(path: str | Path) -> dict:
    """Read and validate a search YAML; return it with defaults filled in.

    Raises `ConfigError` naming the key for unknown keys (top level, scheduler, or a space key
    that is not a `RunConfig` field), malformed distributions, values a config would refuse
    (checked at both ends of a range and for every choice, against the default config), and a
    search algorithm that is not installed.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"search file {p}: expected a mapping at the top level")
    return validate_search(data)


def validate_search(data: dict) -> dict:
    """`load_search` on already-parsed data."""
    unknown = sorted(set(data) - set(SEARCH_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown search key(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(SEARCH_DEFAULTS)}")
    search = {**SEARCH_DEFAULTS, **data}
    sched = search["scheduler"] or {}
    if not isinstance(sched, dict) or set(sched) - set(SCHEDULER_DEFAULTS):
        raise ConfigError(f"search key 'scheduler' must be a mapping with keys {', '.join(SCHEDULER_DEFAULTS)}")
    search["scheduler"] = {**SCHEDULER_DEFAULTS, **sched}
    if search["scheduler"]["name"] not in ("asha", "fifo"):
        raise ConfigError("search key 'scheduler.name' must be 'asha' or 'fifo'")
    if search["mode"] not in ("max", "min"):
        raise ConfigError("search key 'mode' must be 'max' or 'min'")
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", 0)):
        if not isinstance(search[key], int) or isinstance(search[key], bool) or search[key] < low:
            raise ConfigError(f"search key {key!r} must be an integer >= {low}")
    if not isinstance(search["metric"], str) or not search["metric"]:
        raise ConfigError("search key 'metric' must be a metric name such as eval/hr@1")
    search_algorithm(search["search_alg"], search["metric"], search["mode"])  # installed?
    if not isinstance(search["space"], dict) or not search["space"]:
        raise ConfigError("search key 'space' must map config keys (align.beta) to distributions")
    for key, dist in search["space"].items():
        if not str(key).startswith("align."):
            raise ConfigError(f"search space key {key!r}: only align.* keys can be searched, since "
                              "every trial trains on the same pairs and SFT model; build those per "
                              "setting and run one search each")
        for value in _distribution_values(key, dist):
            apply_values(RunConfig(), {key: value})
    return search


def _distribution_values(key: str, dist: Any) -> list:
    """The values of a distribution a config must accept: range ends, or every choice."""
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"search space key {key!r}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                          f"got {dist!r}")
    kind, args = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space key {key!r}: {kind} needs a non-empty list")
        return args
    ok = (isinstance(args, list) and len(args) == 2
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) and args[0] < args[1])
    if not ok or (kind == "loguniform" and args[0] <= 0):
        raise ConfigError(f"search space key {key!r}: {kind} needs [low, high] with low < high"
                          + (" and low > 0" if kind == "loguniform" else ""))
    return [float(a) for a in args]


def apply_values(run_cfg: RunConfig, values: dict) -> RunConfig:
    """``run_cfg`` with dotted-key ``values`` set (other keys, e.g. Tune's, are refused),
    type-checked and validated like a loaded config; `ConfigError` names a bad key."""
    data = run_cfg.to_dict()
    for key, value in values.items():
        try:
            set_dotted(data, key, value, create=False)
        except ConfigError as e:
            raise ConfigError(f"search space key {key!r}: {e}") from None
    return _build(RunConfig, data).validate()


def search_space(space: dict) -> dict:
    """The validated ``space`` as Ray Tune sampling objects (keys kept dotted)."""
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    out = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        if kind in make:
            out[key] = make[kind](*args)
        else:
            out[key] = tune.choice(args) if kind == "choice" else tune.grid_search(args)
    return out


def search_algorithm(name: str, metric: str, mode: str):
    """None for ``random`` (Tune's variant generator, which also expands grids), else an
    Optuna/HyperOpt searcher; `ConfigError` when its package is not installed."""
    if name == "random":
        return None
    if name not in ("optuna", "hyperopt"):
        raise ConfigError(f"search key 'search_alg' must be random, optuna or hyperopt, got {name!r}")
    try:
        if name == "optuna":
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch as cls
        else:
            import hyperopt  # noqa: F401
            from ray.tune.search.hyperopt import HyperOptSearch as cls
    except ImportError:
        raise ConfigError(f"search_alg {name!r} needs the {name} package (pip install {name}); "
                          "or use search_alg: random") from None
    return cls(metric=metric, mode=mode)


def eval_reports(total: int, eval_every: int) -> int:
    """Evaluations `fit` reports over ``total`` steps: every ``eval_every`` steps and the last
    (the step-0 evaluation is logged, not reported)."""
    return len({s for s in range(1, total + 1) if s == total or (eval_every and s % eval_every == 0)})


# ---------------------------------------------------------------- trials (run in Tune actors)

def _eval_report_callback_class():
    """A Train V2 callback forwarding to Tune only the reports that carry the metric (the
    evaluation steps): Tune's strict metric check refuses results without it, and one Tune
    iteration per evaluation is what ASHA's rungs should count."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    EvalReportCallback.__module__, EvalReportCallback.__qualname__ = __name__, "EvalReportCallback"
    return EvalReportCallback


def __getattr__(name: str):
    # The callback class subclasses Ray's, so it is made on first use (Ray is a heavy import)
    # and kept as a module attribute: pickled by reference into the Train controller (a class
    # pickled by value there fails to serialise).
    if name == "EvalReportCallback":
        globals()[name] = _eval_report_callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tune_trial(config: dict, *, base: RunConfig, inputs: dict, metric: str, experiment: str,
               fault: str | None = None) -> None:
    """One Tune trial: ``base`` with the trial's values, aligned with `fit` on the shared pairs
    (``align.strategies`` of the train pairs, all valid pairs) into
    ``<experiment>/trials/<trial id>/align`` (checkpoints, TensorBoard; a restarted trial
    resumes from there), evaluations reported to Tune. A trial whose training had finished
    (the driver died before Tune recorded it) only reports its evaluations again.

    ``fault``: a file path; when it does not exist, this trial creates it and raises (`FAULT_ENV`).
    """
    import ray.tune

    from rosepo.train.align import fit_align

    cfg = apply_values(base, config)
    out_dir = Path(experiment) / "trials" / ray.tune.get_context().get_trial_id()
    if _replay_finished(out_dir / "align", cfg.align):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    starts = out_dir / STARTS
    starts.write_text(str(int(starts.read_text()) + 1 if starts.is_file() else 1))
    if fault:
        try:
            os.close(os.open(fault, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            raise RuntimeError(f"fault injected by {FAULT_ENV} ({fault})")
    fit_align(cfg, inputs["pairs"], inputs["model_path"], inputs["adapter"], str(out_dir), pad_id=inputs["pad_id"],
              callbacks=[sys.modules[__name__].EvalReportCallback(metric)])


def finished_state(run_dir: Path, align) -> dict | None:
    """The trainer state of a trial's align run when it trained all its steps, else None."""
    import json

    from rosepo.train.loop import TRAINER_STATE, find_latest_checkpoint, total_steps

    checkpoint = find_latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    total = total_steps(state["num_rows"], state["global_batch"], align.epochs, align.max_steps)
    return state if state["global_step"] >= total else None


def _replay_finished(run_dir: Path, align) -> bool:
    """When the trial's align run already finished (killed driver: Tune had not yet recorded
    the trial as done), report its evaluations to Tune again instead of retraining; True if so."""
    import ray.tune

    state = finished_state(run_dir, align)
    for evaluation in (state or {}).get("eval_history", []):
        if evaluation["step"] > 0:  # fit logs step 0 but does not report it
            ray.tune.report(evaluation)
    return state is not None


# ---------------------------------------------------------------- driver

def prepare_inputs(run_cfg: RunConfig) -> dict:
    """Build (or reuse) the pairs and everything before them through the pipeline, once;
    return what every trial reads: ``pairs``, ``model_path``, ``adapter``, ``pad_id``."""
    from rosepo.model.factory import load_tokenizer
    from rosepo.pipeline import base_model_path, run_stage, sft_model, stage_dir

    pairs = run_stage(run_cfg, "pairs")
    model_path, adapter = sft_model(stage_dir(run_cfg, "sft"), base_model_path(stage_dir(run_cfg, "model")))
    return {"pairs": str(pairs), "model_path": model_path, "adapter": adapter,
            "pad_id": load_tokenizer(model_path).pad_token_id}


def _progress_callback():
    """A Tune callback printing one line per finished, failed or restarted trial (jobs' logs;
    the resume test waits for "finished")."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"[rosepo] trial {trial.trial_id} finished after "
                  f"{trial.last_result.get('training_iteration', 0)} evaluations", flush=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"[rosepo] trial {trial.trial_id} failed, restarting "
                  f"(failure {trial.num_failures} of at most {trial.max_failures})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[rosepo] trial {trial.trial_id} failed for good after {trial.num_failures} "
                  f"failure(s); see {trial.path}", flush=True)

    return Progress()


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id, as our ``trials/<id>`` folder (the default name holds
    the config values and a date)."""
    return trial.trial_id


def check_search(run_cfg: RunConfig, search: dict, cluster: dict | None = None) -> None:
    """Refuse, before any trial runs, a search whose trials cannot run or report its metric.

    Every value of the space must be valid for ``run_cfg``; the metric's recommendation slice
    must be on (``align.eval_rec_samples``), greedy metrics need ZeRO < 3; one trial's Train
    workers (``align.num_workers`` x ``align.cpus_per_worker`` CPUs, one GPU each with
    ``use_gpu``) must fit in ``cluster`` (Ray's total resources) when given.
    """
    for key, dist in search["space"].items():
        for value in _distribution_values(key, dist):
            apply_values(run_cfg, {key: value})
    a, metric = run_cfg.align, search["metric"]
    if (metric in GREEDY_METRICS or metric.startswith("eval/rank/")) and a.eval_rec_samples == 0:
        raise ConfigError(f"metric {metric} is computed on the valid slice, which align.eval_rec_samples=0 "
                          "turns off; set it > 0 or optimise a pair metric (eval/rewards/accuracies)")
    if metric in GREEDY_METRICS and a.zero_stage == 3:
        raise ConfigError(f"metric {metric} comes from greedy decoding, which the align evaluation skips "
                          "under ZeRO-3; optimise eval/rank/hr@1 or use align.zero_stage 2")
    if cluster is not None:
        need = {"CPU": a.num_workers * a.cpus_per_worker, "GPU": a.num_workers if a.use_gpu else 0}
        short = [f"{need[r]:g} {r}s (the cluster has {cluster.get(r, 0):g})" for r in need
                 if need[r] > cluster.get(r, 0)]
        if short:
            raise ConfigError(f"one trial needs {' and '.join(short)}: lower align.num_workers or "
                              "align.cpus_per_worker (fractions are fine), or add nodes")


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

    from rosepo.pairs.build import read_pairs
    from rosepo.train.loop import total_steps

    search = validate_search(search)
    check_search(run_cfg, search, ray.cluster_resources())
    experiment = Path(storage).resolve() / name
    restorable = ray.tune.Tuner.can_restore(str(experiment))
    if restorable and not resume:
        raise ConfigError(f"Tune experiment {experiment} exists; pass resume (--resume) to continue "
                          "it, or choose another name")
    inputs = inputs or prepare_inputs(run_cfg)
    a = run_cfg.align
    num_train = read_pairs(inputs["pairs"], "train").num_rows
    reports = eval_reports(total_steps(num_train, a.num_workers * a.micro_batch_size * a.grad_accum,
                                       a.epochs, a.max_steps), a.eval_every)
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
                                          callbacks=[_progress_callback()], verbose=1))
    grid = tuner.fit()
    return write_results(run_cfg, search, grid, experiment)


def tune_command(config: str | None, search_path: str, overrides: list[str], *, name: str = "tune",
                 resume: bool = False, log=print) -> dict:
    """``rosepo tune`` and ``jobs/tune.py``: load the run config (plus overrides) and the search,
    start or join Ray (``ray_address``), run or resume the search into
    ``<storage>/<run name>/<name>``, and log where the dashboards and results are."""
    from rosepo.config import load_config
    from rosepo.pipeline import run_dir
    from rosepo.train.raysetup import init_ray

    cfg = load_config(config, overrides)
    search = load_search(search_path)
    check_search(cfg, search)  # before Ray starts; the cluster's resources are checked after
    dashboard = init_ray(cfg.ray_address)
    experiment = run_dir(cfg) / name
    log(f"[rosepo] Ray dashboard: {dashboard or 'off'} (Jobs, Cluster, Logs)")
    log(f"[rosepo] TensorBoard:   tensorboard --logdir {experiment}")
    out = run_tune(cfg, search, storage=run_dir(cfg), name=name, resume=resume)
    log(f"[rosepo] best {search['metric']} = {out['best_metric']:.4g} with {out['best']}")
    for key in ("best_config", "md", "csv", "plot"):
        log(f"[rosepo]   {key:11s} {out[key]}")
    return out


# ---------------------------------------------------------------- results

def trial_rows(run_cfg: RunConfig, search: dict, grid, experiment: Path) -> list[dict]:
    """One row per trial: id, config values (space keys and `PLOTTED`), last metric and the
    other `SUMMARY` metrics (NaN when not reported), status (``completed``, ``stopped early``
    by the scheduler, ``error`` once its failures exceed ``max_failures``), reported
    evaluations, and restarts (after a failure, or of a trial an interrupted search left
    unfinished)."""
    keys = list(dict.fromkeys([*search["space"], *PLOTTED]))
    shown = list(dict.fromkeys([search["metric"], *SUMMARY]))
    rows = []
    for r in grid:
        cfg = apply_values(run_cfg, {k: v for k, v in r.config.items() if k in search["space"]})
        metrics = dict(r.metrics or {})
        frame = r.metrics_dataframe
        if search["metric"] not in metrics and frame is not None and search["metric"] in frame:
            # A trial restored finished can come back without its last result: read its log.
            last = frame.dropna(subset=[search["metric"]]).tail(1)
            metrics.update(last.iloc[0].to_dict() if len(last) else {})
        row = {"trial_id": metrics.get("trial_id") or Path(r.path).name}
        trial_dir = experiment / "trials" / row["trial_id"]
        # Trained to the end, or not (the scheduler stopped it): a restarted trial reports
        # only the evaluations after its checkpoint, so Tune's iteration count cannot tell.
        done = finished_state(trial_dir / "align", cfg.align) is not None
        status = "error" if r.error else "completed" if done else "stopped early"
        row.update({k: _get(cfg, k) for k in keys})
        row.update({m: metrics.get(m, math.nan) for m in shown})
        starts = trial_dir / STARTS
        row.update({"status": status, "evaluations": int(metrics.get("training_iteration", 0)),
                    "restarts": max(0, int(starts.read_text()) - 1) if starts.is_file() else 0})
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def _get(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def best_row(rows: list[dict], metric: str, mode: str) -> dict:
    """The row with the best finite metric (``mode`` max or min); `ConfigError` when none has one."""
    scored = [r for r in rows if isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
    if not scored:
        raise ConfigError(f"no trial reported {metric!r}; check the metric name and that the pairs "
                          "have a valid split (eval)")
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def write_results(run_cfg: RunConfig, search: dict, grid, experiment: Path) -> dict:
    """Write best.yaml, trials.csv, trials.md and trials.png into ``experiment``."""
    import yaml

    metric = search["metric"]
    rows = trial_rows(run_cfg, search, grid, experiment)
    best = best_row(rows, metric, search["mode"])
    values = {k: best[k] for k in search["space"]}
    atomic_write_text(experiment / BEST, f"# best trial {best['trial_id']}: {metric} = {best[metric]}\n"
                      + yaml.safe_dump(apply_values(run_cfg, values).to_dict(), sort_keys=False))
    columns = list(rows[0])
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: _cell(r[c]) for c in columns} for r in rows)
    atomic_write_text(experiment / TRIALS_CSV, table.getvalue())
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(experiment / TRIALS_MD, "\n".join(md) + "\n")
    plot_trials(rows, metric, experiment / PLOT)
    return {"experiment": str(experiment), "best": values, "best_metric": best[metric],
            "best_config": str(experiment / BEST), "trials": rows, "csv": str(experiment / TRIALS_CSV),
            "md": str(experiment / TRIALS_MD), "plot": str(experiment / PLOT)}


def _cell(v: Any) -> Any:
    """A CSV cell: lists (``align.strategies``) joined with ``+``, the rest as is."""
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(_cell(v))


def plot_trials(rows: list[dict], metric: str, path: Path) -> None:
    """Two panels: the final metric against ``align.beta`` (log axis) and ``align.eps_max``;
    trials stopped early are hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, key in zip(axes, PLOTTED):
        for early in (False, True):
            pts = [(r[key], r[metric]) for r in rows if (r["status"] == "stopped early") == early]
            if pts:
                ax.scatter(*zip(*pts), facecolors="none" if early else "C0", edgecolors="C0",
                           label="stopped early" if early else "completed")
        ax.set_xlabel(key)
        if key == "align.beta":
            ax.set_xscale("log")
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
