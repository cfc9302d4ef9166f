"""Search files of ``rosepo tune``: the keys, defaults and distributions of a search YAML, its
checks against a run config, and its translation to Ray Tune's space and search algorithm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rosepo.config import STRATEGY_NAMES, PairsConfig, RunConfig, apply_values, read_yaml
from rosepo.errors import ConfigError

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
#: Metrics of greedy answers on the valid slice (`rosepo.train.align.AlignTask.eval_metrics`): not made
#: under ZeRO-3. ``eval/rank/...`` needs only the slice.
GREEDY_METRICS = ("eval/hr@1", "eval/valid_ratio", "eval/hr@1_valid")


def load_search(path: str | Path) -> dict:
    """Read and validate a search YAML; return it with defaults filled in.

    Raises `ConfigError` for a file `read_yaml` refuses (a key given twice, no settings), and
    naming the key for unknown keys (top level, scheduler, or a space key
    that is not a `RunConfig` field), malformed distributions, values a config would refuse
    (checked at both ends of a range and for every choice, against the default config), and a
    search algorithm that is not installed.
    """
    data = read_yaml(path, "search file", "give at least its space (see configs/search/rosepo-small.yaml)")
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
        # Each value alone, on the defaults with every strategy drawn (so align.strategies is judged
        # by its names); `check_search` judges them against the run's config.
        every_strategy = RunConfig(pairs=PairsConfig(strategies={s: 1.0 for s in STRATEGY_NAMES}))
        for value in _distribution_values(key, dist):
            apply_values(every_strategy, {key: value})
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


def check_search(run_cfg: RunConfig, search: dict, cluster: dict | None = None, *, can_grow: bool = False) -> None:
    """Refuse, before any trial runs, a search whose trials cannot run or report its metric.

    Every value of the space must be valid for ``run_cfg``; the metric's recommendation slice
    must be on (``align.eval_rec_samples``), greedy metrics need ZeRO < 3; one trial's Train
    workers (``align.num_workers`` x ``align.cpus_per_worker`` CPUs, one GPU each with
    ``use_gpu``) must fit in ``cluster`` (Ray's total resources) when given. A cluster that
    ``can_grow`` (joined by address: an autoscaler may add nodes) is only warned about: its
    trials queue until nodes come, each for up to ``align.start_timeout_s``.
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
        if short and can_grow:
            logging.getLogger("rosepo").warning(
                "one trial needs %s: its trials wait for the autoscaler to add nodes (up to align.start_timeout_s, "
                "%g s, each)", " and ".join(short), a.start_timeout_s)
        elif short:
            raise ConfigError(f"one trial needs {' and '.join(short)}: lower align.num_workers or "
                              "align.cpus_per_worker (fractions are fine), or add nodes")
