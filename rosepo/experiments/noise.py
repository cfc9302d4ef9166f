"""``rosepo compare`` at several label-noise rates (``compare.noise_rates``): how robust each
method is to wrong preferences, and how well the oracle's ε finds them.

For each rate r the whole comparison runs once (`rosepo.experiments.compare.run_noise_compare`) with
``pairs.label_noise = r`` (that share of the train pairs has chosen and rejected swapped; the
held-out pairs stay clean) and ``align.eps_constant = r`` (cDPO's ε is the noise rate, what a
method that knows the rate would use). Each rate is a comparison of its own, cached and resumable
like any, under the run folder. Then `write_noise_report` gathers them into
``<run folder>/noise-<hash>/``:

- ``noise.md`` / ``noise.json``: per method, mean ± std over seeds of the headline metrics at
  every rate; the ε-AUC (ROC AUC of the personalised ε, and of the oracle's margin, as detectors
  of the flipped train pairs of each rate); and the data's own noise: per rejected-sampling
  strategy, the share of clean pairs whose rejected item the user consumes later (a false
  negative) and the AUC of ε for those;
- ``noise.png``: HR@1 and ValidRatio against the noise rate, one line per method, std as bars.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from rosepo.config import RunConfig, apply_values, config_hash
from rosepo.experiments.plotting import pyplot, save_figure
from rosepo.experiments.report import aggregate, format_cell
from rosepo.layout import read_pairs
from rosepo.pairs.noise import roc_auc
from rosepo.pairs.smoothing import smoothing_eps
from rosepo.pipeline import run_folder, stage_key
from rosepo.storage import atomic_write_text

log = logging.getLogger(__name__)

#: Output files of a noise comparison.
NOISE_MD, NOISE_JSON, NOISE_PNG = "noise.md", "noise.json", "noise.png"
#: The metrics of the noise table, in order.
NOISE_METRICS = ("eval/hr@1", "eval/valid_ratio", "eval/rank/hr@1", "eval/rank/ndcg@5",
                 "eval/hallucination/no_candidate", "eval/hallucination/out_of_catalog",
                 "eval/pop/percentile_rec", "eval/pop/head_share_rec")


def rate_config(cfg: RunConfig, rate: float) -> RunConfig:
    """The run config of one noise rate: ``pairs.label_noise`` and cDPO's ``align.eps_constant``
    at the rate, no further rates."""
    return apply_values(cfg, {"pairs.label_noise": rate, "align.eps_constant": rate, "compare.noise_rates": []})


def noise_dir(cfg: RunConfig) -> Path:
    """``<storage>/<name>/noise-<hash>``: the hash covers the rates and each rate's comparison."""
    keys = [stage_key(rate_config(cfg, r), "eval") for r in cfg.compare.noise_rates]
    return run_folder(cfg) / f"noise-{config_hash('noise', keys, cfg.compare.align_steps)}"


def pair_noise(cfg: RunConfig, pairs_dir: str | Path) -> dict:
    """What the train pairs of one build say about noise: the number flipped; the ROC AUC of the
    personalised ε (the run's ``align`` smoothing) and of the oracle's negative margin as detectors
    of the flipped pairs; per strategy, the share of clean pairs whose rejected item the user
    consumes later and the AUC of ε for those (NaN where a class is empty)."""
    t = read_pairs(pairs_dir, "train")
    a = cfg.align
    chosen = np.array(t.column("oracle_chosen").to_pylist())
    rejected = np.array(t.column("oracle_rejected").to_pylist())
    eps = smoothing_eps("personalized", chosen, rejected, lam=a.smoothing_lambda, tau=a.smoothing_tau,
                        eps_max=a.eps_max, eps_constant=a.eps_constant)
    margin = chosen - rejected.mean(axis=1)
    flipped = np.array(t.column("flipped").to_pylist(), dtype=bool)
    known = np.array([x is not None for x in t.column("false_negative").to_pylist()])
    late = np.array([x is True for x in t.column("false_negative").to_pylist()])
    strategy = np.array(t.column("strategy").to_pylist())
    natural = {}
    for s in sorted(set(strategy)):
        clean = (strategy == s) & ~flipped & known
        natural[s] = {"pairs": int(clean.sum()),
                      "false_negative_share": float(late[clean].mean()) if clean.any() else float("nan"),
                      "eps_auc": roc_auc(eps[clean], late[clean])}
    return {"pairs": len(t), "flipped": int(flipped.sum()), "eps_auc": roc_auc(eps, flipped),
            "margin_auc": roc_auc(-margin, flipped), "natural": natural}


