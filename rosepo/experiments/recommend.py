"""``rosepo recommend``: ask a finished run's model for the next item of a history.

A query is a history of catalogue titles (oldest first) and, optionally, its candidates; without
them, ``data.num_candidates`` candidates are drawn from the catalogue as the samples stage draws
them (`rosepo.data.samples.draw_candidates`, seeded by ``data.seed`` and the history, never a
history title). The prompt is the run's own (`rosepo.data.prompts`, ``data.prompt_style``,
``data.domain``); the model (the aligned adapter, or the SFT model) scores it exactly as the eval
stage does (`rosepo.eval.evaluate.EvalScorer`): the greedy answer, and each candidate's summed
log-probability given the prompt, by which the candidates are ranked.

The run is found through its folder: ``config.yaml`` written by `rosepo.pipeline.run_pipeline`,
the stage folders addressed by it. Titles must match the catalogue's, case and spacing aside
(`rosepo.data.titles.title_key`); an unknown one is refused with its closest titles. Not done
here: Ray Data for large batches (queries are scored in-process, ``eval.batch_size`` at a time),
sampling or beam search.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pyarrow as pa

from rosepo.config import RunConfig, load_config
from rosepo.data.prompts import choose_template, render_prompt
from rosepo.data.samples import draw_candidates, load_source
from rosepo.data.titles import title_key
from rosepo.errors import ConfigError, DataError
from rosepo.eval.evaluate import EvalScorer
from rosepo.layout import aligned_model_and_adapter, base_model_path, sft_model_and_adapter
from rosepo.pipeline import RUN_CONFIG, stage_key
from rosepo.storage import is_complete

#: ``--stage``: the aligned adapter (the default) or the SFT model alone.
STAGES = ("align", "sft")


def load_run(run_dir: str | Path) -> RunConfig:
    """The config of the run in ``run_dir`` (its ``config.yaml``); refuses a folder that holds none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_CONFIG}: give the folder of a finished `rosepo run` "
                          "(runs/<name>)")
    return load_config(path)


