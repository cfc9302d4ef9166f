"""Every benchmark of bench/ run through its real entry point (`bench.__main__.main`) at a tiny size,
so that a documented command cannot break unnoticed. Each takes seconds; what is checked is the
shape of what it prints or writes (its rows, keys and columns) and the equalities it reports, never
its speed. Their caches (the tiny model, the scaled inputs) live in one temporary folder.

The benchmarks that read a pipeline's stages (`report`, `sft-probe`, `fusion`, `gpu-sft`) reuse the
session's smoke run (tests/conftest.py, `smoke_run`): with its overrides their stages are found, not
built. `trl` runs its TRL half where TRL is installed (pyproject's ``bench`` extra, not a test
dependency) and rosepo's half everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import common, data_pipeline  # noqa: E402
from bench.__main__ import BENCHMARKS, main  # noqa: E402

SMOKE = str(REPO / "configs" / "smoke.yaml")
HAS_TRL = importlib.util.find_spec("trl") is not None
#: Prompts from the first 4 ML-100K users, batches of 2, one round: align, trl and eval share the tiny model.
TINY = ["--reps", "1", "--batch", "2", "--batches", "1", "--users", "4"]
TRL_VARIANTS = ["rosepo", "trl", "trl-precomputed", "trl-compact", "trl-compact-precomputed"]


def tables(out: str) -> list[tuple[list[str], list[list[str]]]]:
    """The Markdown tables printed in ``out``, in order: (header cells, rows of cells) each. A table
    starts at a row followed by a ``|---|`` line (tables may follow each other without a blank line)."""
    lines = out.splitlines()
    found = []
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip()[1:-1].split("|")] if line.startswith("|") else None
        if cells is None or line.startswith("|---"):
            continue
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            found.append((cells, []))
        else:
            found[-1][1].append(cells)
    return found


def json_lines(out: str) -> list[dict]:
    """The lines of ``out`` that are JSON objects."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """The benchmarks' cache folder (`bench.common.WORK`) for this module."""
    work = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "WORK", work)
        mp.setattr(data_pipeline, "WORK", work / "data")
        yield work


