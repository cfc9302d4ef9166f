"""What the CPU benchmarks share: the machine line, alternated timing, medians with spread,
the matmul peak, model FLOPs of a Llama, and the default tiny model on real ML-100K prompts.

Pure helpers (`alternate`, `spread`, `paired_ratio`, `markdown`, `llama_forward_flops`,
`attended_keys`) import nothing heavy and are tested in ``tests/bench``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
#: The shipped default configuration: its model, alignment and eval sections are what is measured.
CONFIG = REPO / "configs" / "ml100k-tiny.yaml"
#: Cached inputs of the benchmarks (``ROSEPO_BENCH_DIR`` overrides; ``make clean`` removes runs/).
WORK = Path(os.environ.get("ROSEPO_BENCH_DIR", REPO / "runs" / "bench"))
#: Linear layers of one Llama-style decoder layer: name -> (in features, out features) as functions
#: of (hidden, intermediate, query width, key/value width). The query width is heads × head_dim:
#: the hidden size in Llama, 4 × 256 = 1,024 against a hidden size of 640 in Gemma-3-270M.
_LINEARS = {
    "q_proj": lambda d, f, q, kv: (d, q), "k_proj": lambda d, f, q, kv: (d, kv),
    "v_proj": lambda d, f, q, kv: (d, kv), "o_proj": lambda d, f, q, kv: (q, d),
    "gate_proj": lambda d, f, q, kv: (d, f), "up_proj": lambda d, f, q, kv: (d, f),
    "down_proj": lambda d, f, q, kv: (f, d),
}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def alternate(steps: dict[str, Callable[[int], object]], reps: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run ``steps`` in turn, ``A B C A B C ...``, ``reps`` rounds after ``warmup`` untimed rounds;
    returns the seconds of every timed call per name. Each step gets the round number."""
    for i in range(warmup):
        for step in steps.values():
            step(i)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(reps):
        for name, step in steps.items():
            t0 = clock()
            step(warmup + i)
            times[name].append(clock() - t0)
    return times


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of ``values``."""
    return statistics.median(values), min(values), max(values)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Ratio of the medians of ``num`` and ``den``, and the min and max of the per-round ratios
    ``num[i] / den[i]`` (two variants timed in the same round saw the same machine load)."""
    if len(num) != len(den) or not num:
        raise ValueError("need two equally long, non-empty series")
    per_round = [a / b for a, b in zip(num, den)]
    return statistics.median(num) / statistics.median(den), min(per_round), max(per_round)


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line: cores, memory, load average, date and time."""
    import psutil

    vm = psutil.virtual_memory()
    la = os.getloadavg()
    return (f"{os.cpu_count()} cores, {vm.total / 2**30:.1f} GiB RAM ({vm.available / 2**30:.1f} GiB available), "
            f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")


def matmul_peak(threads: int, n: int = 512, reps: int = 30) -> float:
    """Dense fp32 matmul FLOP/s with ``threads`` torch threads: best of ``reps`` n×n×n products.

    Best-of, not median: the peak is what the cores can do when not interrupted; the steps it is
    compared with are medians, so an MFU is, if anything, understated under load. 512 is large
    enough to reach the single-core rate here and small enough to fit the L2 cache's neighbourhood.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------

def attended_keys(prompt_len: int, answer_lens: Sequence[int], shared: bool) -> int:
    """Query-key pairs a causal forward needs for one prompt and its answers.

    ``shared``: one row, prompt + all answers, each answer token attending to the prompt and the
    earlier tokens of its own answer (prefix sharing). Otherwise one row per prompt + answer.
    """
    p = prompt_len
    if shared:
        return p * (p + 1) // 2 + sum(a * p + a * (a + 1) // 2 for a in answer_lens)
    return sum((p + a) * (p + a + 1) // 2 for a in answer_lens)


def llama_forward_flops(config, tokens: int, attended: int, logit_rows: int, lora_r: int = 0,
                        lora_modules: Sequence[str] = ()) -> tuple[int, int]:
    """``(parameters per token, forward FLOPs)`` of a Llama-style decoder.

    ``config`` has ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size`` and optionally ``head_dim``
    (hidden / heads when absent or None; a transformers config or any object with those). Counted:
    every decoder linear layer (2 FLOPs per weight per token), LoRA's two factors on
    ``lora_modules``, attention scores and values (4·heads·head_dim FLOPs per attended query-key
    pair per layer), and the LM head on ``logit_rows`` positions only (the positions whose
    log-probs are read). Not counted: norms, rotary, softmax, embedding look-up.
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = head * config.num_attention_heads, head * config.num_key_value_heads
    dense = layers * sum(i * o for i, o in (shape(d, f, q, kv) for shape in _LINEARS.values()))
    lora = layers * lora_r * sum(sum(_LINEARS[m](d, f, q, kv)) for m in lora_modules)
    flops = 2 * (dense + lora) * tokens + 4 * q * layers * attended + 2 * d * config.vocab_size * logit_rows
    return dense + lora, flops


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------

def bench_config(overrides: Sequence[str] = (), config: str | Path = CONFIG):
    """A shipped `RunConfig` (the default, `CONFIG`) with ``overrides``, data read from the checkout."""
    from rosepo.config import load_config

    return load_config(config, [f"data.data_dir={REPO / 'data'}", *overrides])


def ml100k_samples(data_cfg, users: int) -> tuple[list[dict], list[str]]:
    """Samples of the first ``users`` MovieLens-100K users (by id) and every catalog title.

    Built in this process with rosepo's own per-user function (`build_user_windows`), no Ray:
    the same windows, candidates and prompts as `rosepo data build` (all splits' rules applied).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from rosepo.data.samples import assign_splits, build_user_windows, load_source, user_blocks

    inter, catalog, _ = load_source(data_cfg)
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    every = pc.unique(inter.column("user_id")).to_pylist()
    split_of = assign_splits(every, data_cfg.split, data_cfg.seed)
    block = user_blocks(inter.filter(pc.is_in(inter.column("user_id"), pa.array(sorted(every)[:users]))), 1)[0]
    rows = build_user_windows(block, titles=titles, item_ids=sorted(titles), split_of=split_of,
                              cfg=data_cfg).to_pylist()
    return rows, sorted(set(titles.values()))


def tiny_model(model_cfg, samples: list[dict], titles: list[str], root: str | Path | None = None) -> Path:
    """The built-in tiny Llama of ``model_cfg`` with its tokenizer trained, as the model stage
    trains it, on prompts and titles (here those of ``samples`` and the catalog); random weights
    under seed 0. Returns the HF folder, cached under ``root`` (default `WORK`) by a hash of its
    inputs (the benchmarks of one ``make bench`` share it)."""
    import dataclasses

    from rosepo.config import config_hash
    from rosepo.model.factory import build_tiny_model

    texts = [r["prompt"] for r in samples] + titles
    out = Path(root or WORK) / f"model-{config_hash(dataclasses.asdict(model_cfg), texts)}" / "hf"
    if not (out / "config.json").is_file():
        build_tiny_model(model_cfg, texts, out, titles=titles)
    return out


def quiet_hf() -> None:
    """Offline, and no progress bars or advisory warnings from transformers / peft / datasets."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("transformers", "peft", "datasets", "trl", "accelerate", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
