"""The sft stage: supervised fine-tuning on the true next item, the `SFTTask` of `rosepo.train.loop`.

The loss is the mean token cross-entropy over the labelled tokens of a micro-batch: the answer
(the target title) and EOS; prompt and padding tokens are labelled -100 by
`rosepo.model.tokenize.encode_sft` and do not count.

With ``sft.candidate_weight`` w > 0 it adds w · mean(−log m), m the probability mass that the
answer's first token puts on the first tokens of the sample's candidates. Cross-entropy on the
target alone teaches "choose among the candidates" through one token per sample, and a model
trained from scratch learns it slowly (issue #3: ValidRatio 0.02 after 12k samples, 0.39 after
151k); m is raised by every candidate of every sample. With title tokens a candidate is one token
and m is exactly the probability that the answer is a candidate; for multi-token titles it is the
first-token relaxation (the mass on the tokens a candidate can start with). It costs nothing: the
logits it reads are the ones the cross-entropy reads.

With ``sft.history_weight`` w > 0 it adds w · the mean cross-entropy of history titles 2..n, each
predicted from the prompt before it (`rosepo.model.tokenize.history_title_positions`): next-item
prediction, SASRec's objective, over the history the prompt already holds, so a sample teaches
up to ten transitions instead of one. The LM head runs on those positions only.

With ``sft.oracle_weight`` w > 0 it adds w · mean(−Σ_c q_c log p(c)), q the oracle's (SASRec's)
softmax over the sample's candidates at ``sft.oracle_temperature`` and p(c) the probability the
answer's first token gives candidate c (knowledge distillation, Hinton et al. 2015, restricted to
the candidates). The target answer is one bit per sample; q ranks all twenty, and its mass is on
the candidates only, so the same term teaches "answer a candidate" and "in the oracle's order"
(the candidate term alone teaches "answer a popular candidate": docs/record.md, SFT levers). The
oracle scores each sample once, in the tokenising pipeline; ``sft/oracle_kl`` is KL(q ‖ p
renormalised over the candidates), 0 when the model ranks as the oracle does. With multi-token
titles both read the candidates' first tokens, the candidate term's relaxation.

With ``sft.decoys`` k > 0 each train sample also gives up to k decoys
(`rosepo.data.samples.decoy_sample`): its prompt with the target candidate replaced by another
item. A decoy has no answer label: only the candidate and oracle terms read it, at the logit
after its prompt (weighted by ``sft.decoy_weight`` against a sample's). On small data the model
memorises history -> target, and the target then lifts the candidate mass of its own prompts:
those terms stop teaching "answer from the list", and unseen users get memorised titles that are
not among their candidates. On a decoy the memorised target is off the list, so memorising cannot
satisfy the terms. Decoys take the place of repeated passes only (`decoys_for`): no more per
sample than the passes beyond the first that the budget would make over the samples, so a data
set the budget covers once gets none (BENCHMARKS.md, the default recipe on a small data set).
Where each sample gets all its decoys, ``sft.repeat_candidate_weight`` (when set) also replaces
``sft.candidate_weight``: there decoys teach the list, but memorised titles still win some
unseen users' answers, and a heavier candidate term holds them off; on more data it only costs
ranking (`for_data_size` resolves both for the data).

Tokenisation runs in the Ray Data pipeline (`sft_dataset`), once, before training; the loop
only pads. The stage (`build_sft`) trains on a seeded random slice of ``sft.max_samples`` train
samples (`rosepo.data.samples.select_samples`: the first sample ids would be a few users only);
`sft_dataset` then orders the rows by ``sample_id``, so the training order is the same whatever
order the samples were written in.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rosepo.config import SFTConfig
from rosepo.data.samples import decoy_sample, read_split, select_samples
from rosepo.errors import ConfigError
from rosepo.layout import CATALOG_FILE, SFT_MODEL_DIR
from rosepo.model.factory import load_tokenizer
from rosepo.model.items import ItemTokens
from rosepo.model.tokenize import IGNORE, candidate_first_ids, encode_sft, history_title_positions
from rosepo.pairs.sasrec import load_oracle
from rosepo.storage import atomic_dir, read_manifest, write_manifest
from rosepo.train.loop import TrainingTask, fit

log = logging.getLogger(__name__)


def collate(rows: list[dict], pad_id: int) -> dict:
    """LEFT-pad tokenised rows into ``input_ids``, ``labels``, ``attention_mask``, ``position_ids``
    (counting from each row's first real token) and ``keep``: how many final positions hold the
    last prompt token and the answer of every row.

    Left padding puts every answer at the end of the batch, so the LM head (a third of the tiny
    model's FLOPs, and a 4096-wide softmax per token) runs on ``keep`` positions, not the whole
    ~300-token prompt (``logits_to_keep``); the loss is the same as with right padding.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    keep = 1
    answer_lengths = []
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, width - n:] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, width - n:] = torch.tensor(r["labels"], dtype=torch.long)
        attention_mask[i, width - n:] = 1
        # A row without labels (a prompt alone) reads only the logit after its last token.
        first_label = next((j for j, label in enumerate(r["labels"]) if label != IGNORE), n)
        answer_lengths.append(n - first_label)
        keep = max(keep, n - first_label + 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "position_ids": position_ids, "keep": torch.tensor(keep)}
    if rows[0].get("history_positions") is not None:
        # (row, position) of each history target's predicting logit (the token before it), and the target.
        pairs = [(i, width - len(r["input_ids"]) + p) for i, r in enumerate(rows) for p in r["history_positions"]]
        index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
        batch["history_index"] = index - torch.tensor([0, 1])
        batch["history_targets"] = input_ids[index[:, 0], index[:, 1]]
    if rows[0].get("candidate_first_ids") is not None:
        # Index, among the kept logits, of the one that predicts each row's first answer token.
        batch["first_pos"] = keep - 1 - torch.tensor(answer_lengths, dtype=torch.long)
        batch["candidate_first_ids"] = torch.tensor([r["candidate_first_ids"] for r in rows], dtype=torch.long)
    if "decoy" in rows[0]:
        batch["decoy"] = torch.tensor([bool(r["decoy"]) for r in rows])
    if rows[0].get("oracle_logp") is not None:
        # One tensor per row, then stacked: rows read back from Ray Data hold NumPy arrays, which
        # torch.tensor of a list copies element by element (and warns).
        batch["oracle_logp"] = torch.stack([torch.as_tensor(r["oracle_logp"], dtype=torch.float32) for r in rows])
    return batch