def run_bench(capsys, *argv: str) -> str:
    """``python -m bench *argv`` in this process; its stdout, after asserting exit code 0."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]
    assert out.startswith(f"== bench {argv[0]} ==\n")
    return out


#: name -> (tiny options, the first column of each table printed, in order) of the benchmarks that
#: need no pipeline run.
TABLES = {
    "align": (TINY, [["shared", "plain", "shared-2threads"],
                     ["prefix sharing vs plain rows", "1 thread vs 2 threads"]]),
    "trl": ([*TINY, "--train-steps", "1"] if HAS_TRL else [*TINY, "--no-trl"],
            [TRL_VARIANTS, [f"rosepo vs {v}" for v in ("trl", "trl-compact", "trl-precomputed",
                                                        "trl-compact-precomputed")]] if HAS_TRL else [["rosepo"]]),
    "eval": ([*TINY, "--new-tokens", "2"],
             [["rank", "rank-plain", "gen@2", "gen-nocache@2", "gen-batch1@2", "scorer"],
              ["ranking: prefix sharing vs plain rows", "generation @2: KV cache vs none",
               "generation @2: batch 2 vs 1"]]),
    "gpu": (["--device", "cpu", "--model", "tiny", "--batch", "2", "--prompt", "24", "--answer", "4", "--reps", "1"],
            [["lora", "lora", "full", "full"]]),
    "data": (["--users", "20", "--reps", "1", "--solo"],
             [["2,026", "2,026"], ["2,026"], ["2,026", "2,026", "2,026"]]),
}
#: The benchmarks that read the smoke run's stages, each tested below.
ON_THE_SMOKE_RUN = ("report", "sft-probe", "fusion", "gpu-sft")


def test_every_registered_benchmark_has_a_smoke_test():
    assert sorted(BENCHMARKS) == sorted([*TABLES, *ON_THE_SMOKE_RUN, "gpu-pipeline"])
    modules = {p.stem for p in (REPO / "bench").glob("*.py")} - {"__init__", "__main__", "common"}
    assert modules == {module.removeprefix("bench.") for module, _ in BENCHMARKS.values()}


@pytest.mark.parametrize("name", list(TABLES))
def test_benchmark_prints_its_tables(name, bench_dir, capsys):
    """Each table's first column, and what the benchmark checks of its own variants: the alignment
    step has the default config's loss terms; ranking scores and greedy tokens of the evaluation's
    variants agree; the data builds' rows equal (content hash)."""
    options, first_columns = TABLES[name]
    out = run_bench(capsys, name, *options)
    assert [[row[0] for row in rows] for _, rows in tables(out)] == first_columns
    if name in ("align", "trl"):
        assert "loss rosepo + 1 × chosen NLL + 1 × candidate term;" in out
    if name == "eval":
        assert float(re.search(r"max \|difference\| (\S+)", out).group(1)) < 1e-4
        assert "no cache 2/2, batch 1 2/2" in out
    if name == "gpu":
        rows = json_lines(out)
        assert [(r["mode"], r["prefix_sharing"]) for r in rows] == [("lora", True), ("lora", False), ("full", True),
                                                                     ("full", False)]
        assert all(r["logp_max_abs_diff_plain_vs_shared"] < 1e-4 and r["step_s"] > 0 for r in rows)
    if name == "data":
        (header, builds), (_, equal), _ = tables(out)
        assert [(r[1], r[-1]) for r in builds] == [("rosepo", "ok"), ("pandas", "ok")]
        assert equal[0][1] == "rosepo" and equal[0][-1] == "yes"


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_report_benchmark(smoke_run, smoke_overrides, ray_session, capsys):
    """One round of both variants on the smoke run's samples, oracle and model (one worker: each
    variant is a Ray Train run): a line per run, a median per variant and their ratio."""
    run = smoke_run[2]
    out = run_bench(capsys, "report", "--config", SMOKE, "--rounds", "1", "--steps", "4", f"storage={run.parent}",
                    *smoke_overrides, "sft.num_workers=1")
    runs, medians, (ratio,) = (lambda lines: (lines[:2], lines[2:4], lines[4:]))(json_lines(out))
    assert [(r["variant"], r["round"], r["steps"]) for r in runs] == [("every-step", 0, 4), ("evals-only", 0, 4)]
    assert all(r["step_ms_median"] > 0 for r in runs)
    assert [m["variant"] for m in medians] == ["every-step", "evals-only"]
    assert set(ratio) == {"every-step / evals-only", "per-round"} and len(ratio["per-round"]) == 1


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_sft_probe_benchmark(smoke_run, smoke_overrides, ray_session, capsys, tmp_path):
    """Two steps of the smoke config's SFT on two candidate draws per sample, then one step of a
    second phase with another candidate weight, evaluated after each on 4 valid samples, after
    SASRec's yardstick on the same samples; ``--out`` holds the printed curve."""
    run = smoke_run[2]
    out = run_bench(capsys, "sft-probe", "--config", SMOKE, "--steps", "2", "--eval-every", "1", "--eval-samples",
                    "4", "--train-samples", "64", "--candidate-draws", "2", "--then-steps", "1", "--then",
                    "sft.candidate_weight=2.0", "--out", str(tmp_path / "curve.json"), f"storage={run.parent}",
                    *smoke_overrides)
    yardstick, *curve = json_lines(out)
    assert yardstick["eval_samples"] == 4 and 0 <= yardstick["sasrec_rank_hr@1"] <= 1
    assert [(p["step"], p["samples"]) for p in curve] == [(1, 8), (2, 16), (3, 24)]  # 2 workers x 4 per step
    for point in curve:
        assert set(point) == {"step", "samples", "train_seconds", "loss", "valid_ratio", "hr@1", "rank/hr@1"}
        assert {point["valid_ratio"] * 4, point["hr@1"] * 4, point["rank/hr@1"] * 4} <= {0, 1, 2, 3, 4}
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["curve"] == curve and saved["candidate_draws"] == 2 and saved["then"] == ["sft.candidate_weight=2.0"]


