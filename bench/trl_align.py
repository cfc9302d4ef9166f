"""Alignment step throughput: rosepo's RosePO step against TRL's ``DPOTrainer``, one process, CPU.

The same model, pairs, batch and optimiser on every side:

- model (``--model``): ``tiny``, the default tiny Llama (``configs/ml100k-tiny.yaml``: title
  tokens, 2 layers, hidden 128) built from its config with a tokenizer trained on ML-100K prompts,
  random weights (seed 0); or ``gemma-3-270m``, the pretrained Gemma-3-270M with the prompts and
  LoRA of ``configs/ml100k-gemma3-270m.yaml`` (text only: TRL has no item tokens), fetched on
  first use. fp32, a new LoRA (the alignment's r, α and target modules) on top;
- pairs: ML-100K samples of the first users (rosepo's sample builder, no Ray), chosen = the
  target title, rejected = the first other candidate; the token ids are checked to be the same
  on both sides (TRL tokenises prompt + completion text itself);
- step: collate + forward + loss + backward + gradient clipping (``max_grad_norm``) + AdamW
  (torch, ``align.learning_rate``, no weight decay, constant schedule) + zero_grad.

Variants, timed in turn (A B C A B C ...) on batches cycled from the same pairs:

- ``rosepo``: `rosepo.train.align.collate` + `rosepo.train.align.compute_loss` (RosePO loss,
  personalised ε, and the config's other terms: the chosen answer's NLL, ``align.sft_weight``, and
  the candidate term, ``align.candidate_weight``, read from the same forward; reference log-probs
  precomputed, prefix sharing: prompt once, no padding of answers to the prompt); its reference
  pass is timed once, separately, as the pairs stage runs it;
- ``trl``: ``DPOTrainer``, sigmoid loss, default online reference (the LoRA disabled);
- ``trl-precomputed``: the same with ``precompute_ref_log_probs=True`` (its pre-pass, run by the
  trainer's constructor, is timed and reported, not counted in the step);
- ``trl-compact``, ``trl-compact-precomputed``: the same two trainers with TRL's fused LM head
  scoring only the completion positions. TRL 1.16 does that only where its Triton kernel runs
  (CUDA, XPU); on CPU it projects every position of every row through the 5.6k-token head.
  These variants take the GPU path's choice on CPU (``trl.trainer.utils._use_triton`` answers
  True during their steps; the tiles still run in torch): TRL as it behaves where it is used.
  The targets are judged against them, the fairest TRL.

TRL is driven the way ``Trainer`` drives it per step (``data_collator`` → ``training_step`` →
``clip_grad_norm_`` → ``optimizer.step`` → ``lr_scheduler.step`` → ``zero_grad``), so the
trainers' own loop (callbacks, logging, data loader) is left out of the alternated timing; a
short ``trainer.train()`` per TRL variant afterwards shows that loop's cost (``--train-steps``).
Needs the ``bench`` extra (``pip install -e '.[bench]'``): without trl it says so and exits 2
(``--no-trl`` times rosepo's step alone, for a check where TRL is not installed).

    python -m bench trl [--model tiny|gemma-3-270m] [--reps 10] [--batch 8] [--threads 1] [--train-steps 6]
    python -m bench trl --reps 1 --batch 2 --batches 1 --users 4 --train-steps 1   # seconds: a check, not a measurement
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time

from bench.align_step import MODELS, describe, policy, rosepo_step, setup, step_flops
from bench.common import alternate, machine, markdown, matmul_peak, paired_ratio, quiet_hf, spread

TRL_MISSING = ("bench trl: TRL is not installed; it is kept out of rosepo's dependencies. Install the bench "
               "extra: pip install -e '.[bench]'  (pins trl==1.16.0)")


def _step_ends():
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        """Times of ``on_step_end``: their differences are whole loop steps (data loading, callbacks,
        logging included), the first step's warm-up left out."""

        def __init__(self):
            self.at: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.at.append(time.perf_counter())

    return StepEnds