def candidate_mass_logp(first_logits, candidate_first_ids):
    """log m per row: m the softmax mass of ``first_logits`` (B, V) on the row's candidate first
    tokens (B, C); a token shared by two candidates counts once."""
    import torch

    allowed = torch.zeros_like(first_logits, dtype=torch.bool).scatter_(1, candidate_first_ids, True)
    return (torch.logsumexp(first_logits.masked_fill(~allowed, float("-inf")), -1)
            - torch.logsumexp(first_logits, -1))


def oracle_distillation(first_logits, candidate_first_ids, oracle_logp):
    """Per row: the cross-entropy −Σ_c q_c log p(c) of the model's first answer token (logits
    (B, V), full-vocabulary softmax) against the oracle's log-distribution ``oracle_logp`` (B, C)
    over the candidates (first tokens (B, C)), and KL(q ‖ p renormalised over the candidates)."""
    import torch

    logp = first_logits.log_softmax(-1).gather(1, candidate_first_ids)
    q = oracle_logp.exp()
    cross_entropy = -(q * logp).sum(-1)
    kl = (q * (oracle_logp - (logp - torch.logsumexp(logp, -1, keepdim=True)))).sum(-1)
    return cross_entropy, kl


def token_cross_entropy(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not -100, and the share of
    those tokens predicted exactly (argmax). ``labels`` are aligned with the inputs (HF style):
    the logits at position t predict the label at t + 1."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    if not mask.any():  # a batch of prompts alone (rows without labels): no answer term
        return logits.sum() * 0.0, mask.sum().float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    accuracy = ((logits.argmax(-1) == labels) & mask).sum() / mask.sum().clamp(min=1)
    return loss, accuracy


@dataclasses.dataclass
class SFTTask(TrainingTask):
    """The SFT training task: rows ``sample_id, input_ids, labels`` (`sft_dataset`). The stage
    trains without an eval set; given one, `fit` evaluates before and after training and every
    ``eval_every`` steps."""

    cfg: SFTConfig
    eval_every: int = 0
    name = "sft"
    key = "sample_id"

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        """See the module function `collate`."""
        return collate(rows, pad_id)

    def compute_loss(self, model, batch: dict) -> tuple[Any, dict]:
        """SFT loss of a micro-batch and its metrics (``sft/token_accuracy``, and
        ``sft/candidate_mass`` with ``candidate_weight``, ``sft/history_loss`` with
        ``history_weight``, ``sft/oracle_kl`` with ``oracle_weight``)."""
        import torch
        import torch.nn.functional as F

        keep = int(batch["keep"])
        # A micro-batch of decoys alone has no history targets; its metrics keep the same keys
        # (every rank all-reduces one vector of them per step).
        history = bool(self.cfg.history_weight) and len(batch["history_targets"]) > 0
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=keep, output_hidden_states=history)
        logits = out.logits
        loss, accuracy = token_cross_entropy(logits, batch["labels"][:, -keep:])
        metrics = {"sft/token_accuracy": accuracy.detach()}
        if history:
            hidden = out.hidden_states[-1]  # after the final norm: the LM head's input
            rows, positions = batch["history_index"].unbind(1)
            history_logits = model.get_output_embeddings()(hidden[rows, positions]).float()
            history_loss = F.cross_entropy(history_logits, batch["history_targets"])
            loss = loss + self.cfg.history_weight * history_loss
            metrics["sft/history_loss"] = history_loss.detach()
        elif self.cfg.history_weight:
            metrics["sft/history_loss"] = torch.zeros(())
        if self.cfg.candidate_weight or self.cfg.oracle_weight:
            first = logits[torch.arange(len(logits)), batch["first_pos"]].float()
            # Per row: 1 for a sample, sft.decoy_weight for a decoy (on the logits' device).
            weight = (1 + (self.cfg.decoy_weight - 1) * batch["decoy"].to(first.dtype) if "decoy" in batch
                      else first.new_ones(len(first)))
        if self.cfg.candidate_weight:
            log_mass = candidate_mass_logp(first, batch["candidate_first_ids"])
            loss = loss - self.cfg.candidate_weight * (weight * log_mass).mean()
            metrics["sft/candidate_mass"] = log_mass.exp().mean().detach()
        if self.cfg.oracle_weight:
            cross_entropy, kl = oracle_distillation(first, batch["candidate_first_ids"], batch["oracle_logp"])
            loss = loss + self.cfg.oracle_weight * (weight * cross_entropy).mean()
            metrics["sft/oracle_kl"] = kl.mean().detach()
        return loss, metrics

    def num_tokens(self, batch: dict) -> int:
        """Non-padding tokens of a micro-batch."""
        return int(batch["attention_mask"].sum())


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    return load_tokenizer(path)


