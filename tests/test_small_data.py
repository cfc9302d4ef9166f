"""The default recipe on a data set a thirtieth of MovieLens-100K's size still makes a recommender.

Budgets are steps, not samples or epochs: SFT trains ``sft.max_steps`` steps whatever the data
size (cycling epochs on small data) and the oracle ``oracle.max_steps``, keeping its best valid
weights. A recipe sized in samples once gave a 2,467-sample data set 77 SFT steps and a model that
named a candidate 2% of the time; this test runs `make run`'s config, only the data changed, on the
160 MovieLens users with the fewest ratings (~2,500 train samples), and asks for ValidRatio >= 0.9
after SFT.
"""

from __future__ import annotations

import csv
import subprocess

import pytest

from rosepo.config import load_config
from rosepo.data.samples import read_split
from tests.conftest import COMMAND_ENV, REPO, rosepo_command

#: The slice: the MovieLens-100K users with the fewest ratings.
USERS = 160


def small_movielens(folder) -> list[str]:
    """Write the slice as CSV files (the whole catalogue, the users' interactions) into ``folder``,
    as rosepo reads MovieLens-100K (films listed twice merged, namesakes dated); returns the config
    overrides that read it."""
    from rosepo.config import DataConfig
    from rosepo.data.samples import load_source

    folder.mkdir(parents=True, exist_ok=True)
    events, catalog, _ = load_source(DataConfig(data_dir=str(REPO / "data")))
    counts: dict[str, int] = {}
    for user in events.column("user_id").to_pylist():
        counts[user] = counts.get(user, 0) + 1
    keep = set(sorted(counts, key=lambda u: (counts[u], u))[:USERS])
    with open(folder / "events.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(r for r in zip(*(events.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))
                    if r[0] in keep)
    with open(folder / "items.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    return ["data.format=csv", f"data.interactions={folder / 'events.csv'}", f"data.catalog={folder / 'items.csv'}"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_default_recipe_makes_a_recommender_on_a_small_data_set(tmp_path):
    from rosepo.eval.evaluate import EvalScorer
    from rosepo.eval.metrics import generation_metrics
    from rosepo.experiments.recommend import run_model
    from rosepo.storage import read_manifest

    overrides = [*small_movielens(tmp_path / "data"), f"storage={tmp_path / 'runs'}"]
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
    answers = scorer(test.select(["sample_id", "prompt", "history_item_ids", "history_titles", "candidate_item_ids",
                                  "candidate_titles"])).column("answer").to_pylist()
    titles = test.column("candidate_titles").to_pylist()
    targets = [c.index(t) for c, t in zip(test.column("candidate_item_ids").to_pylist(),
                                          test.column("target_item_id").to_pylist())]
    metrics = generation_metrics(answers, titles, targets)
    print(f"\nsmall data: {len(test)} test samples, SFT valid_ratio {metrics['valid_ratio']:.3f}, "
          f"hr@1 {metrics['hr@1']:.3f}")
    assert metrics["valid_ratio"] >= 0.9
