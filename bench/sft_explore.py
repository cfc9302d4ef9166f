"""Exploration record for issue #14: the single-process probe that produced docs/record.md's
"SFT levers" curves (2026-12-01). Kept as it ran, with its own loss code (independent of
`rosepo.train.sft`, as the pandas baseline of bench.data_pipeline is of rosepo's sample builder);
the maintained measurement is `python -m bench sft-probe`, which trains with the SFT task itself.

It reads the samples of an earlier `runs/ml100k-tiny/samples-*` build (the paraphrase prompts;
``--prompt compact`` re-renders them space-separated), trains the default tiny Llama with AdamW,
and evaluates the first greedy token (valid = a candidate's title token) and the first-token
ranking of the candidates on ``--eval-n`` valid samples. ``--sasrec`` takes a file written by
saving ``{"emb": SASRec.item_emb.weight, "item_ids": vocab.item_ids}`` after 8 epochs of
`rosepo.pairs.oracle`'s SASRec.
"""
import argparse
import glob
import json
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from rosepo.config import ModelConfig
from rosepo.data.samples import read_split
from rosepo.model.factory import train_tokenizer

p = argparse.ArgumentParser()
p.add_argument("--prompt", default="default", choices=["default", "compact", "bare"])
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--eval-n", type=int, default=400)
p.add_argument("--sasrec", default="")
p.add_argument("--sasrec-scale", type=float, default=1.0)
p.add_argument("--sasrec-mode", default="replace", choices=["replace", "add"])
p.add_argument("--aux", type=float, default=0.0, help="weight of next-item loss on history titles")
p.add_argument("--cand-aux", type=float, default=0.0)
p.add_argument("--set-detach-emb", action="store_true")
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--warmup", type=float, default=0.03)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tag", default="")
args = p.parse_args()
torch.set_num_threads(args.threads)

samples = sorted(glob.glob("runs/ml100k-tiny/samples-*/"))[0]
train, valid = read_split(samples, "train"), read_split(samples, "valid")
titles = set()
for t in (train, valid, read_split(samples, "test")):
    for c in ("history_titles", "candidate_titles"):
        titles.update(x for xs in t.column(c).to_pylist() for x in xs)
texts = train.column("prompt").to_pylist()[:: max(1, len(train) // 4000)] + sorted(titles)
tok = train_tokenizer(texts, 4096, sorted(titles))
title_id = {t: tok.convert_tokens_to_ids(t) for t in titles}
EOS = tok.eos_token_id


def render(r):
    if args.prompt == "default":
        return r["prompt"]
    h = " ".join(r["history_titles"])
    c = " ".join(r["candidate_titles"])
    if args.prompt == "compact":
        return f"History: {h} Candidates: {c} Answer:"
    return f"{h} | {c} ="


def encode(r):
    ids = tok(render(r), add_special_tokens=False)["input_ids"]
    return ids


def rows_of(table):
    return table.to_pylist()


t0 = time.time()
tr = rows_of(train)
va = rows_of(valid)[: args.eval_n]
tr_ids = [encode(r) for r in tr]
va_ids = [encode(r) for r in va]
print(f"tokenised in {time.time()-t0:.0f}s; prompt tokens mean {np.mean([len(x) for x in tr_ids]):.1f}", flush=True)

from transformers import LlamaConfig, LlamaForCausalLM

cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                  eos_token_id=EOS, pad_token_id=tok.pad_token_id)
torch.manual_seed(args.seed)
model = LlamaForCausalLM(cfg)

if args.sasrec:
    saved = torch.load(args.sasrec, weights_only=True)
    emb = saved["emb"]
    index = {item: k + 1 for k, item in enumerate(saved["item_ids"])}
    item_title = {}
    for t in (train, valid, read_split(samples, "test")):
        for ids, ts in zip(t.column("candidate_item_ids").to_pylist() + t.column("history_item_ids").to_pylist(),
                           t.column("candidate_titles").to_pylist() + t.column("history_titles").to_pylist()):
            item_title.update(zip(ids, ts))
    g = torch.Generator().manual_seed(1)
    proj = torch.linalg.qr(torch.randn(args.hidden, emb.shape[1], generator=g))[0]  # orthonormal columns
    E = model.get_input_embeddings().weight
    with torch.no_grad():
        std = E.std().item()
        vecs = {}
        for item, k in index.items():
            vecs[title_id[item_title[item]]] = emb[k]
        rows = torch.tensor(sorted(vecs))
        V = torch.stack([vecs[int(i)] for i in rows])
        V = V / V.norm(dim=1, keepdim=True).mean()  # mean norm 1
        part = (V @ proj.T) * args.sasrec_scale * std * math.sqrt(args.hidden)
        E[rows] = part if args.sasrec_mode == "replace" else E[rows] + part
    print(f"sasrec init: {len(rows)} title rows, emb std {std:.4f}", flush=True)

opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
warm = int(args.warmup * args.steps)


def lr_at(s):
    if s < warm:
        return (s + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm)))


