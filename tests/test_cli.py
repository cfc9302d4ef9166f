"""`rosepo run` as a user sees it, and `rosepo recommend` on the run it made; the parser's help,
version and ``config show``.

One smoke run (configs/smoke.yaml, every stage, with hybrid item tokens and the user token) in a
subprocess, as `make run` starts it: its own Ray, its console captured whole (stdout and stderr, in
order); the ``smoke_run`` fixture of tests/conftest.py, shared with other tests. The same run is the
item-token pipeline test (the projectors train in SFT and alignment; one run serves both:
each smoke pipeline costs minutes). The recommend tests ask that run's models through
`rosepo.cli.main`, in this process (no Ray needed). The parser's tests need no run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from rosepo.cli import build_parser, main, version
from rosepo.config import load_config
from rosepo.experiments.summary import RESULTS_PNG
from rosepo.storage import read_manifest
from tests.conftest import fixture_titles

REPO = Path(__file__).resolve().parents[1]
#: Real MovieLens titles as the catalogue (RecBole's ml-100k.item) names them: no year.
HISTORY = ["Toy Story", "Fargo", "Star Wars", "Twelve Monkeys"]


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_run_ends_with_its_summary_and_prints_no_training_reports(smoke_run):
    """The console of a whole run: no per-step Ray Train report, no per-actor FutureWarning, rank 0's
    HF-style metrics lines, no training bar redrawn after its stage, at most 100 lines; it ends with
    the summary (also summary.md): stage times, the run folder, the TensorBoard command and the
    eval table, whose numbers are the eval stage's, then the aligned model's folder; results.png
    is written."""
    summary, console, run = smoke_run
    assert "Reporting training result" not in console and "TrainingReport" not in console
    assert "FutureWarning" not in console and "Loading weights" not in console
    # The line follows the bar it cleared, after a carriage return.
    assert re.search(r"\[rosepo\] \{'loss': [0-9.]+, 'grad_norm': [0-9.e+-]+, 'learning_rate': ", console)
    lines = console.split("\n")  # a progress bar's redraws (carriage returns) are one line
    assert len(lines) <= 100, f"{len(lines)} lines"
    assert "Token authentication" not in console
    # Each training stage's bar is closed with its stage: a stage later (over 10 s), no frame of it
    # is drawn again (a bar Ray's driver never closed is redrawn under every later line).
    for stage, later in (("sft", "pairs"), ("align", "eval")):
        assert f"{stage} loss=" not in console[console.index(f"[rosepo] {later}: finished"):], stage
    assert summary.startswith("# rosepo run smoke") and summary in console
    # After it, at most the final frame of a worker's progress bar, which Ray's log forwarding can
    # deliver after the driver's last print (it runs in its own thread).
    after = console[console.rindex(summary) + len(summary):]
    assert all("%|" in line or not re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in after.split("\n")), after
    assert f"run folder: {run.resolve()}" in summary and f"tensorboard --logdir {run.resolve() / '.work'}" in summary
    for stage in ("samples", "oracle", "model", "sft", "pairs", "align", "eval"):
        assert re.search(rf"^\| {stage} \| [0-9.]+ \| {stage}-[0-9a-f]{{12}} \|$", summary, re.M), stage
    ev = read_manifest(next(run.glob("eval-*")))
    table = summary[summary.index("| method |"):].split("\n\n")[0].splitlines()
    assert table[0] == ("| method | hr@1 | valid_ratio | rank/hr@1 | rank/ndcg@5 | hallucination/no_candidate "
                        "| pop/head_share_rec |")
    assert [row.split(" | ")[0].removeprefix("| ") for row in table[2:]] == [
        "random", "most_popular", "sasrec", "sft", "aligned (rosepo)"]
    aligned = ev["results"]["aligned (rosepo)"]
    assert table[-1].startswith(f"| aligned (rosepo) | {aligned['eval/hr@1']:.3f} | {aligned['eval/valid_ratio']:.3f} "
                                f"| {aligned['eval/rank/hr@1']:.3f} | {aligned['eval/rank/ndcg@5']:.3f} |")
    assert "Evaluation on valid (16 samples)" in summary
    assert summary.endswith(f"\n\naligned model: {next(run.glob('align-*')).resolve() / 'adapter'}\n")
    assert (run / RESULTS_PNG).stat().st_size > 10_000
    assert json.loads((run / "run.json").read_text())["eval"]["folder"] == next(run.glob("eval-*")).name


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_the_run_trains_the_item_projector_in_sft_and_alignment(smoke_run):
    """Every stage with item tokens and the user token on MovieLens-100K: the model stage writes
    the item file, SFT and alignment each export item and user projectors unlike the ones they
    started from (same item table, same oracle encoder), the pairs' prompts hold item tokens and
    end with the user token of their history, and the eval stage scores SFT and RosePO."""
    import torch
    from safetensors.torch import load_file

    from rosepo.layout import find_items, read_pairs
    from rosepo.model.items import ItemTokens

    run = smoke_run[2]
    stage = {name: next(run.glob(f"{name}-*")) for name in ("model", "sft", "pairs", "align", "eval")}
    files = {name: load_file(find_items(folder)) for name, folder in
             (("model", stage["model"]), ("sft", stage["sft"] / "model"), ("align", stage["align"] / "adapter"))}
    for earlier, later in (("model", "sft"), ("sft", "align")):
        assert torch.equal(files[earlier]["table"], files[later]["table"])
        for name in ("projector", "user_projector"):
            moved = (files[later][f"{name}.2.weight"] - files[earlier][f"{name}.2.weight"]).abs().max()
            assert moved > 1e-6, f"{later} did not train the {name}"
        encoder = [k for k in files[earlier] if k.startswith("user_encoder.")]
        assert encoder and all(torch.equal(files[earlier][k], files[later][k]) for k in encoder)
    items = ItemTokens.read(find_items(stage["model"]))
    offset = items.offset
    pairs = read_pairs(stage["pairs"], "train")
    prompt_ids = pairs.column("prompt_ids").to_pylist()
    assert all(sum(offset <= t < items.user_base for t in p) >= 10 for p in prompt_ids)  # ≥ 3 history + 20 candidates
    # the user token last, naming as many history titles as the prompt's item tokens before the candidates'
    assert all(p[-1] - items.user_base == sum(offset <= t < items.user_base for t in p) - 20 for p in prompt_ids)
    for method in ("sft", "aligned"):
        metrics = json.loads((stage["eval"] / method / "metrics.json").read_text(encoding="utf-8"))
        assert 0 <= metrics["eval/rank/hr@1"] <= 1 and metrics["eval/n"] == 16, metrics


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_the_run_trains_with_the_candidate_and_distillation_terms(smoke_run):
    """configs/smoke.yaml turns on the default's extra terms (`sft.candidate_weight`,
    `sft.oracle_weight`, `align.candidate_weight`): the stages' last metrics hold each term's
    measure, in range, so the smoke run went through them on real data."""
    run = smoke_run[2]
    sft = read_manifest(next(run.glob("sft-*")))["metrics"]
    align = read_manifest(next(run.glob("align-*")))["metrics"]
    assert 0 < sft["sft/candidate_mass"] <= 1 and 0 < align["candidate_mass"] <= 1
    assert sft["sft/oracle_kl"] > 0  # an untrained 4-step model does not rank as SASRec does


def _recommend(capsys, run: Path, *args: str) -> tuple[int, str, str]:
    rc = main(["recommend", "--run", str(run), *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_recommend_answers_a_history_of_real_titles(smoke_run, capsys):
    """The aligned model's greedy answer and the top k of 20 candidates drawn from the catalogue
    (never a history title; the same 20 for the same history), log-probabilities descending."""
    run = smoke_run[2]
    rc, out, err = _recommend(capsys, run, "--history", *HISTORY, "--k", "5")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("answer: ") and lines[1].startswith("top 5 of 20 candidates")
    ranked = [re.fullmatch(r"  (\d)\. +(-?[0-9.]+)  (.+)", line) for line in lines[2:]]
    assert [int(m.group(1)) for m in ranked] == [1, 2, 3, 4, 5]
    scores = [float(m.group(2)) for m in ranked]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    titles = [m.group(3) for m in ranked]
    assert len(set(titles)) == 5 and not set(titles) & set(HISTORY)
    assert _recommend(capsys, run, "--history", *HISTORY, "--k", "5")[1] == out  # seeded: the same draw

    rc, out, err = _recommend(capsys, run, "--stage", "sft", "--history", *HISTORY,
                              "--candidates", "Fargo", "Heat", "Casino", "--k", "9")
    assert rc == 0, err
    assert out.splitlines()[1].startswith("top 3 of 3 candidates")  # k beyond the candidates: all of them
    assert {line.split("  ")[-1] for line in out.splitlines()[2:]} == {"Fargo", "Heat", "Casino"}


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_recommend_batch_from_jsonl(smoke_run, capsys, tmp_path):
    """--input: one JSON result per query line (blank lines skipped), k candidates each."""
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"history": HISTORY}) + "\n\n"
                       + json.dumps({"history": HISTORY[:2], "candidates": ["Heat", "Casino"]}) + "\n")
    rc, out, err = _recommend(capsys, smoke_run[2], "--input", str(queries), "--k", "3")
    assert rc == 0, err
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first["history"] == HISTORY and first["num_candidates"] == 20 and len(first["top"]) == 3
    assert second["num_candidates"] == 2 and {c["title"] for c in second["top"]} == {"Heat", "Casino"}
    assert all(a["score"] >= b["score"] for r in (first, second) for a, b in zip(r["top"], r["top"][1:]))


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_recommend_refuses_bad_input_naming_it(smoke_run, capsys, tmp_path):
    """An unknown title is named with its close matches, an empty history is refused, a bad
    JSONL line is named: one error line and exit code 2 each, nothing on stdout."""
    run = smoke_run[2]
    rc, out, err = _recommend(capsys, run, "--history", "Fargo", "Toy Story (1995)")
    assert (rc, out) == (2, "")
    assert "unknown title 'Toy Story (1995)' (history title 2)" in err and "'Toy Story'" in err
    rc, out, err = _recommend(capsys, run, "--history")
    assert (rc, out) == (2, "") and "the history is empty" in err
    rc, out, err = _recommend(capsys, run, "--history", *HISTORY, "--candidates", "Heat", "Hea")
    assert rc == 2 and "unknown title 'Hea' (candidate 2)" in err and "'Heat'" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"history": HISTORY}) + "\n" + json.dumps({"history": []}) + "\n")
    rc, out, err = _recommend(capsys, run, "--input", str(bad))
    assert (rc, out) == (2, "") and f"file {bad}, line 2: the history is empty" in err
    rc, out, err = _recommend(capsys, run.parent, "--history", *HISTORY)
    assert rc == 2 and "holds no config.yaml" in err


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every subcommand, groups (``data``, ``config``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and err == "", err
    return out


def test_version_is_the_packages(capsys, monkeypatch):
    """``rosepo --version`` prints pyproject's version: from the installed metadata, or read from
    pyproject.toml when the package is not installed (a checkout on PYTHONPATH)."""
    want = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert _help(capsys, ["--version"]) == f"rosepo {want}\n"

    def not_installed(name):
        raise __import__("importlib.metadata").metadata.PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", not_installed)
    assert version() == want


def test_help_describes_rosepo_in_one_paragraph_and_shows_examples(capsys):
    """The top-level help: usage, one paragraph of prose ending in a full stop, every command
    listed, and example command lines that parse."""
    out = _help(capsys, ["--help"])
    blocks = out.split("\n\n")
    assert blocks[0].startswith("usage: rosepo ")
    assert "\n\n" not in blocks[1] and len(blocks[1]) > 300 and blocks[1].endswith(".")
    assert blocks[1].startswith("rosepo post-trains an LLM-based sequential recommender with RosePO")
    for (name,), _ in [(path, sub) for path, sub in _commands(build_parser()) if len(path) == 1]:
        assert re.search(rf"^    {re.escape(name)}( |$)", out, re.M), name
    examples = out[out.index("examples:\n"):].splitlines()[1:]
    assert len(examples) == 3
    for line in examples:
        argv = shlex.split(line)
        assert argv[0] == "rosepo" and callable(build_parser().parse_args(argv[1:]).func), line


def test_every_command_has_a_description_and_an_example_that_runs(capsys):
    """Each subcommand's ``--help`` opens with one line of description and ends with an example of
    that very command, which parses; a config the example names exists and, with the example's
    overrides, passes validation."""
    commands = list(_commands(build_parser()))
    assert {" ".join(path) for path, _ in commands} >= {
        "run", "data fetch", "data build", "model fetch", "model import-gguf", "sft", "oracle", "pairs", "align",
        "eval", "tune", "compare", "recommend", "bench", "config show"}
    for path, _ in commands:
        out = _help(capsys, [*path, "--help"])
        blocks = out.rstrip("\n").split("\n\n")
        description, epilog = blocks[1], blocks[-1]
        assert "\n" not in description and description.endswith(".") and len(description) > 20, path
        assert epilog.startswith("example:\n  rosepo ") and epilog.count("\n") == 1, path
        argv = shlex.split(epilog.split("\n")[1])[1:]
        assert argv[:len(path)] == list(path), (path, argv)
        args = build_parser().parse_args(argv)
        if getattr(args, "config", None):
            load_config(REPO / args.config, args.overrides)
        for key in ("search",):
            if getattr(args, key, None):
                assert (REPO / getattr(args, key)).is_file(), argv


def test_recommend_examples_name_titles_of_the_catalogue(capsys):
    """The titles in ``rosepo recommend``'s example and help are MovieLens titles as rosepo's
    catalogue holds them (no year: rosepo.data.titles), here RecBole's ml-100k.item items 1-150."""
    out = _help(capsys, ["recommend", "--help"])
    history = build_parser().parse_args(shlex.split(out.rstrip().splitlines()[-1])[1:]).history
    quoted = re.findall(r'e\.g\. "([^"]+)"', out)
    assert history and quoted and set(history + quoted) <= set(fixture_titles()), (history, quoted)


