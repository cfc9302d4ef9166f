"""The align stage: RosePO alignment, the `AlignTask` of `rosepo.train.loop`.

Policy = the SFT model with its LoRA adapter trainable. Each micro-batch holds pairs (prompt,
chosen, K rejected, ε, reference log-probs). Chosen and rejected answers of a prompt are scored
in one batched forward with the prompt shared (`rosepo.model.logprobs.answer_logps`), and the
loss is one of `rosepo.losses` (``align.loss``).

Reference log-probs: ``precomputed`` reads them from the pair rows (computed by the SFT model
when the pairs were built, so no reference model runs here); ``online`` computes them with the
same model: the SFT adapter is loaded a second time, frozen, as adapter ``reference``, and the
reference pass switches to it (TRL's ``ref_adapter_name`` approach; disabling the adapter would
give the base model, not the SFT model the pairs were scored with). Both give the same
first-step loss (tested).

With ``align.candidate_weight`` w > 0 the loss adds w · mean(−log m), m the mass the answer's
first token puts on the first tokens of the sample's candidates (`rosepo.train.sft`'s candidate
term). Every rejected answer is a candidate: a preference loss that pushes it down also pushes
mass off the candidate set, and greedy answers stop naming a candidate (the default run lost
0.15 of ValidRatio in 125 steps with NLL on the chosen answer alone). The candidates' first
tokens are read from the logit that predicts every answer's first token, in the same forward.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rosepo.config import AlignConfig, ModelConfig
from rosepo.errors import DataError
from rosepo.eval.metrics import generation_metrics, ranking_metrics
from rosepo.layout import ADAPTER_DIR, find_items, pairs_file, read_pairs
from rosepo.losses import preference_loss, sft_regularizer
from rosepo.model.factory import load_tokenizer
from rosepo.model.generate import greedy_answers
from rosepo.model.logprobs import answer_logps
from rosepo.model.tokenize import candidate_first_ids, encode_answer
from rosepo.pairs.smoothing import eps_summary, smoothing_eps
from rosepo.storage import atomic_dir, write_manifest
from rosepo.train.loop import TrainingTask, fit

#: Name of the frozen copy of the SFT adapter used by ``reference=online``.
REFERENCE_ADAPTER = "reference"


def _pad2(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def collate(rows: list[dict], pad_id: int) -> dict:
    """Pairs → tensors: prompts (B, P) + lengths, answers (B·(1+K), L) + lengths, ref and oracle
    (B, 1+K); rows with ``candidate_first_ids`` (`with_candidate_first_ids`) also give those (B, C)."""
    import torch

    prompts, prompt_len = _pad2([r["prompt_ids"] for r in rows], pad_id)
    answers = [a for r in rows for a in [r["chosen_ids"], *r["rejected_ids"]]]
    answer_ids, answer_len = _pad2(answers, pad_id)
    ref = torch.tensor([[r["ref_chosen_logp"], *r["ref_rejected_logp"]] for r in rows], dtype=torch.float32)
    oracle = torch.tensor([[r["oracle_chosen"], *r["oracle_rejected"]] for r in rows], dtype=torch.float64)
    batch = {"prompt_ids": prompts, "prompt_len": prompt_len, "answer_ids": answer_ids, "answer_len": answer_len,
             "ref": ref, "oracle": oracle}
    if rows[0].get("candidate_first_ids") is not None:
        batch["candidate_first_ids"] = torch.tensor([r["candidate_first_ids"] for r in rows], dtype=torch.long)
    return batch


def with_candidate_first_ids(pairs: pa.Table, tokenizer, max_answer_tokens: int) -> pa.Table:
    """``pairs`` plus ``candidate_first_ids``: the first token of each of ``candidate_titles`` as
    an answer (`candidate_first_ids`), what the candidate term reads."""
    ids = candidate_first_ids(tokenizer, pairs.column("candidate_titles").to_pylist(), max_answer_tokens)
    return pairs.append_column("candidate_first_ids", pa.array(ids, type=pa.list_(pa.int32())))


def unpack(batch: dict) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The ragged prompt and answer id lists of a collated batch."""
    prompts = [p[:n].tolist() for p, n in zip(batch["prompt_ids"], batch["prompt_len"])]
    flat = [a[:n].tolist() for a, n in zip(batch["answer_ids"], batch["answer_len"])]
    per = len(flat) // len(prompts)
    return prompts, [flat[i * per:(i + 1) * per] for i in range(len(prompts))]


