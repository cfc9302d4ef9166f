"""The default recipe on a data set a thirtieth of MovieLens-100K's size still makes a recommender.

Budgets are steps, not samples or epochs: SFT trains ``sft.max_steps`` steps whatever the data
size (cycling epochs on small data) and the oracle ``oracle.max_steps``, keeping its best valid
weights. A recipe sized in samples once gave a 2,467-sample data set 77 SFT steps and a model that
named a candidate 2% of the time; this test runs `make run`'s config, only the data changed, on the
160 MovieLens users with the fewest ratings (2,515 train samples, `tools.small_movielens`), and
the budgets cut to keep `make test` short: SFT 300 steps of the default's 1,500 (still 3.8 epochs of
the slice), the oracle 300 of 1,200 (measured here: ValidRatio 0.688, rank HR@1 0.525).

Measured (BENCHMARKS.md, "The default recipe on a small data set"): with the full 1,500 steps, SFT
ValidRatio 0.713 on the slice's 80 test samples, rank HR@1 0.525 (most-popular 0.487, SASRec
0.487); on its 80 valid samples ValidRatio 0.71 and rank HR@1 0.50 at 300 steps, 0.66-0.73 and
0.46-0.50 at every budget from 150 to 1,500. The 0.9 ValidRatio asked of the recipe is not reached
on this slice at any of them; the test keeps the recipe from falling back to what a budget in
samples gave (0.02), and its ranking at most-popular's level or above.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from rosepo.config import load_config
from rosepo.data.samples import read_split
from tests.conftest import COMMAND_ENV, REPO, rosepo_command
from tools.small_movielens import small_movielens


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_default_recipe_makes_a_recommender_on_a_small_data_set(tmp_path):
    from rosepo.data.popularity import train_popularity
    from rosepo.eval.evaluate import EvalScorer, baseline_scores
    from rosepo.eval.metrics import generation_metrics, ranking_metrics
    from rosepo.experiments.recommend import run_model
    from rosepo.storage import read_manifest

    overrides = [*small_movielens(tmp_path / "data", users=160), f"storage={tmp_path / 'runs'}", "sft.max_steps=300",
                 "oracle.max_steps=300"]
    proc = subprocess.run(rosepo_command("run", "--config", "configs/ml100k-tiny.yaml", *overrides, "--until", "sft"),
                          cwd=REPO, env=COMMAND_ENV, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    cfg = load_config(REPO / "configs" / "ml100k-tiny.yaml", overrides)
    run = tmp_path / "runs" / cfg.name
    base, adapter, samples = run_model(run, cfg, "sft")
    assert 2000 <= len(read_split(samples, "train")) <= 3000
    sft = read_manifest(next(run.glob("sft-*")))
    assert len(sft["history"]) == cfg.sft.max_steps  # the budget does not shrink with the data
    oracle = read_manifest(next(run.glob("oracle-*")))
    assert oracle["steps"] == cfg.oracle.max_steps and oracle["best_step"] <= cfg.oracle.max_steps
    test = read_split(samples, "test")
    scorer = EvalScorer(cfg, base, adapter, device="cpu")
    scored = scorer(test.select(["sample_id", "prompt", "history_item_ids", "history_titles", "candidate_item_ids",
                                 "candidate_titles"]))
    titles = test.column("candidate_titles").to_pylist()
    targets = [c.index(t) for c, t in zip(test.column("candidate_item_ids").to_pylist(),
                                          test.column("target_item_id").to_pylist())]
    metrics = generation_metrics(scored.column("answer").to_pylist(), titles, targets)
    rank = ranking_metrics(np.array(scored.column("scores").to_pylist()), targets)["hr@1"]
    popular = ranking_metrics(baseline_scores("most_popular", test.to_pylist(), train_popularity(samples)),
                              targets)["hr@1"]
    print(f"\nsmall data: {len(test)} test samples, SFT valid_ratio {metrics['valid_ratio']:.3f}, "
          f"hr@1 {metrics['hr@1']:.3f}, rank hr@1 {rank:.3f} (most-popular {popular:.3f})")
    assert metrics["valid_ratio"] >= 0.6
    assert rank >= max(0.4, popular - 0.05)  # measured: 0.525 against most-popular's 0.487
