"""A trained model that leaves rosepo: `rosepo export` writes a self-contained folder;
`rosepo.Recommender.from_pretrained` loads it (or a run folder) from anywhere; a text-only model
runs in plain transformers with the answers rosepo gives."""

from __future__ import annotations

import json
import shutil

import pytest

from rosepo import Recommender
from rosepo.cli import main
from rosepo.data.samples import read_split
from rosepo.errors import ConfigError

#: Real MovieLens titles (the catalogue's: no year).
HISTORIES = [["Toy Story", "Fargo", "Star Wars", "Twelve Monkeys"], ["Heat", "Casablanca", "Alien"]]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_exported_model_recommends_as_its_run_did_from_anywhere(smoke_run, tmp_path, monkeypatch, capsys):
    """Export the smoke run's aligned model (hybrid item tokens and the user token), copy the
    folder elsewhere, delete the run and the first copy, and ask from another working directory:
    the same answers and scores as the run's own model. The run folder itself also works after
    a move, from another working directory."""
    run = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_run[2], run)
    before = Recommender.from_pretrained(run, device="cpu").recommend_many([{"history": h} for h in HISTORIES], 5)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "exported")
    moved_run = tmp_path / "elsewhere" / "smoke"
    shutil.move(str(run), moved_run)
    shutil.copytree(tmp_path / "exported", tmp_path / "copy")
    shutil.rmtree(tmp_path / "exported")
    monkeypatch.chdir(tmp_path / "elsewhere")
    from_export = Recommender.from_pretrained(tmp_path / "copy", device="cpu")
    assert from_export.recommend_many([{"history": h} for h in HISTORIES], 5) == before
    assert Recommender.from_pretrained(moved_run, device="cpu").recommend_many(
        [{"history": h} for h in HISTORIES], 5) == before
    card = json.loads((tmp_path / "copy" / "rosepo.json").read_text())
    assert card["stage"] == "align" and card["text_only"] is False and card["items"] > 1000
    assert card["lora_merged"] is True and card["format_version"] == 1
    assert "aligned (rosepo)" in card["metrics"]["results"]
    readme = (tmp_path / "copy" / "README.md").read_text()
    assert "Recommender.from_pretrained" in readme and "| aligned (rosepo) |" in readme
    assert "a LoRA adapter is merged into these weights" in readme
    # The folder holds the aligned model: asking it for the SFT model is refused, as is a layout
    # this rosepo does not know.
    with pytest.raises(ConfigError, match="holds the align model .* not the sft model"):
        Recommender.from_pretrained(tmp_path / "copy", stage="sft", device="cpu")
    (tmp_path / "copy" / "rosepo.json").write_text(json.dumps({**card, "format_version": 2}))
    with pytest.raises(ConfigError, match="format_version 2, but this rosepo reads exported folders of version 1"):
        Recommender.from_pretrained(tmp_path / "copy", device="cpu")
    assert {p.name for p in (tmp_path / "copy").iterdir()} >= {
        "README.md", "catalog.parquet", "config.json", "generation_config.json", "item_embeddings.safetensors",
        "model.safetensors", "rosepo.json", "run-config.yaml", "tokenizer.json"}
    with pytest.raises(ConfigError, match="exists: export into a new folder"):
        from rosepo.experiments.export import export_run

        export_run(moved_run, tmp_path / "copy")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plain_transformers_answers_as_rosepo_does_with_an_exported_text_only_model(text_run, tmp_path):
    """The text-only smoke model's SFT stage, exported: AutoModelForCausalLM and AutoTokenizer load
    the folder, and ``generate`` (its generation_config.json: greedy) gives, on the valid prompts,
    exactly the answers of rosepo's evaluation scorer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rosepo.experiments.recommend import load_run, run_model
    from rosepo.eval.evaluate import EvalScorer

    out = tmp_path / "exported"
    assert main(["export", "--run", str(text_run), "--stage", "sft", "--out", str(out)]) == 0
    assert json.loads((out / "rosepo.json").read_text())["text_only"] is True
    cfg = load_run(text_run)
    base, adapter, samples = run_model(text_run, cfg, "sft")
    rows = read_split(samples, "valid").slice(0, 12)
    scorer = EvalScorer(cfg, base, adapter, device="cpu")
    ours = scorer(rows.select(["sample_id", "prompt", "candidate_titles"])).column("answer").to_pylist()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = []
    with torch.no_grad():
        for prompt in rows.column("prompt").to_pylist():
            ids = tok(prompt, return_tensors="pt")
            generated = model.generate(**ids)
            theirs.append(tok.decode(generated[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert theirs == ours