@functools.lru_cache(maxsize=1)
def _oracle(path: str):
    return load_oracle(path)


@functools.lru_cache(maxsize=1)
def _catalog(samples_dir: str) -> tuple[list[str], dict[str, str], dict]:
    """The samples stage's item ids, their titles and its data config (prompt style, domain, seed)."""
    import pyarrow.parquet as pq

    catalog = pq.read_table(Path(samples_dir) / CATALOG_FILE, columns=["item_id", "title"])
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    return list(titles), titles, read_manifest(samples_dir)["config"]


def add_decoys(batch, samples_dir: str, decoys: int):
    """Ray Data UDF (pandas batches): every sample of the batch followed by its ``decoys`` decoys
    (`rosepo.data.samples.decoy_sample`, drawn from the catalog of ``samples_dir`` and rendered
    with its data config), with a ``decoy`` column: False for the samples, True for the decoys."""
    import pandas as pd

    item_ids, titles, data = _catalog(samples_dir)
    rows = []
    for r in batch.to_dict("records"):
        r = {k: list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v for k, v in r.items()}
        rows.append({**r, "decoy": False})
        rows += [{**decoy_sample(r, item_ids, titles, data["seed"], k, data["prompt_style"], data["domain"]),
                  "decoy": True} for k in range(1, decoys + 1)]
    return pd.DataFrame(rows, columns=[*batch.columns, "decoy"])


