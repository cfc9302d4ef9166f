"""The outputs of ``rosepo compare``: aggregation over seeds, ``table.md``, ``results.json`` and
the two plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rosepo.config import RunConfig
from rosepo.eval.evaluate import TABLE_METRICS, markdown_table
from rosepo.eval.metrics import mean_std
from rosepo.experiments.methods import METHODS, PAIR_BUILDS, seeds
from rosepo.experiments.plotting import pyplot, save_figure
from rosepo.layout import read_pairs
from rosepo.pairs.smoothing import smoothing_eps
from rosepo.storage import atomic_write_text, read_manifest

#: Output files of a comparison.
TABLE, RESULTS, METRICS_PNG, EPS_PNG = "table.md", "results.json", "metrics.png", "eps.png"


def aggregate(per_seed: list[dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """Per metric: ``mean``, ``std`` (sample std, ddof 1; 0 for one value) and ``n`` over the
    seeds where it is defined (a number, not NaN/None: e.g. ``pop/percentile_rec`` is
    undefined when no answer is valid); mean and std are None when no seed defines it."""
    out = {}
    for m in metrics:
        values = [r[m] for r in per_seed if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
        mean, std = mean_std(values) if values else (None, None)
        out[m] = {"mean": mean, "std": std, "n": len(values)}
    return out


def format_cell(agg: dict, seeds_run: int) -> str:
    """``mean ± std`` with 3 decimals; ``(n=k)`` when only k of the seeds define the metric."""
    if agg["n"] == 0:
        return "n/a"
    text = f"{agg['mean']:.3f} ± {agg['std']:.3f}"
    return text if agg["n"] == seeds_run else f"{text} (n={agg['n']})"


def table_rows(baselines: dict[str, dict], methods: dict[str, list[dict]]) -> dict[str, dict]:
    """Rows for `rosepo.eval.evaluate.markdown_table`: a ``seeds`` column and the table metrics;
    baselines as single values ("1, deterministic"), methods as mean ± std over their seeds."""
    rows: dict[str, dict] = {name: {"seeds": "1 (deterministic)", **r} for name, r in baselines.items()}
    for name, per_seed in methods.items():
        agg = aggregate(per_seed, TABLE_METRICS)
        rows[name] = {"seeds": str(len(per_seed)), **{m: format_cell(a, len(per_seed)) for m, a in agg.items()}}
    return rows


def write_summary(cfg: RunConfig, out: Path, baselines: dict[str, dict], cells: dict[str, list[dict]],
                  upstream: dict) -> dict:
    """``table.md``, ``results.json``, ``metrics.png`` and ``eps.png`` into ``out``, each atomically."""
    per_seed = {m: [c["metrics"] for c in cs] for m, cs in cells.items()}
    samples = read_manifest(out / "baselines" / "sft")["samples"]  # every evaluation's samples
    header = (f"Split `{cfg.eval.split}` ({samples} samples); trained methods: mean ± std over their seeds "
              f"({', '.join(map(str, seeds(cfg)))}), {upstream['steps']} alignment steps each; "
              "baselines are deterministic (one value).\n\n")
    table = header + markdown_table(table_rows(baselines, per_seed), ("seeds", *TABLE_METRICS))
    atomic_write_text(out / TABLE, table)
    results = {
        "split": cfg.eval.split, "samples": samples, "seeds": seeds(cfg), "align_steps": upstream["steps"],
        "baselines": baselines,
        "methods": {m: {"definition": METHODS[m].text, "pairs": METHODS[m].pairs, "overrides": METHODS[m].align,
                        "per_seed": {str(c["seed"]): c["metrics"] for c in cs},
                        "aggregate": aggregate(per_seed[m], tuple(cs[0]["metrics"]) if cs else ()),
                        "align_seconds": [c["align_seconds"] for c in cs], "eps": [c["eps"] for c in cs]}
                    for m, cs in cells.items()},
        "pairs": {b: str(p) for b, p in upstream["pairs"].items()},
        "pair_builds": PAIR_BUILDS, "config": cfg.to_dict(),
    }
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2, sort_keys=True, allow_nan=False))
    plot_metrics(baselines, per_seed, TABLE_METRICS, out / METRICS_PNG)
    plot_eps(cfg, upstream["pairs"], out / EPS_PNG)
    return {"table": str(out / TABLE), "results": str(out / RESULTS), "metrics_png": str(out / METRICS_PNG),
            "eps_png": str(out / EPS_PNG), "dir": str(out)}


def plot_metrics(baselines: dict[str, dict], per_seed: dict[str, list[dict]], metrics: tuple[str, ...],
                 path: Path) -> None:
    """One bar chart per metric in a grid: a bar per method (baselines grey, mean over seeds
    with the std as error bar for trained methods); undefined values are left out."""
    plt = pyplot()
    names = [*baselines, *per_seed]
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        means, stds = [], []
        for n in names:
            if n in baselines:
                v = baselines[n].get(metric)
                means.append(v if v is not None else math.nan)
                stds.append(math.nan)  # no error bar
            else:
                a = aggregate(per_seed[n], (metric,))[metric]
                means.append(a["mean"] if a["mean"] is not None else math.nan)
                stds.append(a["std"] or 0.0)
        colors = ["0.6" if n in baselines else "C0" if n.startswith("rosepo") else "C1" for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=2)
        ax.set_title(metric.removeprefix("eval/"), fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("grey: baselines (deterministic); blue: RosePO and ablations; orange: DPO, cDPO, S-DPO; "
                 "error bars: std over seeds", fontsize=9)
    save_figure(fig, path, dpi=90)


def plot_eps(cfg: RunConfig, pairs: dict[str, Path], path: Path) -> None:
    """Histogram of the personalised ε (``align`` smoothing settings, the formula of
    `rosepo.pairs.smoothing`) over the train pairs of each build, one line per strategy."""
    plt = pyplot()
    a = cfg.align
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, max(a.eps_max, 1e-3), 31)
    for folder in pairs.values():
        t = read_pairs(folder, "train")
        strategy = np.array(t.column("strategy").to_pylist())
        chosen = np.array(t.column("oracle_chosen").to_pylist())
        rejected = np.array(t.column("oracle_rejected").to_pylist())
        eps = smoothing_eps("personalized", chosen, rejected, lam=a.smoothing_lambda, tau=a.smoothing_tau,
                            eps_max=a.eps_max, eps_constant=a.eps_constant)
        for s in sorted(set(strategy)):
            e = eps[strategy == s]
            label = f"{s} (K={rejected.shape[1]})" if rejected.shape[1] > 1 else s
            ax.hist(e, bins=bins, histtype="step", linewidth=1.5, label=f"{label}: mean {e.mean():.3f}")
    ax.set_xlabel("personalised ε of the train pairs")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=90)