def pair_logps(model, batch: dict, cfg: AlignConfig, pad_id: int, first_ids=None):
    """Policy log-probs (B, 1+K) and token counts of chosen + rejected answers; with
    ``first_ids`` (B, C) also the log-probs (B, C) of those tokens as the first answer token,
    from the same forward (`answer_logps`' ``first_token_ids``)."""
    prompts, answers = unpack(batch)
    return answer_logps(model, prompts, answers, prefix_sharing=cfg.prefix_sharing, pad_id=pad_id,
                        first_token_ids=first_ids)


def candidate_mass_from_logps(first_logps, first_ids):
    """log m per row from the log-probs (B, C) of the candidates' first tokens ``first_ids``
    (B, C): a token shared by two candidates counts once."""
    import torch

    seen = torch.zeros_like(first_ids, dtype=torch.bool)
    for j in range(1, first_ids.shape[1]):
        seen[:, j] = (first_ids[:, :j] == first_ids[:, j:j + 1]).any(1)
    return torch.logsumexp(first_logps.masked_fill(seen, float("-inf")), -1)


def reference_logps(model, batch: dict, cfg: AlignConfig, pad_id: int):
    """Reference log-probs (B, 1+K): from the pair rows, or online with the adapter disabled."""
    import torch

    if cfg.reference == "precomputed":
        return batch["ref"]
    module = getattr(model, "module", model)
    if REFERENCE_ADAPTER not in module.peft_config:  # new LoRA on a full SFT model: base = SFT
        with torch.no_grad(), module.disable_adapter():
            logps, _ = pair_logps(model, batch, cfg, pad_id)
        return logps
    with torch.no_grad():
        module.set_adapter(REFERENCE_ADAPTER)
        try:
            logps, _ = pair_logps(model, batch, cfg, pad_id)
        finally:
            module.set_adapter("default")
    return logps


def loss_and_metrics(policy, ref, counts, eps, cfg: AlignConfig):
    """Per-batch mean loss and the DPO metrics (TRL names) from policy/reference log-probs (B, 1+K)."""
    losses, chosen_r, rejected_r = preference_loss(
        cfg.loss, policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], beta=cfg.beta, eps=eps,
        const_eps=cfg.eps_constant)
    loss = losses.mean()
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * sft_regularizer(policy[:, 0], counts[:, 0].float()).mean()
    rejected_r = rejected_r.reshape(len(chosen_r), -1)
    metrics = {
        "rewards/chosen": chosen_r.mean().detach(),
        "rewards/rejected": rejected_r.mean().detach(),
        "rewards/margins": (chosen_r - rejected_r.mean(1)).mean().detach(),
        "rewards/accuracies": (chosen_r[:, None] > rejected_r).all(1).float().mean().detach(),
        "logps/chosen": policy[:, 0].mean().detach(),
        "logps/rejected": policy[:, 1:].mean().detach(),
        "smoothing/eps_mean": eps.mean().detach(),
    }
    return loss, metrics


def pair_eps(oracle, cfg: AlignConfig):
    """ε per pair (float32 tensor) from the oracle scores (B, 1+K) and the smoothing settings.

    rosepo / sdpo_smoothed: the ``smoothing`` mode; cdpo: ``eps_constant``; other losses: 0.
    """
    import torch

    mode = cfg.smoothing if cfg.loss in ("rosepo", "sdpo_smoothed") else "constant" if cfg.loss == "cdpo" else "none"
    o = oracle.detach().cpu().double().numpy()
    eps = smoothing_eps(mode, o[:, 0], o[:, 1:], lam=cfg.smoothing_lambda, tau=cfg.smoothing_tau,
                        eps_max=cfg.eps_max, eps_constant=cfg.eps_constant)
    return torch.as_tensor(eps, dtype=torch.float32, device=oracle.device)