def repeats(budget_rows: float, num_samples: int) -> int:
    """The whole passes beyond the first that a budget of ``budget_rows`` rows would make over
    ``num_samples`` samples (0 for a data set it covers once or less)."""
    return max(0, math.floor(budget_rows / num_samples) - 1) if num_samples > 0 else 0


def decoys_for(decoys: int, budget_rows: float, num_samples: int) -> int:
    """The decoys per sample SFT trains with: ``decoys`` (``sft.decoys``), but no more than the
    passes beyond the first that a budget of ``budget_rows`` rows would make over
    ``num_samples`` samples (`repeats`). Decoys take the place of repeated passes, where
    memorising starts, never of a first one: on a data set the budget covers once or less they
    would replace fresh samples, which costs ranking (BENCHMARKS.md, the default recipe on a
    small data set)."""
    return min(decoys, repeats(budget_rows, num_samples))


def for_data_size(scfg: SFTConfig, num_samples: int) -> SFTConfig:
    """``scfg`` as SFT trains with it on ``num_samples`` samples: ``decoys`` by `decoys_for`, and
    ``candidate_weight`` replaced by ``repeat_candidate_weight`` (when set) where each sample
    gets all its ``decoys`` (the budget would pass over the samples ``decoys`` + 1 times or
    more). The default config comes back unchanged on MovieLens-100K's 75k samples, with 1 decoy
    on 20,000, with 3 decoys and the heavier candidate term on 12,000 or fewer."""
    budget = budget_rows(scfg, num_samples)
    full = scfg.decoys > 0 and repeats(budget, num_samples) >= scfg.decoys
    weight = scfg.repeat_candidate_weight if full and scfg.repeat_candidate_weight else scfg.candidate_weight
    return dataclasses.replace(scfg, decoys=decoys_for(scfg.decoys, budget, num_samples), candidate_weight=weight)


def budget_rows(scfg: SFTConfig, num_samples: int) -> float:
    """The rows SFT's budget covers before any ``max_epochs`` cap: ``max_steps`` global batches,
    or ``epochs`` passes over the ``num_samples`` samples."""
    batch = scfg.num_workers * scfg.micro_batch_size * scfg.grad_accum
    return scfg.max_steps * batch if scfg.max_steps else scfg.epochs * num_samples


def prompt_only(row: dict) -> dict:
    """An `encode_sft` row cut to its prompt, every label -100: a decoy's row, whose loss reads
    only the logit after the prompt (`collate` finds it without labels)."""
    n = row["labels"].count(IGNORE)
    return {"input_ids": row["input_ids"][:n], "labels": [IGNORE] * n}


