"""`Recommender`, rosepo's Python API, and ``rosepo recommend``: ask a trained model for the next
item of a history.

    from rosepo import Recommender
    rec = Recommender.from_pretrained("runs/ml100k-tiny")      # a run folder, or an exported one
    rec.recommend(["Toy Story", "Fargo", "Star Wars"], k=5)     # {"answer": ..., "top": [...]}

A query is a history of catalogue titles (oldest first) and, optionally, its candidates; without
them, ``data.num_candidates`` candidates are drawn from the catalogue as the samples stage draws
them (`rosepo.data.samples.draw_candidates`, seeded by ``data.seed`` and the history, never a
history title). The prompt is the run's own (`rosepo.data.prompts`, ``data.prompt_style``,
``data.domain``); the model (the aligned adapter, or the SFT model) scores it exactly as the eval
stage does (`rosepo.eval.evaluate.EvalScorer`): the greedy answer, and each candidate's summed
log-probability given the prompt, by which the candidates are ranked.

A run is found through its folder: ``config.yaml`` written by `rosepo.pipeline.run_pipeline`, the
stage folders addressed by it, wherever the folder now lies; its catalogue is the samples stage's
copy. An exported folder (`rosepo.experiments.export`) holds the merged model, the catalogue and
the settings itself. Titles must match the catalogue's, case and spacing aside
(`rosepo.data.titles.title_key`), and the prompt spells them as the catalogue does; an unknown one
is refused with its closest titles. Not done here: Ray Data for large batches (queries are scored
in-process, ``eval.batch_size`` at a time), sampling or beam search.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pyarrow as pa

from rosepo.config import RunConfig, load_config
from rosepo.data.prompts import choose_template, render_prompt
from rosepo.data.samples import draw_candidates, load_source
from rosepo.data.titles import title_key
from rosepo.errors import ConfigError, DataError
from rosepo.eval.evaluate import EvalScorer
from rosepo.layout import CATALOG_FILE, aligned_model_and_adapter, base_model_path, sft_model_and_adapter
from rosepo.pipeline import RUN_CONFIG, stage_key
from rosepo.storage import is_complete

#: ``--stage``: the aligned adapter (the default) or the SFT model alone.
STAGES = ("align", "sft")
#: In an exported folder (`rosepo.experiments.export`): the recommender's own settings, the run's
#: config and the catalogue.
EXPORT_CARD, EXPORT_CONFIG = "rosepo.json", "run-config.yaml"
#: Version of an exported folder's layout (`EXPORT_CARD`'s ``format_version``), the one this rosepo reads.
FORMAT_VERSION = 1


def load_run(run_dir: str | Path) -> RunConfig:
    """The config of the run in ``run_dir`` (its ``config.yaml``); refuses a folder that holds none."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_CONFIG}: give the folder of a finished `rosepo run` "
                          "(runs/<name>) or of an exported model (rosepo export)")
    return load_config(path)