class Recommender:
    """A run's model, catalogue and prompt settings, ready to answer queries (`recommend`)."""

    def __init__(self, run_dir: str | Path, stage: str = "align"):
        """Load the model of ``stage`` (`STAGES`) of the run in ``run_dir`` and its catalogue."""
        if stage not in STAGES:
            raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        run = Path(run_dir)
        self.cfg = cfg = load_run(run)
        folders = {s: run / stage_key(cfg, s) for s in ("model", "sft", "align")}
        needed = [s for s in ("model", "sft") + (("align",) if stage == "align" else ()) if not is_complete(folders[s])]
        if needed:
            raise ConfigError(f"the run in {run} has not finished its {', '.join(needed)} stage(s) "
                              f"({folders[needed[0]]}): run `rosepo run` with its config first")
        base, adapter = sft_model_and_adapter(folders["sft"], base_model_path(folders["model"]))
        if stage == "align":
            base, adapter = aligned_model_and_adapter(folders["align"], base)
        self.scorer = EvalScorer(cfg, base, adapter)
        _, catalog, _ = load_source(cfg.data)
        self.titles: dict[str, str] = dict(zip(catalog.column("item_id").to_pylist(),
                                               catalog.column("title").to_pylist()))
        self.item_ids = sorted(self.titles)
        # Keyed by title identity: the catalogue's titles are distinct under it (`rosepo.data.titles`).
        self.by_title: dict[str, str] = {title_key(title): item for item, title in self.titles.items()}

    def check_titles(self, titles: list[str], what: str) -> list[str]:
        """The item ids of ``titles``; `DataError` naming the first unknown one and its closest titles."""
        for i, title in enumerate(titles):
            if title_key(title) not in self.by_title:
                close = difflib.get_close_matches(title_key(title), list(self.by_title), n=3, cutoff=0.5)
                close = [repr(self.titles[self.by_title[c]]) for c in close]
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise DataError(f"unknown title {title!r} ({what} {i + 1}): not in the catalogue of "
                                f"data.format {self.cfg.data.format}; titles must match one of its titles, case "
                                f"and spacing aside{hint}")
        return [self.by_title[title_key(t)] for t in titles]

    def query(self, history: list[str], candidates: list[str] | None = None) -> dict:
        """A checked query: ``sample_id`` (the seed of its drawn candidates), ``history`` (the last
        ``data.max_history`` titles), ``candidates``, ``prompt``, and the item ids of both."""
        if not history:
            raise DataError("the history is empty: give at least one title, oldest first")
        history = list(history)[-self.cfg.data.max_history:]
        history_ids = self.check_titles(history, "history title")
        sample_id = "recommend:" + "\x1f".join(history)
        if candidates:
            candidate_ids = self.check_titles(candidates, "candidate")
            twice = sorted({t for t in candidates if candidates.count(t) > 1})
            if twice:
                raise DataError(f"candidate {twice[0]!r} is given more than once")
        else:
            # The samples stage's draw with the last history item standing in for the target:
            # it is excluded like the rest of the history and dropped from the list afterwards.
            last = history_ids[-1]
            drawn = draw_candidates(sample_id, last, history_ids, self.item_ids, self.titles,
                                    self.cfg.data.num_candidates + 1, self.cfg.data.seed)
            candidate_ids = [i for i in drawn if i != last]
            candidates = [self.titles[i] for i in candidate_ids]
        d = self.cfg.data
        prompt = render_prompt(choose_template(sample_id, d.seed, d.prompt_style), history, list(candidates),
                               d.prompt_style, d.domain)
        return {"sample_id": sample_id, "history": history, "candidates": list(candidates), "prompt": prompt,
                "history_item_ids": history_ids, "candidate_item_ids": list(candidate_ids)}

    def recommend(self, queries: list[dict], k: int) -> list[dict]:
        """Answers to `query` results: ``history``, ``answer`` (the greedy answer) and ``top``
        (the ``k`` best candidates, ``[{"title", "score"}]``, score = summed log-probability of the
        title given the prompt, descending)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        out: list[dict] = [{}] * len(queries)
        by_size: dict[int, list[int]] = {}  # one batch scores the same number of candidates per prompt
        for i, q in enumerate(queries):
            by_size.setdefault(len(q["candidates"]), []).append(i)
        size = self.cfg.eval.batch_size
        for group in by_size.values():
            for start in range(0, len(group), size):
                chunk = group[start:start + size]
                # The item ids go along for a model with item tokens (`rosepo.model.items`).
                scored = self.scorer(pa.Table.from_pylist(
                    [{"sample_id": str(i), "prompt": queries[i]["prompt"], "history_titles": queries[i]["history"],
                      "history_item_ids": queries[i]["history_item_ids"], "candidate_titles": queries[i]["candidates"],
                      "candidate_item_ids": queries[i]["candidate_item_ids"]} for i in chunk])).to_pylist()
                for i, s in zip(chunk, scored):
                    q = queries[i]
                    ranked = sorted(zip(q["candidates"], s["scores"]), key=lambda ts: -ts[1])[:k]
                    out[i] = {"history": q["history"], "answer": s["answer"], "num_candidates": len(q["candidates"]),
                              "top": [{"title": t, "score": round(v, 4)} for t, v in ranked]}
        return out


def recommend_file(recommender: Recommender, path: str | Path, k: int) -> list[dict]:
    """`Recommender.recommend` of every query of a JSONL file: one object per line with
    ``history`` (a list of titles) and optional ``candidates``; blank lines are skipped.
    `DataError` names the line of a bad query (not JSON, another shape, an unknown title)."""
    import json

    queries = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read it: {e.strerror or e}", file=str(path)) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON: {e.msg}", file=str(path), line=n) from None
        if not isinstance(q, dict) or not isinstance(q.get("history"), list) or \
                not isinstance(q.get("candidates") or [], list) or set(q) - {"history", "candidates"}:
            raise DataError('expected {"history": [titles...], "candidates": [titles...]} (candidates optional)',
                            file=str(path), line=n)
        try:
            queries.append(recommender.query(q["history"], q.get("candidates")))
        except DataError as e:
            raise DataError(e.reason, file=str(path), line=n) from None
    return recommender.recommend(queries, k)


def format_result(result: dict) -> str:
    """A `Recommender.recommend` result as text: the answer, then the ranked top candidates."""
    lines = [f"answer: {result['answer']}", f"top {len(result['top'])} of {result['num_candidates']} candidates "
             "(log-probability of the title given the prompt):"]
    lines += [f"  {i}. {c['score']:9.4f}  {c['title']}" for i, c in enumerate(result["top"], 1)]
    return "\n".join(lines)