def tokenize_batch(batch, model_path: str, max_prompt_tokens: int, max_answer_tokens: int,
                   candidates: bool = False, history: bool = False, items_path: str | None = None,
                   oracle_path: str | None = None, oracle_temperature: float = 1.0):
    """Ray Data UDF (pandas batches): ``sample_id, prompt, answer`` -> ``sample_id, input_ids,
    labels``; with ``candidates`` also ``candidate_first_ids`` (the first token of each of
    ``candidate_titles`` as an answer), with ``history`` ``history_positions`` (of
    ``history_titles`` 2..n); with ``items_path`` the prompts hold item tokens (from the
    ``history_item_ids`` / ``candidate_item_ids`` columns); with ``oracle_path`` (and
    ``candidates``) ``oracle_logp``, the oracle's log-softmax over the candidates at
    ``oracle_temperature``; rows whose ``decoy`` column is True are cut to their prompt
    (`prompt_only`, no history targets). The tokenizer and the oracle are loaded once per Ray
    worker process."""
    import pandas as pd

    tok = _tokenizer(model_path)
    tokens = ItemTokens.read(items_path) if items_path else None
    items = ([tokens.prompt_items(r) for r in batch.to_dict("records")] if tokens
             else [None] * len(batch["prompt"]))
    enc = [encode_sft(tok, p, a, max_prompt_tokens, max_answer_tokens, i)
           for p, a, i in zip(batch["prompt"], batch["answer"], items)]
    decoy = list(batch["decoy"]) if "decoy" in batch else [False] * len(enc)
    enc = [prompt_only(e) if d else e for e, d in zip(enc, decoy)]
    out = {"sample_id": list(batch["sample_id"]), "input_ids": [e["input_ids"] for e in enc],
           "labels": [e["labels"] for e in enc]}
    if "decoy" in batch:
        out["decoy"] = decoy
    if candidates:
        out["candidate_first_ids"] = candidate_first_ids(tok, batch["candidate_titles"], max_answer_tokens)
    if oracle_path:
        import torch

        scores = _oracle(oracle_path).score([list(h) for h in batch["history_item_ids"]],
                                            [list(c) for c in batch["candidate_item_ids"]])
        logp = torch.from_numpy(scores / oracle_temperature).double().log_softmax(-1).float().numpy()
        out["oracle_logp"] = list(logp)
    if history:
        out["history_positions"] = [[] if d else history_title_positions(tok, p, list(h), e["labels"].count(IGNORE), i)
                                    for p, h, e, i, d in zip(batch["prompt"], batch["history_titles"], enc, items,
                                                             decoy)]
    return pd.DataFrame(out)


def sft_dataset(run_cfg: Any, samples_ds, base_model: str, items_path: str | None = None,
                oracle_path: str | None = None, samples_dir: str | None = None):
    """The tokenised, materialised SFT training set: ``sample_id, input_ids, labels``.

    ``run_cfg`` holds the ``sft`` and ``model`` sections. ``samples_ds`` is a Ray Dataset with the
    SAMPLES columns (``sample_id``, ``prompt`` and ``answer`` are used); a non-zero
    ``sft.max_samples`` keeps the first N by ``sample_id`` (the stage passes a slice of that
    size already). ``items_path``: prompts with item tokens (`tokenize_batch`); ``oracle_path``:
    the oracle folder, read when ``sft.oracle_weight`` > 0; ``samples_dir``: the samples stage's
    folder, whose catalog ``sft.decoys`` > 0 draws from (`add_decoys`: that many per sample, as
    `for_data_size` resolves them for the data). Materialised once here so the workers, which
    each read the whole set, do not tokenise it again.
    """
    mcfg, scfg = run_cfg.model, run_cfg.sft
    distill = scfg.oracle_weight > 0
    if distill and not oracle_path:
        raise ConfigError("sft.oracle_weight > 0 needs the oracle's folder (the sft stage passes it)")
    decoys = scfg.decoys
    if decoys and not samples_dir:
        raise ConfigError("sft.decoys > 0 needs the samples stage's folder (the sft stage passes it)")
    candidates, history = scfg.candidate_weight > 0 or distill, scfg.history_weight > 0
    columns = {"sample_id", "prompt", "answer"}
    columns |= {"candidate_titles"} if candidates else set()
    columns |= {"history_titles"} if history else set()
    columns |= {"history_item_ids", "candidate_item_ids"} if distill else set()
    if items_path:
        columns |= {"history_item_ids", "history_titles", "candidate_item_ids", "candidate_titles"}
    if decoys:
        columns |= {"history_item_ids", "history_titles", "candidate_item_ids", "candidate_titles",
                    "target_item_id", "template_id"}
    ds = samples_ds.select_columns(sorted(columns))
    if run_cfg.sft.max_samples:
        ds = ds.sort("sample_id").limit(run_cfg.sft.max_samples)
    if decoys:
        ds = ds.map_batches(add_decoys, batch_format="pandas",
                            fn_kwargs={"samples_dir": str(samples_dir), "decoys": decoys})
    return ds.map_batches(tokenize_batch, batch_format="pandas",
                          fn_kwargs={"model_path": str(base_model),
                                     "max_prompt_tokens": mcfg.max_prompt_tokens,
                                     "max_answer_tokens": mcfg.max_answer_tokens,
                                     "candidates": candidates, "history": history,
                                     "items_path": items_path,
                                     "oracle_path": str(oracle_path) if distill else None,
                                     "oracle_temperature": scfg.oracle_temperature}).materialize()