def test_sft_probe_redraws_the_negatives_and_renders_the_prompt_again(smoke_run):
    """`redraw_candidates` on the smoke run's train samples: the originals first, then copies with
    the same history and target among 20 fresh distinct candidates whose titles the prompt lists."""
    from bench.sft_probe import redraw_candidates
    from rosepo.config import load_config
    from rosepo.data.samples import read_split

    samples = next(smoke_run[2].glob("samples-*"))
    train = read_split(samples, "train").slice(0, 30)
    both = redraw_candidates(train, samples, load_config(SMOKE).data, 2)
    assert both.num_rows == 60 and both.slice(0, 30).equals(train)
    moved = 0
    for old, new in zip(train.to_pylist(), both.slice(30).to_pylist()):
        assert new["sample_id"] == old["sample_id"] + "#1" and new["history_titles"] == old["history_titles"]
        cands = new["candidate_titles"]
        assert len(set(cands)) == len(cands) == 20 and new["target_title"] in cands
        assert not set(cands) & set(new["history_titles"])
        assert all(title in new["prompt"] for title in cands + new["history_titles"])
        moved += len(set(cands) - set(old["candidate_titles"]))
    assert moved > 30 * 15  # fresh negatives: nearly all 19 of each sample differ


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_fusion_benchmark(smoke_run, capsys, tmp_path):
    """The smoke run's evaluation fused: a row per LLM method, SASRec plus popularity and plus title
    semantics, and fusion.json / fusion.png written."""
    run = smoke_run[2]
    out = run_bench(capsys, "fusion", "--run", str(run), "--out", str(tmp_path))
    ((header, rows),) = tables(out)
    assert header[:3] == ["method", "rank HR@1", "sasrec"] and [r[0] for r in rows] == ["sft", "aligned"]
    assert re.search(r"^sasrec \+ w · popularity: alone [0-9.]+; w = 0.05: ", out, re.M)
    assert re.search(r"^sasrec \+ w · semantic: alone [0-9.]+; w = 0.05: ", out, re.M)
    result = json.loads((tmp_path / "fusion.json").read_text())
    assert result["samples"] == 16 and len(result["methods"]["sft"]["fusion_hr@1"]) == len(result["weights"]) == 21
    assert (tmp_path / "fusion.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_gpu_sft_bundle_checks_the_far_side_and_trains_there(smoke_run, smoke_overrides, ray_session, tmp_path,
                                                             capsys):
    """`python -m bench gpu-sft` on the smoke run: ``pack`` writes the bundle of two variants (item
    tokens, and with the oracle distilled); ``train`` (here on CPU) passes the bundle's own check,
    trains the steps asked and evaluates the test samples; it refuses a model whose logits or tokens
    differ from the packing machine's."""
    import torch

    from bench import gpu_sft
    from rosepo.layout import base_model_path

    run = smoke_run[2]
    bundle_dir = tmp_path / "b"
    out = run_bench(capsys, "gpu-sft", "pack", "--config", SMOKE, "--out", str(bundle_dir), "--variant", "items=",
                    "--variant", "distill=sft.oracle_weight=1.0", f"storage={run.parent}", *smoke_overrides)
    (bundle,) = json_lines(out)
    assert bundle["items"] == {"items": "items/items.safetensors", "distill": "items/distill.safetensors"}
    tokenizer = bundle_dir / "tokenizer"
    assert (tokenizer / "tokenizer.json.xz").is_file() and not (tokenizer / "tokenizer.json").exists()
    assert sorted(p.name for p in (bundle_dir / "samples/train").iterdir()) == [f"part-{k}.parquet" for k in range(4)]
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert all(len(c) == gpu_sft.CHECK_SAMPLES for c in meta["check"].values())

    model = str(base_model_path(next(run.glob("model-*"))))
    train = ["gpu-sft", "train", "--bundle", str(bundle_dir), "--model", model, "--steps", "2", "--batch", "4",
             "--eval-samples", "3"]
    run_bench(capsys, *train, "--variant", "items", "--out", str(tmp_path / "items.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert lines[0]["check_max_logit_diff"] < 1e-5
    assert [x["step"] for x in lines if "loss" in x] == [2] and all(torch.isfinite(torch.tensor(x["loss"]))
                                                                  for x in lines if "loss" in x)
    (ev,) = [x for x in lines if "eval_samples" in x]
    assert ev["eval_samples"] == 3 and ev["steps"] == 2 and ev["samples"] == 8
    assert {ev["valid_ratio"] * 3, ev["hr@1"] * 3, ev["rank/hr@1"] * 3} <= {0.0, 1.0, 2.0, 3.0}

    one_step = [*train[:-6], "--steps", "1", "--batch", "4", "--eval-samples", "1", "--variant", "distill"]
    meta["check"]["distill"][0]["top_logits"][0] += 0.5
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="logits differ by 0.5"):
        main(one_step)
    meta["check"]["distill"][0]["prompt_ids"][-1] += 1
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenises differently"):
        main(one_step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_pipeline_benchmark_reports_every_stage(smoke_run, smoke_overrides, ray_session, capsys, tmp_path):
    """`bench gpu-pipeline` on the CPU (its ``smoke`` plan over the finished smoke run, whose stages it
    finds): a row per stage with its seconds and throughput keys, the run's evaluation table, and
    the report files; no GPU, so no memory figure."""
    run = smoke_run[2]
    out = run_bench(capsys, "gpu-pipeline", "--plan", "smoke", "--cpu", "--out", str(tmp_path), "--storage",
                    str(run.parent), *smoke_overrides)
    report = json.loads((tmp_path / "gpu-pipeline.json").read_text())
    stages = report["variants"]["smoke"]["stages"]
    assert list(stages) == ["samples", "oracle", "model", "sft", "pairs", "align", "eval"]
    assert all(s["seconds"] >= 0 and s["peak GPU MiB"] is None for s in stages.values())
    assert stages["sft"]["steps"] == 4 and "step samples/s" in stages["sft"] and "samples/s" in stages["pairs"]
    assert set(report["variants"]["smoke"]["results"]) >= {"sft", "sasrec", "aligned (rosepo)"}
    (head, rows), *_ = [t for t in tables(out) if t[0][0] == "stage"]
    assert [r[0] for r in rows] == list(stages)
    assert (tmp_path / "gpu-pipeline.md").read_text().startswith("card: ")

