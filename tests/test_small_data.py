"""The default recipe on a data set a thirtieth of MovieLens-100K's size still makes a recommender.

Budgets are steps, capped by passes over the data: SFT trains ``sft.max_steps`` steps or
``sft.max_epochs`` passes over its rows (samples and their ``sft.decoys``), whichever comes first,
and the oracle ``oracle.max_steps``, keeping its best valid weights. A recipe sized in samples
once gave a 2,467-sample data set 77 SFT steps and a model that named a candidate 2% of the
time; one sized in steps alone cycled a small data set 19 times and the model memorised it (it
named a candidate 71% of the time). This test runs `make run`'s config, only the data changed, on
the 160 MovieLens users with the fewest ratings (2,515 train samples, `tools.small_movielens`):
SFT as the default trains it (3 decoys per sample and the candidate term at 3, the cap stopping
it at 629 steps), the oracle cut to 300 steps of 1,200 to keep `make test` short.

Measured (BENCHMARKS.md, "The default recipe on a small data set"), the whole default recipe on
the slice's 80 test samples: SFT ValidRatio 0.975, rank HR@1 0.500 (most-popular 0.487); 0.912
to 0.988 on five splits of the slice. With decoys alone 0.850 (0.858 over the five splits);
before the decoys and the cap, 0.713.
"""

from __future__ import annotations

import math
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

    overrides = [*small_movielens(tmp_path / "data", users=160), f"storage={tmp_path / 'runs'}", "oracle.max_steps=300"]
    proc = subprocess.run(rosepo_command("run", "--config", "configs/ml100k-tiny.yaml", *overrides, "--until", "sft"),
                          cwd=REPO, env=COMMAND_ENV, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # 1,500 steps of 32 would pass over the ~2,500 samples 19 times: each gets its 3 decoys, and
    # with them the heavier candidate term.
    assert "sft: 3 decoys per sample, candidate weight 3 " in proc.stdout + proc.stderr
    cfg = load_config(REPO / "configs" / "ml100k-tiny.yaml", overrides)
    run = tmp_path / "runs" / cfg.name
    base, adapter, samples = run_model(run, cfg, "sft")
    assert 2000 <= len(read_split(samples, "train")) <= 3000
    sft = read_manifest(next(run.glob("sft-*")))
    rows = len(read_split(samples, "train")) * (1 + cfg.sft.decoys)
    # The cap stops SFT before its step budget: 2 passes over the samples and their decoys.
    batch = cfg.sft.num_workers * cfg.sft.micro_batch_size * cfg.sft.grad_accum
    assert len(sft["history"]) == math.ceil(cfg.sft.max_epochs * rows / batch) < cfg.sft.max_steps
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
    # Measured here: ValidRatio 0.925, rank HR@1 0.525 against most-popular's 0.487. With decoys
    # alone 0.838; before the decoys and the cap, 0.688 (SFT and the oracle at 300 steps).
    assert metrics["valid_ratio"] >= 0.9
    assert rank >= popular