def batch_tensors(idx):
    seqs, labs = [], []
    for i in idx:
        r = tr[i]
        pid = tr_ids[i]
        a = [title_id[r["target_title"]], EOS]
        seq = pid + a
        lab = [-100] * len(pid) + a
        if args.aux or args.cand_aux:
            hist = set(title_id[t] for t in r["history_titles"])
            seen = 0
            for j, t in enumerate(pid):
                if t in hist and args.aux:
                    if seen > 0:
                        lab[j] = t  # predict history item j from the prefix (next-item)
                    seen += 1
        seqs.append(seq)
        labs.append(lab)
    w = max(map(len, seqs))
    ids = torch.full((len(seqs), w), tok.pad_token_id)
    lab = torch.full((len(seqs), w), -100)
    mask = torch.zeros((len(seqs), w), dtype=torch.long)
    for b, (s, l) in enumerate(zip(seqs, labs)):
        ids[b, w - len(s):] = torch.tensor(s)
        lab[b, w - len(s):] = torch.tensor(l)
        mask[b, w - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, lab, mask, pos


@torch.no_grad()
def evaluate():
    model.eval()
    valid_n = hit = rank_hit = 0
    for s in range(0, len(va), 64):
        chunk = list(range(s, min(len(va), s + 64)))
        seqs = [va_ids[i] for i in chunk]
        w = max(map(len, seqs))
        ids = torch.full((len(seqs), w), tok.pad_token_id)
        mask = torch.zeros((len(seqs), w), dtype=torch.long)
        for b, q in enumerate(seqs):
            ids[b, w - len(q):] = torch.tensor(q)
            mask[b, w - len(q):] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        top = logits.argmax(-1).tolist()
        for b, i in enumerate(chunk):
            r = va[i]
            cands = [title_id[t] for t in r["candidate_titles"]]
            tgt = title_id[r["target_title"]]
            valid_n += top[b] in cands
            hit += top[b] == tgt
            cl = logits[b, cands]
            rank_hit += int(cands[int(cl.argmax())] == tgt and (cl == cl.max()).sum() == 1)
    model.train()
    n = len(va)
    return {"valid": valid_n / n, "hr1": hit / n, "rank_hr1": rank_hit / n}


rng = np.random.default_rng(args.seed)
perm = []
model.train()
t0 = time.time()
curve = []
for step in range(args.steps):
    if len(perm) < args.batch:
        perm = list(rng.permutation(len(tr))) + perm
    idx, perm = perm[: args.batch], perm[args.batch:]
    for gparam in opt.param_groups:
        gparam["lr"] = args.lr * lr_at(step)
    ids, lab, mask, pos = batch_tensors(idx)
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    head = model.lm_head
    tgt_logits = head(out[:, -3:-1]).float()  # predicts answer title, EOS
    la = F.cross_entropy(tgt_logits.reshape(-1, tgt_logits.shape[-1]), lab[:, -2:].reshape(-1))
    loss = la
    if args.aux:
        l = lab[:, 1:]
        hm = l != -100
        hm[:, -2:] = False
        hpos = hm.nonzero()
        if len(hpos):
            hl = head(out[:, :-1][hpos[:, 0], hpos[:, 1]]).float()
            loss = loss + args.aux * F.cross_entropy(hl, l[hpos[:, 0], hpos[:, 1]])
    if args.cand_aux:
        cmask = torch.zeros_like(tgt_logits[:, 0], dtype=torch.bool)
        for b, i in enumerate(idx):
            cmask[b, [title_id[t] for t in tr[i]["candidate_titles"]]] = True
        a0 = (out[:, -3] @ head.weight.detach().T).float() if args.set_detach_emb else tgt_logits[:, 0]
        set_lp = torch.logsumexp(a0.masked_fill(~cmask, float("-inf")), -1) - torch.logsumexp(a0, -1)
        loss = loss - args.cand_aux * set_lp.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
        m = evaluate()
        el = time.time() - t0
        curve.append({"step": step + 1, "samples": (step + 1) * args.batch, "sec": round(el), **m})
        print(json.dumps({"tag": args.tag, **curve[-1], "loss": round(float(loss), 3)}), flush=True)
print("FINAL", json.dumps({"tag": args.tag, "args": vars(args), "curve": curve}), flush=True)
