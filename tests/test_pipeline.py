"""The stage graph: addressing by config hash, skipping finished stages, forcing, atomic outputs."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from rosepo import pipeline
from rosepo.config import RunConfig
from rosepo.errors import ConfigError
from rosepo.storage import atomic_dir, atomic_path, atomic_write_text, write_manifest


@pytest.fixture
def fake_runners(monkeypatch):
    calls: list[str] = []

    def make(stage):
        def run(cfg, out, inputs):
            assert set(inputs) == set(pipeline.GRAPH[stage][1]) and all(p.is_dir() for p in inputs.values())
            calls.append(stage)
            with atomic_dir(out, overwrite=True) as tmp:
                write_manifest(tmp, {"stage": stage, "model_path": "m"})
            return {}
        return run

    monkeypatch.setattr(pipeline, "RUNNERS", {s: make(s) for s in pipeline.GRAPH})
    return calls


def test_rerun_skips_finished_stages_and_force_redoes_one(tmp_path, fake_runners, caplog):
    cfg = RunConfig(storage=str(tmp_path))
    caplog.set_level(logging.INFO, logger="rosepo")
    outs = pipeline.run_pipeline(cfg)
    assert fake_runners == list(pipeline.GRAPH) and all((p / "manifest.json").is_file() for p in outs.values())
    pipeline.run_pipeline(cfg)
    assert fake_runners == list(pipeline.GRAPH)  # nothing ran again
    assert sum("done earlier" in line for line in caplog.messages) == len(pipeline.GRAPH)  # one line per stage
    pipeline.run_pipeline(cfg, force=("pairs",))
    assert fake_runners[len(pipeline.GRAPH):] == ["pairs"]
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.run_pipeline(cfg, force=("nope",))


def test_stage_addresses_follow_their_config(tmp_path):
    """Changing β or the smoothing moves align and eval only: pairs (and their reference
    log-probs) are shared by every alignment/Tune trial; changing the data moves everything."""
    cfg = RunConfig(storage=str(tmp_path))
    keys = {s: pipeline.stage_key(cfg, s) for s in pipeline.GRAPH}
    tuned = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, beta=0.5, eps_max=0.2, smoothing_tau=2.0))
    moved = {s for s in pipeline.GRAPH if pipeline.stage_key(tuned, s) != keys[s]}
    assert moved == {"align", "eval"}
    other_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=1))
    assert all(pipeline.stage_key(other_data, s) != keys[s] for s in pipeline.GRAPH)
    # How often metrics are printed, how long a stage waits for its workers and how often a
    # failed worker is retried change no output: no stage moves (config.UNHASHED).
    chatty = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, logging_steps=1, start_timeout_s=1800.0),
                                 align=dataclasses.replace(cfg.align, logging_steps=0, max_failures=2))
    assert {s: pipeline.stage_key(chatty, s) for s in pipeline.GRAPH} == keys


def test_run_record_holds_the_config_and_stage_times(tmp_path, fake_runners):
    """``config.yaml`` loads back as the run's config; ``run.json`` gives each stage's folder and
    build time, kept (flagged reused) when a rerun finds the stage finished, dropped when the
    config no longer addresses that folder."""
    from rosepo.config import load_config

    cfg = RunConfig(storage=str(tmp_path), name="r").validate()
    outs = pipeline.run_pipeline(cfg, until="sft")
    folder = pipeline.run_folder(cfg)
    assert load_config(folder / pipeline.RUN_CONFIG) == cfg
    first = pipeline.read_run_record(folder)
    assert list(first) == list(outs) == ["samples", "oracle", "model", "sft"]
    assert all(r["folder"] == outs[s].name and not r["reused"] and r["seconds"] >= 0 for s, r in first.items())
    pipeline.run_pipeline(cfg)
    again = pipeline.read_run_record(folder)
    assert list(again) == list(pipeline.GRAPH)
    assert all(again[s] == {**first[s], "reused": True} for s in first)
    assert not any(again[s]["reused"] for s in ("pairs", "align", "eval"))
    moved = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, beta=0.5))
    pipeline.run_pipeline(moved, until="pairs")
    assert list(pipeline.read_run_record(folder)) == ["samples", "oracle", "model", "sft", "pairs"]


def test_until_stops_after_the_stage(tmp_path, fake_runners):
    outs = pipeline.run_pipeline(RunConfig(storage=str(tmp_path)), until="sft")
    # The oracle comes before the model: model.title_init: sasrec builds the title tokens from it.
    assert list(outs) == ["samples", "oracle", "model", "sft"] and fake_runners == ["samples", "oracle", "model", "sft"]


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    """A file written through `atomic_path` appears whole; a writer that fails leaves the old
    file untouched and no temporary behind (Tune's best.yaml/trials.png are written this way)."""
    target = tmp_path / "out" / "trials.png"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == target.parent
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["trials.png"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["trials.png"]


def test_over_long_prompt_refused_at_the_model_stage(tmp_path):
    """A 10,000-character title (``title_tokens: false``) makes prompts longer than
    model.max_prompt_tokens: once refused inside a Ray Data task of SFT, wrapped in Ray's
    traceback; now at the model stage, one DataError naming the split, sample and limit."""
    import json

    from rosepo.config import DataConfig
    from rosepo.errors import DataError

    long_title = " ".join(f"w{k}" for k in range(1900))
    assert len(long_title) > 10_000
    titles = [f"Movie {k}" for k in range(20)]
    good = {"historyList": "::".join(titles[:3]), "itemList": titles[3:], "trueSelection": titles[3]}
    bad = {**good, "itemList": titles[3:-1] + [long_title]}
    for split, rows in (("train", [good, good]), ("valid", [good, bad]), ("test", [good])):
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))
    cfg = RunConfig(storage=str(tmp_path / "runs"), data=DataConfig(
        format="llara-json", num_candidates=17,
        llara={s: str(tmp_path / f"{s}.json") for s in ("train", "valid", "test")})).validate()
    samples = pipeline.run_stage(cfg, "samples")
    out = pipeline.stage_dir(cfg, "model")
    with pytest.raises(DataError, match=r"valid, row 2, column 'prompt': sample 'valid:0000001': the prompt has "
                                        r"\d+ tokens, more than model.max_prompt_tokens \(512\)"):
        pipeline.RUNNERS["model"](pipeline.stage_sections(cfg, "model"), out,
                                  {"samples": samples, "oracle": None})  # the runner alone: no oracle needed
    assert not out.exists() and samples.is_dir()


def test_a_run_name_leading_outside_storage_is_refused(tmp_path):
    """The run name is a path under ``storage`` (`rosepo.storage.confined`): ``..`` or an
    absolute path would put every stage folder elsewhere."""
    for name in ("../elsewhere", "/tmp/elsewhere"):
        with pytest.raises(ConfigError, match="outside"):
            pipeline.stage_dir(RunConfig(storage=str(tmp_path), name=name), "samples")
    assert pipeline.run_folder(RunConfig(storage=str(tmp_path), name="a")) == (tmp_path / "a").resolve()