def trl_peers(args, st: dict) -> dict | None:
    """The TRL variants on the pairs of ``st`` (`bench.align_step.setup`): ``steps`` (name -> step
    function), ``precompute_s`` (TRL's reference pre-pass), ``train_loops()`` (median seconds per
    ``trainer.train()`` step of each stock variant), ``version`` and ``cleanup()``. None, after
    saying why, when TRL tokenised the pairs differently from rosepo."""
    import datasets
    import torch
    import trl
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from rosepo.model.factory import load_model

    datasets.disable_progress_bars()
    StepEnds = _step_ends()
    mcfg, acfg, tok, path, rows = st["model_cfg"], st["align_cfg"], st["tok"], st["path"], st["rows"]

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer whose reference pre-pass (run by its constructor) is timed."""

        precompute_s = 0.0

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            TimedDPOTrainer.precompute_s += time.perf_counter() - start
            return out

    lora = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                      target_modules=list(mcfg.lora_target_modules), task_type="CAUSAL_LM")
    text = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in st["pairs"]])
    tmp = tempfile.TemporaryDirectory()
    stock_use_triton = trl_utils._use_triton
    # Stock TRL on CPU pushes every position through the LM head: with Gemma's 262,144-token
    # vocabulary that is ~4 TFLOP a step (minutes), and not how TRL runs where it is used. On a
    # pretrained model only the compact variants run, their reference pre-pass compact too.
    stock = args.model == "tiny"

    def trainer(precompute: bool, max_steps: int = 10**6):
        cfg = DPOConfig(
            output_dir=tmp.name, per_device_train_batch_size=args.batch, learning_rate=acfg.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=acfg.max_grad_norm,
            optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
            loss_type=["sigmoid"], beta=acfg.beta, max_length=None, precompute_ref_log_probs=precompute,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, max_steps=max_steps, seed=0)
        TimedDPOTrainer.precompute_s = 0.0
        trl_utils._use_triton = stock_use_triton if stock else (lambda device: True)
        try:
            tr = TimedDPOTrainer(model=load_model(str(path), dtype=torch.float32), args=cfg, train_dataset=text,
                                 processing_class=tok, peft_config=lora)
        finally:
            trl_utils._use_triton = stock_use_triton
        return tr, TimedDPOTrainer.precompute_s

    trl_default, _ = trainer(False)
    trl_pre, trl_precompute_s = trainer(True)
    torch.set_num_threads(args.threads)  # whatever accelerate did at start-up
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
    examples = {}
    for name, tr in (("trl", trl_default), ("trl-precomputed", trl_pre)):
        ds = tr.train_dataset
        examples[name] = [{k: ds[j][k] for k in keys if k in ds.column_names} for j in range(len(ds))]
        tr.create_optimizer_and_scheduler(num_training_steps=10**6)
        tr.current_gradient_accumulation_steps = 1  # set by Trainer's loop per step
    same_ids = all(e["prompt_ids"] == r["prompt_ids"] and e["chosen_ids"] == r["chosen_ids"]
                   and [e["rejected_ids"]] == r["rejected_ids"] for e, r in zip(examples["trl"], rows))
    if not same_ids:
        print("bench trl: TRL tokenised the pairs differently from rosepo; the comparison would not be fair",
              file=sys.stderr)
        tmp.cleanup()
        return None

    def trl_step(name: str, tr, compact: bool):
        def step(i: int) -> None:
            # TRL's fused LM head scores only the completion positions where its Triton kernel runs
            # (CUDA, XPU) and every position elsewhere; "compact" takes the CUDA path's choice on CPU.
            trl_utils._use_triton = (lambda device: True) if compact else stock_use_triton
            try:
                batch = tr.data_collator(examples[name][(i % args.batches) * args.batch:][:args.batch])
                tr.training_step(tr.model, batch)
                tr.accelerator.clip_grad_norm_(tr.model.parameters(), tr.args.max_grad_norm)
                tr.optimizer.step()
                tr.lr_scheduler.step()
                tr.model.zero_grad()
            finally:
                trl_utils._use_triton = stock_use_triton
        return step

    steps = {}
    if stock:
        steps |= {"trl": trl_step("trl", trl_default, False),
                  "trl-precomputed": trl_step("trl-precomputed", trl_pre, False)}
    steps |= {"trl-compact": trl_step("trl", trl_default, True),
              "trl-compact-precomputed": trl_step("trl-precomputed", trl_pre, True)}

    def train_loops() -> dict[str, float]:
        loop = {}
        for name, precompute in (("trl", False), ("trl-precomputed", True)):
            if args.train_steps and stock:
                tr, _ = trainer(precompute, max_steps=args.train_steps + 1)
                ends = StepEnds()
                tr.add_callback(ends)
                torch.set_num_threads(args.threads)
                with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its summary
                    tr.train()
                loop[name] = statistics.median(b - a for a, b in zip(ends.at, ends.at[1:]))
        return loop

    return {"steps": steps, "precompute_s": trl_precompute_s, "train_loops": train_loops,
            "version": trl.__version__, "cleanup": tmp.cleanup}


def run(argv: list[str]) -> int:
    """Time the variants alternately; print the tables."""
    p = argparse.ArgumentParser(prog="python -m bench trl", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="the model both sides train")
    p.add_argument("--reps", type=int, default=10, help="alternated rounds (after 2 warm-up rounds)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (the default align.micro_batch_size)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see BENCHMARKS.md: 1 on this box)")
    p.add_argument("--users", type=int, default=64, help="ML-100K users whose samples give prompts")
    p.add_argument("--train-steps", type=int, default=6,
                   help="steps of trainer.train() per TRL variant after the alternation (0: skip)")
    p.add_argument("--no-trl", action="store_true",
                   help="rosepo's step alone, without TRL (a check of this benchmark where TRL is not installed)")
    args = p.parse_args(argv)
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print(TRL_MISSING, file=sys.stderr)
            return 2
    quiet_hf()
    import torch

    torch.set_num_threads(args.threads)
    st = setup(args.users, args.batch * args.batches, args.batch, args.model)
    mcfg, rows = st["model_cfg"], st["rows"]
    model = policy(st["path"], mcfg)
    steps = {"rosepo": rosepo_step(model, rows, args.batch, st["align_cfg"], st["tok"].pad_token_id)}
    peers = None
    if not args.no_trl:
        peers = trl_peers(args, st)
        if peers is None:
            return 1
        steps |= peers["steps"]
    print(f"machine: {machine()}", flush=True)
    times = alternate(steps, args.reps, warmup=2)
    peak = matmul_peak(args.threads)
    loop = peers["train_loops"]() if peers else {}
    la = machine()

    # tokens: of the pairs (prompt + chosen + rejected, once each); run: what each variant computes.
    pair_tokens = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"][0]) for r in rows)
    trl_tokens = pair_tokens + sum(len(r["prompt_ids"]) for r in rows)
    flops_of = {(shared, online): step_flops(model.config, rows, mcfg.lora_r, mcfg.lora_target_modules,
                                             shared=shared, reference_forward=online)
                for shared, online in ((True, False), (False, True), (False, False))}
    print(describe(model, st, args.batch, args.batches) + f"; torch threads {torch.get_num_threads()}; "
          f"trl {peers['version'] if peers else 'not run'}; {args.reps} alternated rounds")
    print(f"fp32 matmul peak with {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s (512^3, best of 30)")
    table = []
    for name in steps:
        med, lo, hi = spread(times[name])
        shared, online = name == "rosepo", name in ("trl", "trl-compact")
        mfu = flops_of[shared, online] / args.batches / med / peak
        table.append([name, f"{med * 1e3:.1f} ({lo * 1e3:.1f}–{hi * 1e3:.1f})", f"{args.batch / med:.1f}",
                      f"{pair_tokens / args.batches / med:,.0f}",
                      f"{(pair_tokens if shared else trl_tokens) / args.batches:,.0f}",
                      f"{mfu:.1%}", f"{loop[name] * 1e3:.1f}" if name in loop else "-"])
    print(markdown(["variant", "step ms, median (min–max)", "pairs/s", "pair tokens/s", "tokens run/step",
                    "MFU", "trainer.train() ms/step"], table))
    ratios = []
    for base, target in (("trl", 2.0), ("trl-compact", 2.0), ("trl-precomputed", 1.3),
                         ("trl-compact-precomputed", 1.3)):
        if base not in times:
            continue
        r, lo, hi = paired_ratio(times[base], times["rosepo"])
        ratios.append([f"rosepo vs {base}", f"{r:.2f}×", f"{lo:.2f}–{hi:.2f}", f"≥ {target}×",
                       "met" if r >= target else f"missed by {target - r:.2f}×"])
    if ratios:
        print(markdown(["speed-up (pairs/s)", "ratio of medians", "per-round ratio min–max", "target", ""], ratios))
    trl_ref = f"; TRL precompute_ref_log_probs {peers['precompute_s']:.2f} s" if peers else ""
    print(f"reference pass, not in the step: rosepo {st['ref_s']:.2f} s for {len(rows)} pairs (run by the pairs "
          f"stage, which scores the candidates anyway){trl_ref}")
    print(f"machine at the end: {la}")
    if peers:
        peers["cleanup"]()
    return 0
