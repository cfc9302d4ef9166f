"""`rosepo compare`: the baselines, DPO, cDPO, S-DPO, RosePO and its ablations in one protocol,
over several seeds, in one table.

What it does (`run_compare`):

1. runs the upstream stages once through the pipeline (samples, model, SFT, oracle; reused when
   finished) and at most two pair builds: ``mix`` (``pairs.mix: all`` over self_hard, semantic,
   popularity and random, one pair per strategy per sample, so a method only selects
   ``align.strategies``) and ``sdpo`` (3 random negatives per prompt);
2. evaluates the baselines once, into ``baselines/``: random, most popular, SASRec (the oracle)
   and the SFT model are deterministic, so they have one value and no std;
3. for each method (`METHODS`) and seed: the pipeline's ``align`` stage with the method's
   overrides (cached by config hash like any stage) and an evaluation of the aligned model on
   ``eval.split``, into ``cells/<method>/seed-<seed>/``, written atomically. A finished cell is
   skipped, so an interrupted compare resumes where it stopped (and an interrupted alignment
   from its last checkpoint);
4. writes ``table.md`` (mean ± std over seeds), ``results.json`` (per seed and aggregated),
   ``metrics.png`` (one bar chart per table metric, std as error bars) and ``eps.png`` (the
   personalised ε of the pairs, per rejected-sampling strategy), each atomically.

Everything goes to ``<storage>/<run name>/compare-<hash>/``, the hash covering the run's
config (every stage section) and ``compare.align_steps``, not the methods or seeds, so running
more of either reuses the cells already there.

What it does not do: choose hyperparameters (every method trains with the run's ``align``
section, chosen on valid; the test split, when ``eval.split`` is test, is read only here);
vary the pairs with the seed (a seed changes the LoRA initialisation and the data order only:
rebuilding pairs costs a scoring pass of the SFT model per seed); give every method its own
tuned β or learning rate.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rosepo.config import RunConfig, config_hash

#: The strategies of RosePO's mix of rejected samples (RosePO §3.2).
MIX = ("self_hard", "semantic", "popularity")

#: Pair builds, as ``pairs.*`` values: ``mix`` holds one pair per strategy per sample, ``sdpo``
#: three random negatives per prompt. Both select the same samples (``pairs.seed``).
PAIR_BUILDS: dict[str, dict] = {
    "mix": {"pairs.mix": "all", "pairs.strategies": {s: 1.0 for s in (*MIX, "random")},
            "pairs.num_negatives": 1},
    "sdpo": {"pairs.mix": "all", "pairs.strategies": {"random": 1.0}, "pairs.num_negatives": 3},
}


@dataclass(frozen=True)
class Method:
    """A trained method: the pair build it trains on, its ``align.*`` values, what it is."""

    pairs: str
    align: dict = field(hash=False)
    text: str = ""


def _rosepo(strategies: tuple[str, ...], smoothing: str, text: str) -> Method:
    return Method("mix", {"align.loss": "rosepo", "align.smoothing": smoothing,
                          "align.strategies": list(strategies)}, text)


#: The trained methods, in table order.
METHODS: dict[str, Method] = {
    "dpo": Method("mix", {"align.loss": "dpo", "align.strategies": ["random"]},
                  "DPO: one random negative, ε = 0"),
    "cdpo": Method("mix", {"align.loss": "cdpo", "align.strategies": ["random"]},
                   "cDPO: one random negative, constant ε = align.eps_constant"),
    "sdpo": Method("sdpo", {"align.loss": "sdpo", "align.strategies": ["random"]},
                   "S-DPO: 3 random negatives, softmax (logsumexp) loss, ε = 0"),
    "rosepo": _rosepo(MIX, "personalized", "RosePO: self_hard + semantic + popularity negatives, personalised ε"),
    **{f"rosepo-{s}": _rosepo((s,), "personalized", f"RosePO with {s} negatives only, personalised ε")
       for s in MIX},
    "rosepo-no-smoothing": _rosepo(MIX, "none", "RosePO's negatives, ε = 0 (DPO loss)"),
    "rosepo-constant-eps": _rosepo(MIX, "constant", "RosePO's negatives, constant ε = align.eps_constant"),
}

#: The untrained methods, evaluated once (`rosepo.eval.evaluate.evaluate_references`), in table order.
BASELINES = ("random", "most_popular", "sasrec", "sft")
#: Output files of a comparison.
TABLE, RESULTS, METRICS_PNG, EPS_PNG = "table.md", "results.json", "metrics.png", "eps.png"


# ---------------------------------------------------------------- configs (pure)

def selected_methods(cfg: RunConfig) -> list[str]:
    """The methods ``compare.methods`` names (all when empty), in `METHODS` order."""
    chosen = set(cfg.compare.methods) or set(METHODS)
    return [m for m in METHODS if m in chosen]


def seeds(cfg: RunConfig) -> list[int]:
    """The alignment seeds: ``align.seed``, ``align.seed + 1``, ... (``compare.seeds`` of them)."""
    return [cfg.align.seed + i for i in range(cfg.compare.seeds)]


def pairs_config(cfg: RunConfig, build: str) -> RunConfig:
    """``cfg`` with the ``pairs`` values of a pair build (`PAIR_BUILDS`)."""
    from rosepo.tune import apply_values

    return apply_values(cfg, PAIR_BUILDS[build])


def cell_config(cfg: RunConfig, method: str, seed: int, steps: int) -> RunConfig:
    """The run config of one cell: ``cfg`` with the method's pair build and ``align.*`` values,
    ``align.seed = seed`` and ``align.max_steps = steps``. The in-training evaluation is cut to
    the held-out pairs before and after training (``align.eval_every = 0``,
    ``align.eval_rec_samples = 0``): it changes nothing in the training, the cell is evaluated
    on ``eval.split`` anyway, and on 2 cores it costs seconds per run."""
    from rosepo.tune import apply_values

    m = METHODS[method]
    return apply_values(cfg, {**PAIR_BUILDS[m.pairs], **m.align, "align.seed": seed, "align.max_steps": steps,
                              "align.eval_every": 0, "align.eval_rec_samples": 0})


def compare_dir(cfg: RunConfig) -> Path:
    """``<storage>/<name>/compare-<hash>``: the hash covers every stage's config (the eval
    stage's address hashes them all) and ``compare.align_steps``, not the methods or seeds."""
    from rosepo.pipeline import run_dir, stage_key

    return run_dir(cfg) / f"compare-{config_hash('compare', stage_key(cfg, 'eval'), cfg.compare.align_steps)}"