def test_config_show_prints_yaml_that_loads_back_to_the_same_config(capsys, tmp_path):
    """``rosepo config show`` prints the config with the overrides applied, as YAML that
    `load_config` reads back to an equal config (tuples, mappings, a tab, a YAML-1.1 exponent)."""
    overrides = ["align.beta=0.2", "data.delimiter=\"\\t\"", "pairs.strategies={semantic: 2}",
                 "model.lora_target_modules=[q_proj, v_proj]", "sft.learning_rate=2e-4"]
    rc = main(["config", "show", "--config", str(REPO / "configs/ml100k-tiny.yaml"), *overrides])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    printed = yaml.safe_load(out)
    assert printed["align"]["beta"] == 0.2 and printed["sft"]["learning_rate"] == 2e-4
    assert printed["data"]["delimiter"] == "\t" and printed["pairs"]["strategies"] == {"semantic": 2}
    (tmp_path / "shown.yaml").write_text(out, encoding="utf-8")
    want = load_config(REPO / "configs/ml100k-tiny.yaml", overrides)
    assert load_config(tmp_path / "shown.yaml") == want
    assert want.model.lora_target_modules == ("q_proj", "v_proj")


def test_config_show_refuses_a_bad_config_in_one_line(capsys):
    """A value out of range, an unknown key: exit code 2, one error line naming the key, no YAML."""
    for override, named in (("align.beta=-1", "'align.beta' must be > 0, got -1.0"),
                            ("align.bta=0.2", "unknown config key(s) align.bta")):
        rc = main(["config", "show", "--config", str(REPO / "configs/ml100k-tiny.yaml"), override])
        out, err = capsys.readouterr()
        assert (rc, out) == (2, "") and err.count("\n") == 1 and err.startswith("rosepo: error: ") and named in err


def test_help_version_and_config_show_import_neither_torch_nor_ray():
    """The quick commands stay quick: in a fresh interpreter, none of them imports torch,
    transformers or Ray."""
    code = ("import sys\nfrom rosepo.cli import main\n"
            "for argv in (['--help'], ['--version'], ['recommend', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert main(['config', 'show', '--config', 'configs/ml100k-tiny.yaml']) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