def run_model(run: Path, cfg: RunConfig, stage: str) -> tuple[str, str | None, Path]:
    """(base model, adapter, samples folder) of ``stage`` of the run in ``run``, found through
    ``cfg``'s stage addresses under ``run`` (wherever the run folder now lies)."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    folders = {s: run / stage_key(cfg, s) for s in ("samples", "model", "sft", "align")}
    needed = [s for s in ("samples", "model", "sft") + (("align",) if stage == "align" else ())
              if not is_complete(folders[s])]
    if needed:
        raise ConfigError(f"the run in {run} has not finished its {', '.join(needed)} stage(s) "
                          f"({folders[needed[0]]}): run `rosepo run` with its config first")
    base, adapter = sft_model_and_adapter(folders["sft"], base_model_path(folders["model"]))
    if stage == "align":
        base, adapter = aligned_model_and_adapter(folders["align"], base)
    return base, adapter, folders["samples"]


class Recommender:
    """A trained recommender: its model, catalogue and prompt settings, ready for histories.

    ``Recommender.from_pretrained(folder)`` loads an exported folder (`rosepo export`) or a
    finished run's folder; `recommend` answers one history, `recommend_many` a batch. Scoring is
    the eval stage's (`rosepo.eval.evaluate.EvalScorer`), on the GPU when there is one.
    """

    def __init__(self, cfg: RunConfig, base: str, adapter: str | None, catalog: pa.Table, device: str = "auto"):
        """From parts: a run config (its ``data``, ``model`` and ``eval`` settings), the model
        (``base`` with ``adapter``) and the catalogue (``item_id``, ``title``); see `from_pretrained`."""
        self.cfg = cfg
        self.scorer = EvalScorer(cfg, base, adapter, device=pick_device(device))
        self.titles: dict[str, str] = dict(zip(catalog.column("item_id").to_pylist(),
                                               catalog.column("title").to_pylist()))
        self.item_ids = sorted(self.titles)
        # Keyed by title identity: the catalogue's titles are distinct under it (`rosepo.data.titles`).
        self.by_title: dict[str, str] = {title_key(title): item for item, title in self.titles.items()}

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, stage: str | None = None, device: str = "auto") -> "Recommender":
        """The recommender in ``folder``: an exported one (it holds `EXPORT_CARD`; ``stage``, when
        given, must be the one it was exported from), or the model of ``stage`` (the aligned one,
        the default, or ``sft``) of the finished run whose folder it is. ``device``: ``auto`` (the
        GPU when this process sees one), ``cpu`` or ``cuda``."""
        import pyarrow.parquet as pq

        folder = Path(folder).resolve()
        if (folder / EXPORT_CARD).is_file():
            card = json.loads((folder / EXPORT_CARD).read_text())
            if card.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{folder / EXPORT_CARD}: format_version {card.get('format_version')!r}, but this "
                                  f"rosepo reads exported folders of version {FORMAT_VERSION}: export the run again "
                                  "with this rosepo, or load the folder with the rosepo that wrote it")
            if stage is not None and stage != card.get("stage"):
                raise ConfigError(f"{folder} holds the {card.get('stage')} model (exported with --stage "
                                  f"{card.get('stage')}), not the {stage} model: export that stage into another folder")
            return cls(load_config(folder / EXPORT_CONFIG), str(folder), None, pq.read_table(folder / CATALOG_FILE),
                       device)
        cfg = load_run(folder)
        base, adapter, samples = run_model(folder, cfg, stage or "align")
        return cls(cfg, base, adapter, run_catalog(samples, cfg), device)

    def recommend(self, history: list[str], candidates: list[str] | None = None, k: int = 5) -> dict:
        """The next item after ``history`` (catalogue titles, oldest first) among ``candidates``
        (default: ``data.num_candidates`` drawn from the catalogue as the samples are): the greedy
        ``answer`` and the ``top`` ``k`` candidates ranked by the log-probability of their title."""
        return self.recommend_many([{"history": history, "candidates": candidates}], k)[0]

    def recommend_many(self, queries: list[dict], k: int = 5) -> list[dict]:
        """`recommend` for each ``{"history": [...], "candidates": [...] or None}``, batched."""
        return self.answer([self.query(q["history"], q.get("candidates")) for q in queries], k)

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
        history_ids = self.check_titles(list(history)[-self.cfg.data.max_history:], "history title")
        history = [self.titles[i] for i in history_ids]  # as the catalogue spells them, as the samples do
        sample_id = "recommend:" + "\x1f".join(history)
        if candidates:
            candidate_ids = self.check_titles(candidates, "candidate")
            candidates = [self.titles[i] for i in candidate_ids]
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

    def answer(self, queries: list[dict], k: int) -> list[dict]:
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


def run_catalog(samples_dir: Path, cfg: RunConfig) -> pa.Table:
    """The catalogue a run's samples were drawn from: the copy the samples stage keeps, or for a
    run made before it kept one, the configured input read again."""
    import pyarrow.parquet as pq

    if (samples_dir / CATALOG_FILE).is_file():
        return pq.read_table(samples_dir / CATALOG_FILE)
    return load_source(cfg.data)[1]


def pick_device(device: str) -> str:
    """``auto`` as ``cuda`` when this process sees a GPU, else ``cpu``; other names as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this process sees no CUDA device")
    return device


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
    return recommender.answer(queries, k)


def format_result(result: dict) -> str:
    """A `Recommender.recommend` result as text: the answer, then the ranked top candidates."""
    lines = [f"answer: {result['answer']}", f"top {len(result['top'])} of {result['num_candidates']} candidates "
             "(log-probability of the title given the prompt):"]
    lines += [f"  {i}. {c['score']:9.4f}  {c['title']}" for i, c in enumerate(result["top"], 1)]
    return "\n".join(lines)
