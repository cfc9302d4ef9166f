"""Does the LLM recommender know anything its oracle does not? Score fusion on one evaluation.

Reads an eval stage's per-sample answers (``<eval>/<method>/answers.parquet``: every candidate's
score, higher is better) of the LLM (``sft``, and ``aligned`` where present) and of ``sasrec``, and
ranks the candidates by w · z(LLM) + (1 − w) · z(SASRec) for w from 0 to 1, z standardising each
sample's 20 scores. Two recommenders whose errors differ make an ensemble that beats both at some
0 < w < 1; a curve that falls from w = 0 says the LLM's ranking is a noisier copy of the oracle's,
so what it learned from the oracle (item and user tokens, distillation) cannot take it past the
oracle. Also: how often each is right where the other is wrong, a paired
bootstrap interval of the difference in ranking HR@1, and, from the run's samples folder, whether
two signals the tiny model could draw on add to SASRec: popularity (log(1 + train count) of each
candidate) and title semantics (the mean MiniLM similarity of the history's titles to each
candidate, the ``semantic`` strategy's score), each as z(SASRec) + w · z(signal).

    python -m bench fusion [--run runs/ml100k-tiny] [--eval eval-<hash>] [--out DIR]

Writes ``fusion.json`` and ``fusion.png`` (HR@1 against w, one line per LLM method) under ``--out``
(default: ``runs/bench/fusion/<run>-<eval>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import WORK, markdown
from rosepo.eval.metrics import target_ranks

WEIGHTS = [round(w, 2) for w in np.linspace(0.0, 1.0, 21)]
LLM_METHODS = ("sft", "aligned")
#: Weights of an extra signal added to SASRec's z-scores.
EXTRA_WEIGHTS = [0.05, 0.1, 0.2, 0.3, 0.5]


def zscore(scores: np.ndarray) -> np.ndarray:
    """Each row standardised to mean 0 and standard deviation 1 (a constant row becomes 0)."""
    centred = scores - scores.mean(1, keepdims=True)
    std = scores.std(1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def top1_hits(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row: whether the target ranks first, a tie counted against it as in `rosepo eval`
    (`rosepo.eval.metrics.target_ranks`)."""
    return target_ranks(scores, target) == 1


