"""Ray Tune over RosePO alignment: search files (fast), the align task's recommendation metrics,
and real searches on ML-100K pairs (slow).

The slow searches optimise ``eval/smoothing/eps_mean`` (mode min) over a grid of ``align.eps_max``:
that metric is a fixed function of ``eps_max`` on the shared eval pairs, so which trial is best
and which one ASHA stops are known in advance, while everything else (Tune, Train V2, DeepSpeed,
reporting, result files, the recommendation metrics every trial reports) runs for real.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rosepo.config import AlignConfig, ModelConfig, PairsConfig, RunConfig, apply_values, load_config
from rosepo.errors import ConfigError
from rosepo.experiments.search import check_search, eval_reports, load_search, validate_search

REPO = Path(__file__).resolve().parents[2]
METRIC = "eval/smoothing/eps_mean"


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- fast

def test_bundled_search_loads_with_defaults():
    s = load_search(REPO / "configs/search/rosepo-small.yaml")
    assert s["num_samples"] == 2 and s["metric"] == "eval/hr@1" and s["mode"] == "max"
    assert s["scheduler"] == {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 0}
    assert s["space"]["align.beta"] == {"loguniform": [0.05, 1.0]} and s["max_failures"] == 1
    assert set(s["space"]) == {"align.beta", "align.smoothing_tau", "align.eps_max", "align.strategies"}
    check_search(load_config(REPO / "configs/ml100k-tiny.yaml"), s, {"CPU": 2.0})
    assert validate_search({"space": {"align.beta": {"grid": [0.1]}}})["metric"] == "eval/hr@1"


@pytest.mark.parametrize("text, needle", [
    ("space: {align.betta: {uniform: [0.1, 1]}}", "align.betta"),
    ("space: {nosection.beta: {uniform: [0.1, 1]}}", "nosection.beta"),
    ("space: {align.beta: {normal: [0, 1]}}", "align.beta"),
    ("space: {align.beta: {loguniform: [0, 1]}}", "low > 0"),
    ("space: {align.beta: {uniform: [1, 0.1]}}", "low < high"),
    ("space: {align.eps_max: {uniform: [0.1, 0.6]}}", "align.eps_max"),  # 0.6 >= 0.5 is refused
    ("space: {align.loss: {choice: [rosepo, nope]}}", "align.loss"),
    ("space: {align.beta: {grid: []}}", "non-empty"),
    ("sample: 3\nspace: {align.beta: {grid: [0.1]}}", "sample"),
    ("scheduler: {name: pbt}\nspace: {align.beta: {grid: [0.1]}}", "scheduler.name"),
    ("search_alg: optuna\nspace: {align.beta: {grid: [0.1]}}", "optuna"),  # not installed here
    ("space: {}", "space"),
    ("space: {pairs.num_negatives: {grid: [1, 2]}}", "only align"),  # trials share the pairs
    ("space: {align.strategies: {grid: [[self_hard], [nope]]}}", "align.strategies"),
    ("max_failures: -1\nspace: {align.beta: {grid: [0.1]}}", "max_failures"),
    ("space:\n  align.beta: {grid: [0.1]}\n  align.beta: {grid: [0.2]}\n",
     "key 'space.align.beta' appears twice"),                                   # once the later, silently
    ("# only a comment\n", "holds no settings"),
])
def test_bad_search_files_are_refused_naming_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_search(_write(tmp_path, text))


def test_space_becomes_tune_distributions():
    from ray import tune

    from rosepo.experiments.search import search_space

    out = search_space({"align.beta": {"loguniform": [0.05, 1.0]}, "align.eps_max": {"uniform": [0.1, 0.2]},
                        "align.loss": {"choice": ["rosepo", "dpo"]}, "align.smoothing_tau": {"grid": [0.5, 2]}})
    assert isinstance(out["align.beta"], tune.search.sample.Float)
    assert (out["align.beta"].lower, out["align.beta"].upper) == (0.05, 1.0)
    assert isinstance(out["align.beta"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(out["align.eps_max"].get_sampler(), tune.search.sample.Uniform)
    assert out["align.loss"].categories == ["rosepo", "dpo"]
    assert out["align.smoothing_tau"] == {"grid_search": [0.5, 2]}


def test_apply_values_sets_dotted_keys_and_validates():
    cfg = apply_values(RunConfig(), {"align.beta": 0.25, "align.eps_max": 0.1, "pairs.num_negatives": 2})
    assert (cfg.align.beta, cfg.align.eps_max, cfg.pairs.num_negatives) == (0.25, 0.1, 2)
    assert cfg.sft == RunConfig().validate().sft  # other sections untouched
    with pytest.raises(ConfigError, match="align.eps_max"):
        apply_values(RunConfig(), {"align.eps_max": 0.5})
    with pytest.raises(ConfigError, match="align.nope"):
        apply_values(RunConfig(), {"align.nope": 1})


def test_check_search_refuses_what_cannot_run_or_report():
    """A metric the evaluation does not make (greedy under ZeRO-3, any slice metric with the slice
    off) or a trial bigger than the cluster, each naming the remedy."""
    search = validate_search({"space": {"align.beta": {"grid": [0.1]}}})
    cfg = _cfg(num_workers=2, cpus_per_worker=0.5)
    check_search(cfg, search, {"CPU": 1.0})  # fractional CPUs fit
    with pytest.raises(ConfigError, match="2 CPUs.*has 1.*align.num_workers"):
        check_search(_cfg(num_workers=2), search, {"CPU": 1.0})
    with pytest.raises(ConfigError, match="2 GPUs.*has 1"):
        check_search(_cfg(num_workers=2, use_gpu=True), search, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="ZeRO-3.*eval/rank/hr@1"):
        check_search(_cfg(zero_stage=3), search)
    check_search(_cfg(zero_stage=3), {**search, "metric": "eval/rank/hr@1"})
    with pytest.raises(ConfigError, match="eval_rec_samples"):
        check_search(_cfg(eval_rec_samples=0), {**search, "metric": "eval/rank/hr@1"})


@pytest.mark.parametrize("entry", [["-m", "rosepo.cli", "tune"], [str(REPO / "jobs" / "tune.py")]],
                         ids=["rosepo tune", "jobs/tune.py"])
def test_tune_command_refuses_a_bad_search_before_ray_starts(tmp_path, entry):
    """`rosepo tune` and jobs/tune.py (the same command) check the search against the config
    first: one error line, exit code 2, nothing written, no Ray started."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    args = ["--config", str(REPO / "configs/ml100k-tiny.yaml"), "--search",
            str(REPO / "configs/search/rosepo-small.yaml"), "align.zero_stage=3"]
    proc = subprocess.run([sys.executable, *entry, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rosepo: error: metric eval/hr@1") and "ZeRO-3" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_eval_reports_counts_fit_evaluations():
    """fit evaluates at steps eval_every, 2·eval_every, ... and at the last step (step 0 is not
    reported): 10 steps every 4 -> steps 4, 8, 10; every 0 -> only 10; every 5 -> 5, 10."""
    assert eval_reports(10, 4) == 3
    assert eval_reports(10, 0) == 1
    assert eval_reports(10, 5) == 2
    assert eval_reports(4, 1) == 4


# ---------------------------------------------------------------- slow: real searches

def _cfg(**align) -> RunConfig:
    base = dict(num_workers=1, cpus_per_worker=1.0, zero_stage=2, micro_batch_size=4, learning_rate=2e-3,
                warmup_ratio=0.0, max_steps=4, eval_every=1, finetune="lora", beta=0.5, eval_rec_samples=8)
    return RunConfig(model=ModelConfig(lora_r=8, lora_alpha=16),
                     pairs=PairsConfig(embedder="tfidf", num_actors=1, batch_size=16, eval_samples=16),
                     align=AlignConfig(**{**base, **align})).validate()


@pytest.fixture(scope="module")
def tune_inputs(ml100k_samples, tmp_path_factory):
    """What `rosepo.experiments.tune.prepare_inputs` returns, for 32 train / 16 valid pairs built from the real
    ML-100K samples with a tiny model (standing in for the SFT model) and a 1-epoch oracle."""
    from rosepo.config import OracleConfig
    from rosepo.data.samples import read_split
    from rosepo.model.factory import build_tiny_model, load_tokenizer
    from rosepo.pairs.build import build_pairs
    from rosepo.pairs.oracle import train_oracle

    root = tmp_path_factory.mktemp("tune")
    train = read_split(ml100k_samples, "train")
    texts = train.column("prompt").to_pylist()[::40] + train.column("answer").to_pylist()[::10]
    model = build_tiny_model(_cfg().model, texts, root / "model")
    train_oracle(ml100k_samples, OracleConfig(epochs=1, max_samples=2000), root / "oracle")
    build_pairs(_cfg(), ml100k_samples, str(model), None, root / "oracle", root / "pairs",
                splits={"train": 32, "valid": 16})
    return {"pairs": str(root / "pairs"), "model_path": str(model), "adapter": None,
            "pad_id": load_tokenizer(str(model)).pad_token_id}


def test_align_recommendation_metrics_equal_the_eval_stage(tune_inputs, ml100k_samples):
    """The align task's in-training recommendation metrics (`align.eval_setup` + `eval_metrics`)
    of a model on the first ``eval_rec_samples`` valid samples of the held-out pairs equal the
    eval stage's (`EvalScorer` + `score_metrics`) on those samples: the same functions, prompts,
    candidates and targets, so the same numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from rosepo.data.popularity import train_popularity
    from rosepo.data.samples import read_split
    from rosepo.eval.evaluate import EvalScorer, catalog_titles, score_metrics
    from rosepo.layout import read_pairs
    from rosepo.model.factory import load_tokenizer
    from rosepo.train import align

    cfg = _cfg(eval_rec_samples=6, micro_batch_size=8)  # one batch, as EvalScorer scores it
    tok = load_tokenizer(tune_inputs["model_path"])
    rows = read_pairs(tune_inputs["pairs"], "valid").to_pylist()
    task = align.AlignTask(cfg.align, cfg.model, tok.pad_token_id)
    off = align.AlignTask(dataclasses.replace(cfg.align, eval_rec_samples=0), cfg.model, tok.pad_token_id)
    assert off.eval_setup(rows, tok) is None
    state = task.eval_setup(rows, tok)
    ids = sorted({r["sample_id"] for r in rows})[:6]
    valid = read_split(ml100k_samples, "valid")
    samples = valid.filter(pc.is_in(valid.column("sample_id"), pa.array(ids))).sort_by("sample_id")
    assert samples.column("sample_id").to_pylist() == ids and len(state["targets"]) == 6

    scorer = EvalScorer(cfg, tune_inputs["model_path"], None)
    ours = task.eval_metrics(scorer.model, tok, state)
    scored = scorer(samples.select(["sample_id", "prompt", "candidate_titles"]))
    theirs, _ = score_metrics(samples, scored.column("answer").to_pylist(),
                              np.array(scored.column("scores").to_pylist()), None,
                              train_popularity(ml100k_samples), catalog_titles(ml100k_samples))
    assert set(ours) == {"hr@1", "valid_ratio", "hr@1_valid", "rank/hr@1", "rank/ndcg@1", "rank/hr@5", "rank/ndcg@5"}
    for key, value in ours.items():
        assert value == pytest.approx(theirs[f"eval/{key}"], abs=1e-9), key
    zero3 = align.AlignTask(dataclasses.replace(cfg.align, zero_stage=3), cfg.model, tok.pad_token_id)
    no_greedy = zero3.eval_metrics(scorer.model, tok, state)
    assert set(no_greedy) == {k for k in ours if k.startswith("rank/")}


def _pairs_state(inputs) -> dict:
    pairs = Path(inputs["pairs"])
    return {str(p.relative_to(pairs.parent)): p.stat().st_mtime_ns for p in pairs.parent.rglob("*")
            if "pairs" in p.parts}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_asha_search_stops_a_trial_and_best_config_trains(ray_session, tune_inputs, tmp_path):
    """4 trials (eps_max grid × 2 samples, β log-uniform), 2 at a time, ASHA over the 4 evaluations
    with grace 1 and factor 2: a trial with eps_max 0.4 reaches a rung where an eps_max 0.05 trial
    already is and is stopped. best.yaml holds eps_max 0.05, loads and trains; the pairs are not
    rebuilt by any trial; each trial wrote TensorBoard logs."""
    from rosepo.experiments.tune import run_tune

    before = _pairs_state(tune_inputs)
    search = validate_search({
        "num_samples": 2, "max_concurrent_trials": 2, "metric": METRIC, "mode": "min",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"align.eps_max": {"grid": [0.05, 0.4]}, "align.beta": {"loguniform": [0.05, 1.0]}}})
    out = run_tune(_cfg(), search, storage=tmp_path, name="asha", inputs=tune_inputs)

    rows = out["trials"]
    assert len(rows) == 4 and all(r["status"] != "error" for r in rows)
    early = [r for r in rows if r["status"] == "stopped early"]
    assert early and all(r["evaluations"] < 4 and r["align.eps_max"] == 0.4 for r in early)
    assert all(r["evaluations"] == 4 for r in rows if r["status"] == "completed")
    assert out["best"]["align.eps_max"] == 0.05
    assert {r["align.eps_max"] for r in rows} == {0.05, 0.4}
    low = [r[METRIC] for r in rows if r["align.eps_max"] == 0.05]
    high = [r[METRIC] for r in rows if r["align.eps_max"] == 0.4]
    assert 0 < max(low) < min(high) <= 0.4
    assert _pairs_state(tune_inputs) == before  # no trial rebuilt or touched the pairs
    for r in rows:  # the recommendation metrics of the valid slice are reported (requirement 2)
        assert 0 <= r["eval/hr@1"] <= r["eval/valid_ratio"] <= 1 and 0 <= r["eval/rank/hr@1"] <= 1, r
        assert 0 <= r["eval/rewards/accuracies"] <= 1 and r["restarts"] == 0

    exp = Path(out["experiment"])
    assert (exp / "trials.png").stat().st_size > 1000
    csv_lines = (exp / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "status" in csv_lines[0] and METRIC in csv_lines[0]
    assert (exp / "trials.md").read_text().count("stopped early") == len(early)
    assert len(list(exp.glob("trials/*/align/tensorboard/events.*"))) == 4

    best = load_config(exp / "best.yaml", ["align.max_steps=2", "align.eval_every=0"])
    assert best.align.eps_max == 0.05 and best.align.beta == pytest.approx(out["best"]["align.beta"])
    assert best.align.num_workers == 1 and best.pairs.embedder == "tfidf"  # the rest of the config kept
    import ray

    from rosepo.layout import read_pairs
    from rosepo.train.align import AlignTask
    from rosepo.train.loop import fit

    result = fit(AlignTask(best.align, best.model, tune_inputs["pad_id"]), best.model,
                 model_path=tune_inputs["model_path"], adapter=None,
                 datasets={"train": ray.data.from_arrow(read_pairs(tune_inputs["pairs"], "train"))},
                 output_dir=str(tmp_path / "best"), run_name="best")
    assert [h["step"] for h in result["history"]] == [1, 2]
    assert all(0 < h["loss"] < 2 for h in result["history"])


DRIVER = """
import json, sys
from rosepo.cli import configure_logging
from rosepo.config import load_config
from rosepo.runtime import init_ray
from rosepo.experiments.tune import run_tune
configure_logging()
args = json.loads(sys.argv[1])
init_ray(args["address"])
run_tune(load_config(args["config"]), args["search"], storage=args["storage"], name="resume",
         inputs=args["inputs"])
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, tune_inputs, tmp_path):
    """A driver running 2 trials one at a time is killed (SIGKILL) as soon as the first trial
    finishes; without resume the experiment is refused; with resume the second trial runs and the
    first one is neither rerun nor rewritten."""
    import yaml

    from rosepo.experiments.tune import run_tune

    cfg = _cfg(max_steps=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    search = {"num_samples": 1, "max_concurrent_trials": 1, "metric": METRIC, "mode": "min",
              "scheduler": {"name": "fifo"}, "space": {"align.eps_max": {"grid": [0.05, 0.4]}}}
    args = {"address": ray_session.get_runtime_context().gcs_address, "config": str(tmp_path / "cfg.yaml"),
            "search": search, "storage": str(tmp_path), "inputs": tune_inputs}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    finished = None
    for line in proc.stdout:  # blocks until the driver prints; pytest-timeout bounds it
        # The log line can follow a progress bar's carriage return on the same line.
        if "[rosepo] trial " in line and " finished" in line:
            finished = line.split("[rosepo] trial ", 1)[1].split()[0]
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished, "the driver ended before a trial finished"
    exp = tmp_path / "resume"
    # Tune's own per-trial files are synced lazily and rewritten on restore; the training output
    # of the finished trial is what must not change.
    snapshot = {str(p): p.stat().st_mtime_ns for p in (exp / "trials" / finished).rglob("*") if p.is_file()}
    assert any("/align/checkpoint_" in p for p in snapshot)

    with pytest.raises(ConfigError, match="resume"):
        run_tune(cfg, search, storage=tmp_path, name="resume", inputs=tune_inputs)
    out = run_tune(cfg, search, storage=tmp_path, name="resume", resume=True, inputs=tune_inputs)

    rows = {r["trial_id"]: r for r in out["trials"]}
    assert len(rows) == 2 and finished in rows
    assert all(r["status"] == "completed" and r["evaluations"] == 2 for r in rows.values()), out["trials"]
    assert out["best"]["align.eps_max"] == 0.05
    after = {str(p): p.stat().st_mtime_ns for p in (exp / "trials" / finished).rglob("*") if p.is_file()}
    assert after == snapshot  # the finished trial was not rerun: same files, untouched


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_trial_is_retried_per_failure_config(ray_session, tune_inputs, tmp_path, monkeypatch):
    """`FAULT_ENV` makes the first trial raise once. With ``max_failures: 1`` it is restarted, the
    search completes and the summary shows one restart; with ``max_failures: 0`` the trial ends
    in error, and the search still completes, reports it and picks the best of the others."""
    from rosepo.experiments.trial import FAULT_ENV
    from rosepo.experiments.tune import run_tune

    cfg = _cfg(max_steps=2, eval_every=0, eval_rec_samples=0)
    # Both trials at once (one CPU each): the fault file is created atomically, so one trial fails.
    search = {"num_samples": 1, "max_concurrent_trials": 2, "metric": METRIC, "mode": "min",
              "scheduler": {"name": "fifo"}, "space": {"align.eps_max": {"grid": [0.05, 0.4]}}}

    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "fault-retried"))
    out = run_tune(cfg, {**search, "max_failures": 1}, storage=tmp_path, name="retried", inputs=tune_inputs)
    rows = out["trials"]
    assert (tmp_path / "fault-retried").is_file()
    assert sorted(r["restarts"] for r in rows) == [0, 1], rows
    assert all(r["status"] == "completed" and r["evaluations"] == 1 for r in rows), rows
    assert out["best"]["align.eps_max"] == 0.05
    assert "| restarts |" in (Path(out["experiment"]) / "trials.md").read_text().splitlines()[0]

    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "fault-errored"))
    out = run_tune(cfg, {**search, "max_failures": 0}, storage=tmp_path, name="errored", inputs=tune_inputs)
    rows = out["trials"]
    failed = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 2 and len(failed) == 1 and math.isnan(failed[0][METRIC]), rows
    ok = [r for r in rows if r["status"] == "completed"]
    assert len(ok) == 1 and out["best"]["align.eps_max"] == ok[0]["align.eps_max"]
    assert "error" in (Path(out["experiment"]) / "trials.csv").read_text()
