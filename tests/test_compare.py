"""`rosepo compare`: aggregation over seeds, the method -> config mapping, resume of finished
cells, refusal of bad input, and one end-to-end comparison on a slice of ML-100K (slow)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rosepo import pipeline
from rosepo.config import RunConfig, load_config
from rosepo.errors import ConfigError
from rosepo.eval.evaluate import BASELINES
from rosepo.experiments import compare, methods, noise, report
from rosepo.storage import atomic_dir, is_complete, read_manifest, write_manifest
from tests.conftest import copy_stages

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- aggregation

def test_aggregate_mean_and_sample_std_by_hand():
    """hr@1 over three seeds 0.1, 0.2, 0.6: mean 0.3; deviations -0.2, -0.1, 0.3, squares sum
    0.14, / (3 - 1) = 0.07, std = sqrt(0.07) = 0.264575. pop/percentile_rec is undefined (NaN,
    None) in two seeds: mean 0.5 and std 0 over the one that defines it, n = 1. A metric no seed
    defines has no mean."""
    per_seed = [{"eval/hr@1": 0.1, "eval/pop/percentile_rec": math.nan, "eval/x": None},
                {"eval/hr@1": 0.2, "eval/pop/percentile_rec": 0.5, "eval/x": None},
                {"eval/hr@1": 0.6, "eval/pop/percentile_rec": None, "eval/x": math.nan}]
    agg = report.aggregate(per_seed, ("eval/hr@1", "eval/pop/percentile_rec", "eval/x"))
    assert agg["eval/hr@1"]["mean"] == pytest.approx(0.3)
    assert agg["eval/hr@1"]["std"] == pytest.approx(0.2645751311)
    assert agg["eval/hr@1"]["n"] == 3
    assert agg["eval/pop/percentile_rec"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert agg["eval/x"] == {"mean": None, "std": None, "n": 0}
    assert report.format_cell(agg["eval/hr@1"], 3) == "0.300 ± 0.265"
    assert report.format_cell(agg["eval/pop/percentile_rec"], 3) == "0.500 ± 0.000 (n=1)"
    assert report.format_cell(agg["eval/x"], 3) == "n/a"


def test_table_has_seed_counts_baselines_as_values_and_methods_as_mean_std():
    from rosepo.eval.evaluate import TABLE_METRICS, markdown_table

    base = {m: 0.25 for m in TABLE_METRICS}
    seeds = [{m: 0.5 for m in TABLE_METRICS}, {m: 0.7 for m in TABLE_METRICS}]  # mean 0.6, std 0.1414
    table = markdown_table(report.table_rows({"sasrec": base}, {"rosepo": seeds}), ("seeds", *TABLE_METRICS))
    head, rule, sasrec, rosepo = table.splitlines()
    assert head.startswith("| method | seeds | hr@1 | valid_ratio |")
    assert sasrec == "| sasrec | 1 (deterministic) | " + " | ".join(["0.250"] * len(TABLE_METRICS)) + " |"
    assert rosepo == "| rosepo | 2 | " + " | ".join(["0.600 ± 0.141"] * len(TABLE_METRICS)) + " |"


# ---------------------------------------------------------------- methods -> configs

#: method -> (pairs.strategies of its build, pairs.num_negatives, align.loss, align.smoothing,
#: align.strategies), written out by hand from the method definitions (README, Comparison).
MIX4 = {"self_hard": 1.0, "semantic": 1.0, "popularity": 1.0, "random": 1.0}
MIX3 = ("self_hard", "semantic", "popularity")
EXPECTED = {
    "dpo": (MIX4, 1, "dpo", ("random",)),
    "cdpo": (MIX4, 1, "cdpo", ("random",)),
    "sdpo": ({"random": 1.0}, 3, "sdpo", ("random",)),
    "rosepo": (MIX4, 1, "rosepo", MIX3),
    "rosepo-self_hard": (MIX4, 1, "rosepo", ("self_hard",)),
    "rosepo-semantic": (MIX4, 1, "rosepo", ("semantic",)),
    "rosepo-popularity": (MIX4, 1, "rosepo", ("popularity",)),
    "rosepo-no-smoothing": (MIX4, 1, "rosepo", MIX3),
    "rosepo-constant-eps": (MIX4, 1, "rosepo", MIX3),
}
#: method -> ε of the pairs below: personalised, constant (eps_constant 0.1) or none.
ORACLE = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])  # chosen, rejected scores of 3 pairs
PERSONALISED = [0.119203, 0.3, 0.3]  # 1 - σ(2) = 0.1192; 1 - σ(0) = 0.5 and 1 - σ(-2) = 0.88, capped at 0.3
EPS = {"dpo": [0, 0, 0], "cdpo": [0.1] * 3, "sdpo": [0, 0, 0], "rosepo": PERSONALISED,
       "rosepo-self_hard": PERSONALISED, "rosepo-semantic": PERSONALISED, "rosepo-popularity": PERSONALISED,
       "rosepo-no-smoothing": [0, 0, 0], "rosepo-constant-eps": [0.1] * 3}


def test_every_method_is_mapped_by_hand():
    assert set(EXPECTED) == set(methods.METHODS) == set(EPS)


@pytest.mark.parametrize("method", list(EXPECTED))
def test_method_yields_its_pairs_and_align_config_and_eps(method, tmp_path):
    """Each method's cell config has the pairs build, loss and strategies of its definition,
    the seed and steps asked for, and the ε its loss trains with (`align.pair_eps`, the function
    the training loop calls) on three pairs with known oracle scores (λ = τ = 1, ε_max = 0.3)."""
    import torch

    from rosepo.train.align import pair_eps

    cfg = RunConfig(storage=str(tmp_path)).validate()
    cell = methods.cell_config(cfg, method, seed=7, steps=11)
    strategies, k, loss, align_strategies = EXPECTED[method]
    assert (cell.pairs.mix, cell.pairs.strategies, cell.pairs.num_negatives) == ("all", strategies, k)
    assert (cell.align.loss, cell.align.strategies) == (loss, align_strategies)
    assert (cell.align.seed, cell.align.max_steps, cell.align.eval_every, cell.align.eval_rec_samples) == (7, 11, 0, 0)
    # Hyperparameters are the run's, for every method.
    for key in ("beta", "learning_rate", "eps_max", "eps_constant", "micro_batch_size", "num_workers"):
        assert getattr(cell.align, key) == getattr(cfg.align, key), key
    eps = pair_eps(torch.tensor(ORACLE), cell.align).numpy()
    assert eps == pytest.approx(EPS[method], abs=1e-6)


def test_one_mix_pair_build_serves_every_method_but_sdpo(tmp_path):
    """Stage addresses: all methods but sdpo share one pairs stage (so one scoring pass), sdpo has
    its own; every method x seed has its own align stage; the compare folder does not depend on
    the methods or seeds chosen, but does on the hyperparameters and the steps."""
    cfg = RunConfig(storage=str(tmp_path)).validate()
    cells = [methods.cell_config(cfg, m, s, 5) for m in methods.METHODS for s in (0, 1, 2)]
    pairs = {pipeline.stage_key(c, "pairs") for c in cells}
    assert len(pairs) == 2
    assert pipeline.stage_key(methods.pairs_config(cfg, "mix"), "pairs") in pairs
    assert len({pipeline.stage_key(c, "align") for c in cells}) == len(cells)
    fewer = dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, seeds=1, methods=("dpo",)))
    assert compare.compare_dir(fewer) == compare.compare_dir(cfg)
    for changed in (dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, beta=0.3)),
                    dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, align_steps=9))):
        assert compare.compare_dir(changed) != compare.compare_dir(cfg)


def test_seeds_steps_and_method_selection():
    cfg = load_config(None, ["align.seed=5", "compare.seeds=2", "compare.methods=[rosepo, dpo]"])
    assert methods.seeds(cfg) == [5, 6]
    assert methods.selected_methods(cfg) == ["dpo", "rosepo"]  # table order
    assert methods.selected_methods(RunConfig()) == list(methods.METHODS)
    # 2000 train samples, 2 workers x micro-batch 8 x accumulation 1 = 16 per step: 125 steps.
    two = load_config(None, ["align.num_workers=2", "align.micro_batch_size=8"])
    assert methods.align_steps(two, 2000) == 125 and methods.align_steps(two, 2001) == 126
    assert methods.align_steps(load_config(None, ["compare.align_steps=40"]), 2000) == 40


@pytest.mark.parametrize("overrides,needle", [
    (["compare.methods=[rosepo, nope]"], "unknown method(s) 'nope'; methods: dpo, cdpo, sdpo, rosepo,"),
    (["compare.methods=[dpo, dpo]"], "names a method twice"),
    (["compare.methods=[[dpo]]"], "unknown method(s)"),
    (["compare.seeds=0"], "compare.seeds"),
    (["compare.align_steps=-1"], "compare.align_steps"),
])
def test_bad_compare_config_is_refused(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_cli_unknown_method_exits_2_naming_the_valid_ones_before_ray(tmp_path, monkeypatch, capsys):
    from rosepo import cli
    from rosepo import runtime as raysetup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(raysetup, "init_ray", lambda *a, **k: pytest.fail("Ray started for a bad config"))
    assert cli.main(["compare", "--methods", "dpo,rosepo-typo", "--seeds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rosepo: error:") and "'rosepo-typo'" in err and len(err.splitlines()) == 1
    assert all(m in err for m in methods.METHODS)
    assert cli.main(["compare", "--seeds", "0"]) == 2
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- resume

def test_finished_cells_are_skipped_and_an_interrupted_compare_resumes(tmp_path, monkeypatch, caplog):
    """Cells run seed by seed. A compare interrupted in its third cell left two finished cells
    and no partial one; the rerun runs only the four cells left, and a third run runs none.
    Results come back per method in seed order, each from its own cell."""
    cfg = load_config(None, [f"storage={tmp_path}", "compare.methods=[dpo, rosepo]", "compare.seeds=3"])
    out = compare.compare_dir(cfg)
    ran: list[tuple[str, int]] = []
    fail_at = {3}

    def fake_cell(cell_cfg, method, seed, upstream, cell_out):
        ran.append((method, seed))
        with atomic_dir(cell_out) as tmp:
            if len(ran) in fail_at:
                raise KeyboardInterrupt  # killed mid-cell
            manifest = {"method": method, "seed": seed, "metrics": {"eval/hr@1": seed / 10, "eval/rank/hr@1": 0.5},
                        "steps": cell_cfg.align.max_steps, "loss": cell_cfg.align.loss}
            write_manifest(tmp, manifest)
        return manifest

    monkeypatch.setattr(compare, "run_cell", fake_cell)
    caplog.set_level(logging.INFO, logger="rosepo")
    with pytest.raises(KeyboardInterrupt):
        compare.run_cells(cfg, ["dpo", "rosepo"], {"steps": 4}, out)
    assert ran == [("dpo", 0), ("rosepo", 0), ("dpo", 1)]
    assert is_complete(out / "cells/rosepo/seed-0") and not (out / "cells/dpo/seed-1").exists()
    assert not list(out.glob("cells/dpo/.tmp-*"))

    fail_at.clear()
    results = compare.run_cells(cfg, ["dpo", "rosepo"], {"steps": 4}, out)
    logs = caplog.messages
    assert ran[3:] == [("dpo", 1), ("rosepo", 1), ("dpo", 2), ("rosepo", 2)]
    assert [[c["seed"] for c in results[m]] for m in ("dpo", "rosepo")] == [[0, 1, 2], [0, 1, 2]]
    assert [c["loss"] for c in results["rosepo"]] == ["rosepo"] * 3 and results["dpo"][0]["steps"] == 4
    assert sum("skipped" in line for line in logs) == 2 and all("elapsed" in line for line in logs)
    assert logs[-1].startswith("compare 6/6 rosepo seed 2:")

    compare.run_cells(cfg, ["dpo", "rosepo"], {"steps": 4}, out)
    assert len(ran) == 7  # nothing ran the third time
    assert read_manifest(out / "cells/rosepo/seed-2")["metrics"]["eval/hr@1"] == 0.2


# ---------------------------------------------------------------- slow: end to end

@pytest.fixture
def untrained_sft(monkeypatch):
    """The SFT stage replaced by the built tiny model as is (a fully fine-tuned "SFT model"
    with no training): SFT has its own tests, and the comparison needs only some SFT model."""
    def sft(cfg, out, inputs):
        with atomic_dir(out, overwrite=True) as tmp:
            shutil.copytree(inputs["model"] / "hf", tmp / "model")
            write_manifest(tmp, {"stage": "sft", "untrained": True})
        return {}

    monkeypatch.setitem(pipeline.RUNNERS, "sft", sft)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_end_to_end_then_resume(ray_session, text_run, untrained_sft, tmp_path, monkeypatch, caplog):
    """The smoke config's slice (32 train samples, 4-step alignment, 16 valid samples evaluated),
    RosePO with one seed, through the real pipeline (SFT aside), Ray Train + DeepSpeed and the
    eval stage's actor pool; the outputs hold what they should; the same at label noise 0 and 0.4
    (``compare.noise_rates``: noise 0 is this comparison, reused; 0.4 builds its own pairs) and its
    noise report; a second compare runs no cell and writes the same tables. The samples, oracle
    and model are the session's text run's. One seed keeps it near 90 s on 2 cores (the pairs,
    the baselines and each cell start their own Ray Train run or actor pool; a second seed costs
    30 s more): several seeds are `run_cells`' loop, tested above."""
    # ε constant 0 and no label noise: the comparison a noise rate of 0 runs (`noise.rate_config`)
    cfg = load_config(REPO / "configs/smoke.yaml", [
        f"storage={tmp_path}", f"data.data_dir={REPO / 'data'}", "compare.methods=[rosepo]", "compare.seeds=1",
        "pairs.eval_samples=8", "align.eps_constant=0"])
    # The session's text run has the same data, oracle and model sections: its stages are reused.
    copy_stages(text_run, pipeline.run_folder(cfg), "samples", "oracle", "model")
    caplog.set_level(logging.INFO, logger="rosepo")
    paths = compare.run_compare(cfg)
    assert {m.split(":")[0] for m in caplog.messages if ": done earlier" in m} >= {"samples", "oracle", "model"}
    out = Path(paths["dir"])
    assert out == compare.compare_dir(cfg)

    cell = read_manifest(out / "cells/rosepo/seed-0")
    assert (cell["method"], cell["seed"], cell["align_steps"]) == ("rosepo", 0, 4)  # 32 samples / (2 x 4)
    assert cell["pairs"] == 3 * 32  # the mix's self_hard + semantic + popularity pairs
    assert Path(cell["align"]) == pipeline.stage_dir(methods.cell_config(cfg, "rosepo", 0, 4), "align")
    assert 0 < cell["eps"]["mean"] <= cfg.align.eps_max  # personalised ε
    assert 0 <= cell["valid_pairs"]["eval/rewards/accuracies"] <= 1
    ev = read_manifest(out / "cells/rosepo/seed-0/eval")
    assert (ev["split"], ev["samples"], ev["adapter"]) == ("valid", 16, cell["align"] + "/adapter")
    pairs = read_manifest(pipeline.stage_dir(methods.pairs_config(cfg, "mix"), "pairs"))
    assert pairs["splits"]["train"]["strategies"] == {s: 32 for s in ("popularity", "random", "self_hard", "semantic")}

    results = json.loads(Path(paths["results"]).read_text())
    assert set(results["baselines"]) == set(BASELINES)
    assert results["samples"] == 16 and results["seeds"] == [0] and results["align_steps"] == 4
    rosepo = results["methods"]["rosepo"]
    assert rosepo["per_seed"]["0"] == cell["metrics"]
    assert rosepo["aggregate"]["eval/rank/hr@1"] == {"mean": cell["metrics"]["eval/rank/hr@1"], "std": 0.0, "n": 1}
    table = Path(paths["table"]).read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["method", "random", "most_popular", "sasrec", "sft", "rosepo"]
    assert "| rosepo | 1 | " in table and "| sasrec | 1 (deterministic) | " in table
    assert f"{cell['metrics']['eval/rank/hr@1']:.3f} ± 0.000" in table
    assert Path(paths["metrics_png"]).stat().st_size > 10_000 and Path(paths["eps_png"]).stat().st_size > 5_000
    assert [line for line in caplog.messages if line.startswith("compare 1/1 rosepo seed 0: ")]

    def no_cell(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    noisy_cfg = dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, noise_rates=(0.0, 0.4)))
    assert compare.compare_dir(noise.rate_config(noisy_cfg, 0.0)) == out
    noisy = compare.run_noise_compare(noisy_cfg)
    assert Path(noisy["dir"]) == noise.noise_dir(noisy_cfg)
    result = json.loads(Path(noisy["results"]).read_text())
    assert result["rates"] == [0.0, 0.4]
    assert result["metrics"]["rosepo"]["0.0"]["eval/hr@1"]["mean"] == cell["metrics"]["eval/hr@1"]
    noisy_pairs = read_manifest(result["comparisons"]["0.4"]["mix"])
    assert noisy_pairs["config"]["label_noise"] == 0.4 and noisy_pairs["splits"]["train"]["flipped"] == round(0.4 * 128)
    clean, flipped = result["detection"]["0.0"], result["detection"]["0.4"]
    assert (clean["pairs"], clean["flipped"], clean["eps_auc"]) == (128, 0, None)  # no flipped pair: no AUC
    assert flipped["flipped"] == round(0.4 * 128) and 0 <= flipped["eps_auc"] <= 1
    assert set(clean["natural"]) == {"popularity", "random", "self_hard", "semantic"}
    assert all(0 <= d["false_negative_share"] <= 1 for d in clean["natural"].values())
    noise_table = Path(noisy["table"]).read_text()
    assert "| rosepo | " in noise_table and "| 0 | 128 | 0 | — | — |" in noise_table
    assert f"| 0.4 | 128 | {round(0.4 * 128)} | {flipped['eps_auc']:.3f} | " in noise_table
    assert Path(noisy["plot"]).stat().st_size > 10_000

    monkeypatch.setattr(compare, "run_cell", no_cell)
    again = compare.run_compare(cfg)
    assert Path(again["table"]).read_text() == table
    assert Path(compare.run_noise_compare(noisy_cfg)["table"]).read_text() == noise_table