def run_sft(run_cfg: Any, samples_ds, base_model: str, output_dir: str, run_name: str,
            items_path: str | None = None, oracle_path: str | None = None, samples_dir: str | None = None) -> dict:
    """Fine-tune ``base_model`` on the samples (`sft_dataset`) with `rosepo.train.loop.fit`,
    then copy the final HF export (the LoRA adapter, or the full model; with ``items_path``, the
    item file with the trained projector beside it) atomically to ``<output_dir>/model``.
    ``run_cfg`` holds the ``sft`` and ``model`` sections; ``oracle_path`` and ``samples_dir`` as
    in `sft_dataset`.

    The decoys and the candidate term's weight are those of `for_data_size` for the samples.
    Returns fit's result plus ``model_path``. The Ray run (checkpoints, TensorBoard) lives in
    ``<output_dir>/<run_name>``; re-running with the same ``run_name`` resumes an interrupted run.
    """
    scfg = run_cfg.sft
    num_samples = min(samples_ds.count(), scfg.max_samples or math.inf)
    run_cfg = SimpleNamespace(sft=for_data_size(scfg, num_samples), model=run_cfg.model)
    log.info("sft: %d decoys per sample, candidate weight %g (the budget would pass over the %d samples %.2g "
             "times)", run_cfg.sft.decoys, run_cfg.sft.candidate_weight, num_samples,
             budget_rows(scfg, num_samples) / max(1, num_samples))
    result = fit(SFTTask(run_cfg.sft), run_cfg.model, model_path=str(base_model), adapter=None,
                 datasets={"train": sft_dataset(run_cfg, samples_ds, base_model, items_path, oracle_path,
                                                samples_dir)},
                 output_dir=output_dir, run_name=run_name, items_path=items_path)
    final = Path(output_dir) / SFT_MODEL_DIR
    with atomic_dir(final, overwrite=True) as tmp:
        shutil.copytree(result["final_model"], tmp, dirs_exist_ok=True)
    sized = {"train_samples": num_samples, "decoys": run_cfg.sft.decoys,
             "candidate_weight": run_cfg.sft.candidate_weight}
    return {**result, "model_path": str(final.resolve()), "for_data_size": sized}


def sft_samples(scfg: SFTConfig, samples_dir: str | Path):
    """The train samples the sft stage trains on (an Arrow table): a seeded random slice of
    ``sft.max_samples`` (``sft.seed``; the first ids would be a few users only)."""
    return select_samples(read_split(samples_dir, "train"), scfg.max_samples, scfg.seed)


def build_sft(cfg: Any, samples_dir: Path, base_model: str, work: Path, out: Path,
              items_path: str | None = None, oracle_path: Path | None = None) -> dict:
    """The sft stage: `run_sft` on `sft_samples`, its Ray run under ``work``; the model
    into ``out/model`` with a manifest (history, last metrics), atomically. ``cfg`` holds the
    ``sft`` and ``model`` sections; ``items_path`` is the model stage's item file, if any;
    ``oracle_path`` the oracle stage's folder (read with ``sft.oracle_weight`` > 0)."""
    import ray

    result = run_sft(cfg, ray.data.from_arrow(sft_samples(cfg.sft, samples_dir)), base_model, str(work), "sft",
                     items_path, str(oracle_path) if oracle_path else None, str(samples_dir))
    with atomic_dir(out, overwrite=True) as tmp:
        shutil.copytree(result["model_path"], tmp / SFT_MODEL_DIR)
        manifest = {"stage": "sft", "metrics": result["metrics"], "history": result["history"],
                    "resumed_from_step": result["resumed_from_step"], "for_data_size": result["for_data_size"]}
        write_manifest(tmp, manifest)
    return manifest
