"""What ``rosepo run`` ends with: the run's result on one screen and in two files of its folder.

`write_summary` renders the stage times (`rosepo.pipeline.read_run_record`), the run folder, the
TensorBoard command (or, without tensorboard installed, how to get it), once the eval stage has
run its table (method x the headline metrics below, from the eval manifest), and last the trained
model's folder, as Markdown; writes it as ``summary.md`` and the table's bars as ``results.png``
into the run folder, atomically; and returns the text for the console.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from rosepo.config import RunConfig
from rosepo.eval.evaluate import BASELINES, markdown_table
from rosepo.experiments.plotting import pyplot, save_figure
from rosepo.layout import SFT_MODEL_DIR, WORK_DIR, aligned_adapter
from rosepo.pipeline import read_run_record, run_folder
from rosepo.storage import atomic_write_text, read_manifest

#: The eval table of the summary: HR@1, ValidRatio, rank HR@1, NDCG@5, hallucination, head share
#: (the eval stage's ``table.md`` has more columns, ``metrics.json`` every metric).
SUMMARY_METRICS = ("eval/hr@1", "eval/valid_ratio", "eval/rank/hr@1", "eval/rank/ndcg@5",
                   "eval/hallucination/no_candidate", "eval/pop/head_share_rec")
SUMMARY_FILE, RESULTS_PNG = "summary.md", "results.png"


def write_summary(cfg: RunConfig, outs: dict[str, Path]) -> str:
    """The summary of the run of ``cfg`` whose finished stages are ``outs`` (`run_pipeline`'s
    return); ``summary.md`` and, with an eval stage, ``results.png`` written into the run folder."""
    folder = run_folder(cfg)
    record = read_run_record(folder)
    lines = [f"# rosepo run {cfg.name}", "", "| stage | seconds | folder |", "|---|---|---|"]
    for stage, path in outs.items():
        entry = record.get(stage, {})
        seconds = "?" if entry.get("seconds") is None else f"{entry['seconds']:.1f}"
        lines.append(f"| {stage} | {seconds}{' (earlier run)' if entry.get('reused') else ''} | {path.name} |")
    lines += ["", f"run folder: {folder}", tensorboard_line(folder / WORK_DIR)]
    if "eval" in outs:
        manifest = read_manifest(outs["eval"])
        # The manifest's keys are sorted: the table's order is the eval stage's, baselines first.
        results = {m: manifest["results"][m] for m in sorted(manifest["results"], key=_table_order)}
        _plot(results, folder / RESULTS_PNG)
        lines += [f"summary: {folder / SUMMARY_FILE}, {folder / RESULTS_PNG}", "",
                  f"Evaluation on {manifest['split']} ({_samples(outs['eval'])} samples):", "",
                  markdown_table(results, SUMMARY_METRICS).rstrip("\n")]
        warnings = health_warnings(results, cfg, len(read_manifest(outs["sft"]).get("history", [])))
        lines += ([""] + [f"WARNING: {text}" for text in warnings]) if warnings else []
    else:
        lines.append(f"summary: {folder / SUMMARY_FILE} (no eval stage in this run: no table)")
    model = _model_line(outs)
    lines += ["", model] if model else []
    text = "\n".join(lines) + "\n"
    atomic_write_text(folder / SUMMARY_FILE, text)
    return text


#: Below this ValidRatio after SFT the model is not a working recommender: it names a candidate
#: in fewer than half of its answers.
MIN_VALID_RATIO = 0.5


def health_warnings(results: dict[str, dict], cfg: RunConfig, sft_steps: int) -> list[str]:
    """Why the run's result is not a working recommender, if it is not: the SFT model answers
    validly less than `MIN_VALID_RATIO` of the time, or ranks the candidates below most-popular;
    each names the likely cause and the key to change. ``sft_steps``: the steps SFT trained."""
    sft, popular = results.get("sft", {}), results.get("most_popular", {})
    s = cfg.sft
    trained = (f"SFT trained {sft_steps} steps of {s.num_workers * s.micro_batch_size * s.grad_accum} samples"
               if sft_steps else "SFT's steps are unknown")
    # The key that bounded the steps: the epoch cap when it stopped SFT before its step budget.
    capped = bool(s.max_epochs) and 0 < sft_steps < s.max_steps
    more = (f"raise sft.max_epochs (the cap of {s.max_epochs:g} passes over the training rows stopped SFT before "
            f"sft.max_steps)" if capped else "raise sft.max_steps (the default recipe trains 1,500)")
    out = []
    valid = sft.get("eval/valid_ratio")
    if valid is not None and valid < MIN_VALID_RATIO:
        out.append(f"the SFT model names exactly one candidate in {valid:.0%} of its answers: it is not a working "
                   f"recommender. Likely cause: too few training steps for this data ({trained}); {more}")
    rank, floor = sft.get("eval/rank/hr@1"), popular.get("eval/rank/hr@1")
    if rank is not None and floor is not None and rank < floor:
        out.append(f"the SFT model ranks the candidates below most-popular (rank HR@1 {rank:.3f} against "
                   f"{floor:.3f}). Likely cause: too few training steps for this data ({trained}); {more}, and "
                   "check the oracle's valid HR@1 in its manifest (sft.oracle_weight distils it)")
    return out


def tensorboard_line(logdir: Path) -> str:
    """The command that shows ``logdir`` in TensorBoard when this Python has it, else how to get it."""
    if importlib.util.find_spec("tensorboard") is not None:
        return f"TensorBoard: tensorboard --logdir {logdir}"
    return f"TensorBoard logs: {logdir} (pip install tensorboard, then tensorboard --logdir {logdir})"


def _model_line(outs: dict[str, Path]) -> str:
    """Where the run's trained model is: the align stage's adapter, else the sft stage's model
    ("" before either has run)."""
    if "align" in outs:
        return f"aligned model: {aligned_adapter(outs['align']).resolve()}"
    if "sft" in outs:
        return f"SFT model: {(outs['sft'] / SFT_MODEL_DIR).resolve()}"
    return ""


def _table_order(method: str) -> int:
    """A method's row in the table: the `BASELINES` in their order, then the aligned model."""
    return BASELINES.index(method) if method in BASELINES else len(BASELINES)


def _samples(eval_dir: Path) -> int | str:
    """How many samples the eval stage scored (its aligned model's manifest says)."""
    try:
        return read_manifest(eval_dir / "aligned")["samples"]
    except (OSError, KeyError):
        return "?"


def _plot(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: one group per `SUMMARY_METRICS` metric, one bar per method; an undefined
    metric (null: no valid answer to take a head share of) is drawn at 0."""
    plt = pyplot()
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, method in enumerate(methods):
        values = [results[method].get(m) for m in SUMMARY_METRICS]
        values = [v if isinstance(v, (int, float)) and not math.isnan(v) else 0.0 for v in values]
        ax.bar([k + (i - (len(methods) - 1) / 2) * width for k in range(len(SUMMARY_METRICS))], values,
               width, label=method)
    ax.set_xticks(range(len(SUMMARY_METRICS)), [m.removeprefix("eval/") for m in SUMMARY_METRICS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("value")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