def fusion_curve(llm: np.ndarray, oracle: np.ndarray, target: np.ndarray, weights) -> list[float]:
    """Ranking HR@1 of w · z(llm) + (1 − w) · z(oracle) for each w of ``weights``."""
    a, b = zscore(llm), zscore(oracle)
    return [float(top1_hits(w * a + (1 - w) * b, target).mean()) for w in weights]


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple:
    """Mean of ``hits_a - hits_b`` and its 95 % percentile interval over ``reps`` resamples of the
    rows (the same rows for both: a paired comparison)."""
    diff = hits_a.astype(float) - hits_b.astype(float)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(reps, len(diff)))
    means = diff[idx].mean(1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def read_scores(eval_dir: Path, method: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(sample ids, scores (N, C), target index (N,))`` of one method's answers, by sample id."""
    import pyarrow.parquet as pq

    rows = sorted(pq.read_table(eval_dir / method / "answers.parquet").to_pylist(), key=lambda r: r["sample_id"])
    return ([r["sample_id"] for r in rows], np.array([r["scores"] for r in rows], dtype=float),
            np.array([r["target_index"] for r in rows]))


def extra_signals(samples_dir: Path, split: str, ids: list[str]) -> dict[str, np.ndarray]:
    """Per sample of ``ids`` (N, C): ``popularity``, log(1 + train count) of each candidate, and
    ``semantic``, the mean MiniLM cosine similarity of the history's titles to each candidate."""
    from rosepo.data.popularity import train_popularity
    from rosepo.data.samples import read_split
    from rosepo.pairs.embed import embed_titles, history_similarity

    by_id = {r["sample_id"]: r for r in read_split(samples_dir, split).to_pylist()}
    rows = [by_id[i] for i in ids]
    titles: dict[str, str] = {}
    for r in rows:
        titles.update(zip(r["candidate_item_ids"], r["candidate_titles"]))
        titles.update(zip(r["history_item_ids"], r["history_titles"]))
    keys = sorted(titles)
    vectors = dict(zip(keys, embed_titles("minilm", [titles[k] for k in keys])))
    counts = train_popularity(samples_dir)
    return {"popularity": np.log1p(np.array([[counts.get(c, 0) for c in r["candidate_item_ids"]] for r in rows])),
            "semantic": np.array([history_similarity(np.stack([vectors[h] for h in r["history_item_ids"]]),
                                                     np.stack([vectors[c] for c in r["candidate_item_ids"]]))
                                  for r in rows])}


def analyse(eval_dir: Path, samples_dir: Path | None = None) -> dict:
    """The fusion curve, agreement counts and bootstrap interval of every LLM method against
    SASRec; with ``samples_dir``, also SASRec plus each of `extra_signals`."""
    ids, oracle, target = read_scores(eval_dir, "sasrec")
    out = {"eval": str(eval_dir), "samples": len(ids), "weights": WEIGHTS, "methods": {}, "sasrec_plus": {}}
    oracle_hits = top1_hits(oracle, target)
    for method in LLM_METHODS:
        if not (eval_dir / method / "answers.parquet").exists():
            continue
        m_ids, llm, m_target = read_scores(eval_dir, method)
        if m_ids != ids or not np.array_equal(m_target, target):
            raise SystemExit(f"{eval_dir}: {method} and sasrec were not evaluated on the same samples")
        hits = top1_hits(llm, target)
        curve = fusion_curve(llm, oracle, target, WEIGHTS)
        best = int(np.argmax(curve))
        diff, low, high = paired_bootstrap(hits, oracle_hits)
        out["methods"][method] = {
            "rank_hr@1": float(hits.mean()), "sasrec_rank_hr@1": float(oracle_hits.mean()),
            "both_right": float((hits & oracle_hits).mean()), "only_llm_right": float((hits & ~oracle_hits).mean()),
            "only_sasrec_right": float((~hits & oracle_hits).mean()),
            "diff_vs_sasrec": diff, "diff_ci95": [low, high],
            "fusion_hr@1": curve, "best_weight": WEIGHTS[best], "best_fusion_hr@1": curve[best],
        }
    if not out["methods"]:
        raise SystemExit(f"{eval_dir}: no answers of {' or '.join(LLM_METHODS)} to compare with sasrec")
    if samples_dir is not None:
        split = json.loads((eval_dir / "manifest.json").read_text())["split"]
        for name, signal in extra_signals(samples_dir, split, ids).items():
            out["sasrec_plus"][name] = {"alone": float(top1_hits(signal, target).mean()), "weights": EXTRA_WEIGHTS,
                                        "hr@1": [float(top1_hits(zscore(oracle) + w * zscore(signal), target).mean())
                                                 for w in EXTRA_WEIGHTS]}
    return out


def plot(result: dict, path: Path) -> None:
    """HR@1 against the LLM's weight w, one line per LLM method, SASRec's level dashed."""
    from rosepo.experiments.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, m in result["methods"].items():
        ax.plot(result["weights"], m["fusion_hr@1"], marker="o", ms=3, label=method)
    first = next(iter(result["methods"].values()))
    ax.axhline(first["sasrec_rank_hr@1"], ls="--", color="grey", label="sasrec alone")
    ax.set_xlabel("w: weight of the LLM's scores (0 = SASRec alone, 1 = the LLM alone)")
    ax.set_ylabel("ranking HR@1")
    ax.set_title(f"w·z(LLM) + (1−w)·z(SASRec), {result['samples']} samples")
    ax.legend()
    save_figure(fig, path, dpi=120)


def newest_eval(run: Path) -> Path | None:
    """The run folder's most recently written eval stage folder, or None."""
    evals = sorted(run.glob("eval-*"), key=lambda p: p.stat().st_mtime)
    return evals[-1] if evals else None


def run(argv: list[str] | None = None) -> int:
    """Parse the options, analyse one evaluation, print the table, write fusion.json and fusion.png."""
    p = argparse.ArgumentParser(prog="python -m bench fusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/ml100k-tiny"), help="a run folder")
    p.add_argument("--eval", default=None, help="its eval folder's name (default: the newest)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    eval_dir = a.run / a.eval if a.eval else newest_eval(a.run)
    if eval_dir is None:  # `make bench` on a checkout that has not run the pipeline yet
        print(f"skipped: no eval-* folder under {a.run}; run `make run` (or `rosepo run`) first")
        return 0
    if not (eval_dir / "sasrec" / "answers.parquet").is_file():
        print(f"{eval_dir}: no sasrec/answers.parquet, not an eval stage folder")
        return 2
    samples = sorted(a.run.glob("samples-*"))
    if len(samples) != 1:
        print(f"{a.run}: {len(samples)} samples folders, not one: popularity and semantics left out")
    result = analyse(eval_dir, samples[0] if len(samples) == 1 else None)
    out = a.out or WORK / "fusion" / f"{a.run.name}-{eval_dir.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "fusion.png")
    rows = []
    for method, m in result["methods"].items():
        rows.append([method, f"{m['rank_hr@1']:.3f}", f"{m['sasrec_rank_hr@1']:.3f}",
                     f"{m['diff_vs_sasrec']:+.3f} [{m['diff_ci95'][0]:+.3f}, {m['diff_ci95'][1]:+.3f}]",
                     f"{m['both_right']:.3f} / {m['only_llm_right']:.3f} / {m['only_sasrec_right']:.3f}",
                     f"{m['best_fusion_hr@1']:.3f} at w = {m['best_weight']}",
                     " ".join(f"{h:.3f}" for h in m["fusion_hr@1"][::5])])
    print(f"{eval_dir} ({result['samples']} samples)")
    print(markdown(["method", "rank HR@1", "sasrec", "difference [95% CI]", "both / only LLM / only sasrec right",
                    "best fusion", "fusion at w = 0, .25, .5, .75, 1"], rows))
    for name, extra in result["sasrec_plus"].items():
        print(f"sasrec + w · {name}: alone {extra['alone']:.3f}; w = "
              + ", ".join(f"{w}: {h:.4f}" for w, h in zip(extra["weights"], extra["hr@1"])))
    print(f"wrote {out / 'fusion.json'} and {out / 'fusion.png'}")
    return 0