@dataclasses.dataclass
class AlignTask(TrainingTask):
    """The alignment training task: pair rows (`rosepo.schema.PAIRS`), the loss ``cfg.loss``.

    ``model`` gives ``max_answer_tokens`` for the recommendation slice; ``pad_id`` is the
    tokenizer's padding id (log-prob batches pad with it).
    """

    cfg: AlignConfig
    model: ModelConfig
    pad_id: int
    name = "align"
    key = "pair_id"

    @property
    def eval_every(self) -> int:
        """``align.eval_every``."""
        return self.cfg.eval_every

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        """See the module function `collate`."""
        return collate(rows, pad_id)

    def compute_loss(self, model, batch: dict) -> tuple[Any, dict]:
        """Preference loss of a micro-batch and its metrics (with ``candidate_weight``, plus the
        candidate term and ``candidate_mass``)."""
        first_ids = batch["candidate_first_ids"] if self.cfg.candidate_weight else None
        policy, counts, *first = pair_logps(model, batch, self.cfg, self.pad_id, first_ids)
        ref = reference_logps(model, batch, self.cfg, self.pad_id).to(policy.dtype)
        loss, metrics = loss_and_metrics(policy, ref, counts, pair_eps(batch["oracle"], self.cfg), self.cfg)
        if first_ids is not None:
            log_mass = candidate_mass_from_logps(first[0], first_ids.to(policy.device))
            loss = loss - self.cfg.candidate_weight * log_mass.mean()
            metrics["candidate_mass"] = log_mass.exp().mean().detach()
        return loss, metrics

    def num_tokens(self, batch: dict) -> int:
        """Tokens of the sequences the forward actually runs (prompt once + every answer)."""
        return int(batch["prompt_len"].sum() + batch["answer_len"].sum())

    def prepare_model(self, model, adapter: str | None):
        """Before DeepSpeed wraps it: for an online reference on top of an SFT adapter, add a frozen
        copy of that adapter (on a fully fine-tuned SFT model the disabled new LoRA is the reference)."""
        if self.cfg.reference == "online" and adapter is not None:
            model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")
        return model

    def eval_setup(self, rows: list[dict], tokenizer) -> dict | None:
        """The recommendation slice of the held-out pairs: their first ``eval_rec_samples``
        distinct samples by ``sample_id`` (the pairs' ``valid`` split), every candidate tokenised as
        the eval stage does. None when ``eval_rec_samples`` is 0."""
        n = self.cfg.eval_rec_samples
        if not n:
            return None
        first: dict = {}
        for r in rows:
            first.setdefault(r["sample_id"], r)
        samples = [first[k] for k in sorted(first)[:n]]
        limit = self.model.max_answer_tokens
        return {"prompt_ids": [list(r["prompt_ids"]) for r in samples],
                "candidate_ids": [[encode_answer(tokenizer, t, limit) for t in r["candidate_titles"]]
                                  for r in samples],
                "titles": [r["candidate_titles"] for r in samples],
                "targets": [r["chosen_index"] for r in samples]}

    def eval_metrics(self, model, tokenizer, state: dict) -> dict:
        """Recommendation metrics of the policy on the `eval_setup` slice, with the eval stage's
        definitions (`rosepo.eval.metrics`): ``rank/hr@k`` and ``rank/ndcg@k`` (candidates ranked by
        summed answer log-likelihood), ``hr@1``, ``valid_ratio`` and ``hr@1_valid`` (greedy answers
        of at most ``eval_max_new_tokens`` tokens).

        Greedy decoding stops when every row has ended, so ranks could run different numbers of
        forward passes, and ZeRO-3 needs the same passes on every rank: no greedy metrics there.
        """
        import torch

        step = self.cfg.micro_batch_size
        prompts, targets = state["prompt_ids"], state["targets"]
        scores, answers = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), step):
                logps, _ = answer_logps(model, prompts[i:i + step], state["candidate_ids"][i:i + step],
                                        prefix_sharing=self.cfg.prefix_sharing, pad_id=self.pad_id)
                scores.append(logps.double().cpu().numpy())
                if self.cfg.zero_stage < 3:
                    answers += greedy_answers(model, tokenizer, prompts[i:i + step], self.cfg.eval_max_new_tokens)
        out = {f"rank/{k}": v for k, v in ranking_metrics(np.concatenate(scores), targets, ks=(1, 5)).items()}
        if answers:
            gen = generation_metrics(answers, state["titles"], targets)
            out.update({k: gen[k] for k in ("hr@1", "valid_ratio", "hr@1_valid")})
        return out