def align_steps(cfg: RunConfig, train_samples: int) -> int:
    """``compare.align_steps``, or when 0 one epoch over one pair per train sample."""
    a = cfg.align
    return cfg.compare.align_steps or max(1, math.ceil(train_samples / (a.num_workers * a.micro_batch_size
                                                                         * a.grad_accum)))


# ---------------------------------------------------------------- aggregation (pure)

def aggregate(per_seed: list[dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """Per metric: ``mean``, ``std`` (sample std, ddof 1; 0 for one value) and ``n`` over the
    seeds where it is defined (a number, not NaN/None: e.g. ``pop/percentile_rec`` is
    undefined when no answer is valid); mean and std are None when no seed defines it."""
    from rosepo.eval.metrics import mean_std

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
    from rosepo.eval.evaluate import TABLE_METRICS

    rows: dict[str, dict] = {name: {"seeds": "1 (deterministic)", **r} for name, r in baselines.items()}
    for name, per_seed in methods.items():
        agg = aggregate(per_seed, TABLE_METRICS)
        rows[name] = {"seeds": str(len(per_seed)), **{m: format_cell(a, len(per_seed)) for m, a in agg.items()}}
    return rows


# ---------------------------------------------------------------- running

def prepare(cfg: RunConfig, methods: list[str], log: Callable[[str], None] = print) -> dict:
    """Upstream stages (samples, model, sft, oracle) and the pair builds the methods need,
    through the pipeline (each reused when finished). Returns the stage folders, ``pairs``
    (build -> folder) and ``steps`` (align steps of every cell)."""
    from rosepo.pipeline import run_pipeline, run_stage
    from rosepo.storage import read_manifest

    upstream = run_pipeline(cfg, until="oracle", log=log)
    builds = [b for b in PAIR_BUILDS if any(METHODS[m].pairs == b for m in methods)]
    pairs = {b: run_stage(pairs_config(cfg, b), "pairs", log=log) for b in builds}
    train_samples = read_manifest(pairs[builds[0]])["splits"]["train"]["samples"]
    return {**upstream, "pairs": pairs, "steps": align_steps(cfg, train_samples)}


def run_cell(cell_cfg: RunConfig, method: str, seed: int, upstream: dict, out: Path,
             log: Callable[[str], None] = print) -> dict:
    """Align (the pipeline's align stage, reused when finished) and evaluate one method × seed
    into ``out`` atomically: ``eval/`` (answers.parquet, metrics.json) and a manifest with the
    metrics, the align stage's folder, its pairs, ε summary and held-out pair metrics."""
    from rosepo.eval.evaluate import evaluate_model, nan_to_none
    from rosepo.pipeline import base_model_path, run_stage, sft_model
    from rosepo.storage import atomic_dir, read_manifest, write_manifest

    t0 = time.perf_counter()
    # Only the align stage's own lines: `prepare` has finished every stage before it.
    align = run_stage(cell_cfg, "align", log=lambda line: line.startswith("[rosepo] align") and log(line))
    t1 = time.perf_counter()
    base, _ = sft_model(upstream["sft"], base_model_path(upstream["model"]))
    with atomic_dir(out, overwrite=True) as tmp:
        metrics = evaluate_model(cell_cfg, upstream["samples"], base, align / "adapter", tmp / "eval")
        am = read_manifest(align)
        manifest = {"method": method, "seed": seed, "align": str(align), "pairs": am["pairs"], "eps": am["eps"],
                    "align_steps": cell_cfg.align.max_steps, "align_seconds": round(t1 - t0, 1),
                    "eval_seconds": round(time.perf_counter() - t1, 1),
                    "valid_pairs": {k: v for k, v in am["metrics"].items() if k.startswith("eval/")},
                    "overrides": METHODS[method].align, "metrics": nan_to_none(metrics)}
        write_manifest(tmp, manifest)
    return manifest


def run_cells(cfg: RunConfig, methods: list[str], upstream: dict, out: Path,
              log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Every method × seed cell into ``out/cells/<method>/seed-<seed>``, skipping finished ones,
    seed by seed (every method's first seed before any second one: a comparison stopped early
    has every method); one line per cell with its time, the elapsed time and an estimate of
    what is left. Returns method -> the cells' manifests, in seed order."""
    from rosepo.storage import is_complete, read_manifest

    cells = [(m, s) for s in seeds(cfg) for m in methods]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    start, ran = time.perf_counter(), 0
    for i, (method, seed) in enumerate(cells, 1):
        cell = out / "cells" / method / f"seed-{seed}"
        t0 = time.perf_counter()
        if is_complete(cell):
            manifest, done = read_manifest(cell), "done earlier, skipped"
        else:
            manifest = run_cell(cell_config(cfg, method, seed, upstream["steps"]), method, seed, upstream, cell,
                                log)
            ran += 1
            done = f"{time.perf_counter() - t0:.0f} s"
        results[method].append(manifest)
        elapsed = time.perf_counter() - start
        left = (len(cells) - i) * elapsed / ran if ran else 0.0
        m = manifest["metrics"]
        log(f"[rosepo] compare {i}/{len(cells)} {method} seed {seed}: {done}; hr@1 {_num(m['eval/hr@1'])}, "
            f"rank/hr@1 {_num(m['eval/rank/hr@1'])}; elapsed {elapsed / 60:.1f} min, ~{left / 60:.0f} min left")
    return results


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run_compare(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """The whole comparison (see the module docstring); returns the paths of the outputs."""
    from rosepo.eval.evaluate import evaluate_references, nan_to_none
    from rosepo.storage import atomic_dir, is_complete, read_manifest, write_manifest

    methods = selected_methods(cfg)
    out = compare_dir(cfg)
    log(f"[rosepo] compare: {len(methods)} methods x {cfg.compare.seeds} seeds -> {out}")
    upstream = prepare(cfg, methods, log)
    baselines_dir = out / "baselines"
    if not is_complete(baselines_dir):
        t0 = time.perf_counter()
        with atomic_dir(baselines_dir, overwrite=True) as tmp:
            refs = evaluate_references(cfg, upstream, tmp)
            write_manifest(tmp, {"results": {k: nan_to_none(v) for k, v in refs.items()}})
        log(f"[rosepo] compare: baselines ({', '.join(BASELINES)}) in {time.perf_counter() - t0:.0f} s")
    stored = read_manifest(baselines_dir)["results"]
    baselines = {name: stored[name] for name in BASELINES}
    cells = run_cells(cfg, methods, upstream, out, log)
    paths = write_summary(cfg, out, baselines, cells, upstream)
    log(f"[rosepo] compare: {paths['table']}, {paths['results']}, {paths['metrics_png']}, {paths['eps_png']}")
    return paths


def compare_command(config: str | None, overrides: list[str], *, seeds_arg: int | None = None,
                    methods_arg: str | None = None, log: Callable[[str], None] = print) -> dict:
    """``rosepo compare`` and ``jobs/compare.py``: load the config (plus overrides, ``--seeds``
    and ``--methods`` as ``compare.seeds`` / ``compare.methods``), refuse a bad one before
    Ray starts, start or join Ray, and run the comparison."""
    from rosepo.config import load_config
    from rosepo.train.raysetup import init_ray
    from rosepo.tune import apply_values

    cfg = load_config(config, overrides)
    values: dict = {}
    if seeds_arg is not None:
        values["compare.seeds"] = seeds_arg
    if methods_arg is not None:
        values["compare.methods"] = [m.strip() for m in methods_arg.split(",") if m.strip()]
    cfg = apply_values(cfg, values) if values else cfg
    init_ray(cfg.ray_address)
    return run_compare(cfg, log)


# ---------------------------------------------------------------- outputs

def write_summary(cfg: RunConfig, out: Path, baselines: dict[str, dict], cells: dict[str, list[dict]],
                  upstream: dict) -> dict:
    """``table.md``, ``results.json``, ``metrics.png`` and ``eps.png`` into ``out``, each atomically."""
    from rosepo.eval.evaluate import TABLE_METRICS, markdown_table
    from rosepo.storage import atomic_write_text

    from rosepo.storage import read_manifest

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(baselines: dict[str, dict], per_seed: dict[str, list[dict]], metrics: tuple[str, ...],
                 path: Path) -> None:
    """One bar chart per metric in a grid: a bar per method (baselines grey, mean over seeds
    with the std as error bar for trained methods); undefined values are left out."""
    from rosepo.storage import atomic_path

    plt = _pyplot()
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_eps(cfg: RunConfig, pairs: dict[str, Path], path: Path) -> None:
    """Histogram of the personalised ε (``align`` smoothing settings, the formula of
    `rosepo.pairs.smoothing`) over the train pairs of each build, one line per strategy."""
    import numpy as np

    from rosepo.pairs.build import read_pairs
    from rosepo.pairs.smoothing import smoothing_eps
    from rosepo.storage import atomic_path

    plt = _pyplot()
    a = cfg.align
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, max(a.eps_max, 1e-3), 31)
    for build, folder in pairs.items():
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