def _auc(value: float) -> str:
    """An AUC for the table: "—" where it is undefined (no flipped, or no clean, pair)."""
    return "—" if np.isnan(value) else f"{value:.3f}"


def write_noise_report(cfg: RunConfig, runs: dict[float, dict], out: Path) -> dict:
    """``noise.md``, ``noise.json`` and ``noise.png`` into ``out`` from each rate's ``results.json``."""
    rates = sorted(runs)
    methods = list(next(iter(runs.values()))["methods"])
    table = {m: {r: aggregate(list(runs[r]["methods"][m]["per_seed"].values()), NOISE_METRICS) for r in rates}
             for m in methods}
    # The ε-AUC on the mix's pairs (every strategy), else on the one build the methods trained on.
    detection = {r: pair_noise(cfg, runs[r]["pairs"].get("mix") or runs[r]["pairs"][sorted(runs[r]["pairs"])[0]])
                 for r in rates}
    lines = [f"Label noise: a share of the train pairs with chosen and rejected swapped; cDPO's ε = the rate. "
             f"Split `{cfg.eval.split}`, mean ± std over seeds {runs[rates[0]]['seeds']}, "
             f"{runs[rates[0]]['align_steps']} alignment steps.", ""]
    for metric in NOISE_METRICS[:2]:
        lines += [f"**{metric.removeprefix('eval/')}**", "",
                  "| method | " + " | ".join(f"noise {r:g}" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        for m in methods:
            seeds = len(runs[rates[0]]["seeds"])
            lines.append(f"| {m} | " + " | ".join(format_cell(table[m][r][metric], seeds) for r in rates) + " |")
        sft = [runs[r]["baselines"]["sft"].get(metric) for r in rates]
        lines += ["| sft (no alignment) | " + " | ".join("—" if v is None else f"{v:.3f}" for v in sft) + " |", ""]
    lines += ["**How well ε finds the flipped pairs** (ROC AUC; 0.5 = chance)", "",
              "| noise | train pairs | flipped | AUC of ε | AUC of the oracle's margin |", "|---|---|---|---|---|"]
    lines += [f"| {r:g} | {d['pairs']} | {d['flipped']} | {_auc(d['eps_auc'])} | {_auc(d['margin_auc'])} |"
              for r, d in detection.items()]
    clean = detection[rates[0]]["natural"]
    lines += ["", f"**The data's own noise** (clean pairs at noise {rates[0]:g}): a rejected item the user "
                  "consumes later in their own sequence", "",
              "| strategy | pairs | false negatives | AUC of ε for them |", "|---|---|---|---|"]
    lines += [f"| {s} | {d['pairs']} | {d['false_negative_share']:.3f} | {_auc(d['eps_auc'])} |"
              for s, d in clean.items()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / NOISE_MD, text)
    result = {"rates": rates, "metrics": {m: {str(r): table[m][r] for r in rates} for m in methods},
              "sft": {str(r): runs[r]["baselines"]["sft"] for r in rates},
              "detection": {str(r): d for r, d in detection.items()},
              "comparisons": {str(r): runs[r]["pairs"] for r in rates}}
    atomic_write_text(out / NOISE_JSON, json.dumps(_plain(result), indent=2, sort_keys=True, allow_nan=False))
    _plot(table, runs, rates, out / NOISE_PNG)
    log.info("compare: %s, %s, %s", out / NOISE_MD, out / NOISE_JSON, out / NOISE_PNG)
    return {"table": str(out / NOISE_MD), "results": str(out / NOISE_JSON), "plot": str(out / NOISE_PNG),
            "dir": str(out)}


def _plain(x):
    """``x`` with NaN as None (JSON has no NaN), dicts and lists recursively."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _plot(table: dict, runs: dict, rates: list[float], path: Path) -> None:
    """HR@1 and ValidRatio against the noise rate: one line per method (std as error bars), SFT dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, NOISE_METRICS[:2]):
        for m, per_rate in table.items():
            means = [per_rate[r][metric]["mean"] for r in rates]
            stds = [per_rate[r][metric]["std"] or 0.0 for r in rates]
            ax.errorbar(rates, [np.nan if v is None else v for v in means], yerr=stds, marker="o", capsize=3,
                        label=m)
        ax.plot(rates, [runs[r]["baselines"]["sft"].get(metric) for r in rates], "k--", label="sft")
        ax.set_xlabel("label noise (share of train pairs flipped)")
        ax.set_title(metric.removeprefix("eval/"))
    axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=100)