def select_strategies(pairs, strategies):
    """The rows of the pairs table (pyarrow) made by ``strategies`` (all rows when empty);
    `DataError` when none is left."""
    if not strategies:
        return pairs
    kept = pairs.filter(pc.is_in(pairs.column("strategy"), pa.array(list(strategies))))
    if kept.num_rows == 0:
        raise DataError(f"no pair made by {', '.join(strategies)}: the pairs hold "
                        f"{', '.join(sorted(set(pairs.column('strategy').to_pylist())))}; set "
                        "align.strategies to some of those, or rebuild the pairs (pairs.mix: all)")
    return kept


def fit_align(cfg: Any, pairs_dir, base_model: str, adapter: str | None, output_dir: str, *, pad_id: int,
              callbacks: list | None = None):
    """`rosepo.train.loop.fit` of the `AlignTask` on the train pairs of ``align.strategies``,
    evaluated on all the ``valid`` pairs when there are any, into ``<output_dir>/align``; the
    align stage and every Tune trial train through here. ``cfg`` holds the ``align`` and ``model``
    sections. Returns (fit's result, the train table)."""
    import ray

    train = select_strategies(read_pairs(pairs_dir, "train"), cfg.align.strategies)
    tables = {"train": train}
    if pairs_file(pairs_dir, "valid").is_file():
        tables["eval"] = read_pairs(pairs_dir, "valid")
    if cfg.align.candidate_weight:
        tok = load_tokenizer(base_model)
        tables = {k: with_candidate_first_ids(t, tok, cfg.model.max_answer_tokens) for k, t in tables.items()}
    datasets = {k: ray.data.from_arrow(t) for k, t in tables.items()}
    # The SFT model's item file (trained projector), beside its adapter or its full model.
    result = fit(AlignTask(cfg.align, cfg.model, pad_id), cfg.model, model_path=str(base_model), adapter=adapter,
                 datasets=datasets, output_dir=output_dir, run_name="align", callbacks=callbacks,
                 items_path=find_items(adapter or base_model))
    return result, train


def run_align(cfg: Any, pairs_dir, base_model: str, sft_adapter: str | None, work: str, out_dir) -> dict:
    """Align the SFT model on the train pairs (its adapter continued, or a new LoRA on a fully
    fine-tuned SFT model when ``sft_adapter`` is None) with `rosepo.train.loop.fit` on the train
    pairs of ``align.strategies``; held-out ``valid`` pairs (all strategies) and a slice of their
    samples (``align.eval_rec_samples``) are evaluated before, during (``align.eval_every``) and
    after training. ``cfg`` holds the ``align`` and ``model`` sections.

    Writes ``<out_dir>/adapter`` (the aligned adapter, HF folder) and a manifest with the
    training history, the last metrics and the ε distribution used, atomically.
    """
    import torch

    result, train = fit_align(cfg, pairs_dir, str(base_model), sft_adapter, work,
                              pad_id=load_tokenizer(base_model).pad_token_id)
    oracle = np.array([[c, *r] for c, r in zip(train.column("oracle_chosen").to_pylist(),
                                               train.column("oracle_rejected").to_pylist())])
    eps = pair_eps(torch.as_tensor(oracle), cfg.align).numpy()
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        shutil.copytree(result["final_model"], tmp / ADAPTER_DIR)
        manifest = {"stage": "align", "loss": cfg.align.loss, "metrics": result["metrics"],
                    "history": result["history"], "eval_history": result.get("eval_history", []),
                    "eps": eps_summary(eps), "resumed_from_step": result["resumed_from_step"], "pairs": len(train)}
        write_manifest(tmp, manifest)
    return manifest
