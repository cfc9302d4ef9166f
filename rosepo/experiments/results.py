"""The results of a ``rosepo tune`` search: one row per trial, the best trial, ``best.yaml``,
``trials.csv``, ``trials.md`` and ``trials.png``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from rosepo.config import RunConfig, apply_values
from rosepo.errors import ConfigError
from rosepo.experiments.plotting import pyplot, save_figure
from rosepo.experiments.trial import STARTS
from rosepo.storage import atomic_write_text
from rosepo.train.schedule import finished_state

#: Files written into the experiment folder.
BEST, TRIALS_CSV, TRIALS_MD, PLOT = "best.yaml", "trials.csv", "trials.md", "trials.png"
#: Metrics shown for every trial in the summaries, besides the searched one.
SUMMARY = ("eval/hr@1", "eval/valid_ratio", "eval/rank/hr@1", "eval/rewards/accuracies", "eval/loss")
#: Config keys always shown in the results and plotted against the metric.
PLOTTED = ("align.beta", "align.eps_max")

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
    plt = pyplot()
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
    save_figure(fig, path, dpi=100)
