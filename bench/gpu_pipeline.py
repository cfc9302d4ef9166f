"""The whole pipeline on one GPU, through Ray Data, Ray Train and DeepSpeed: the GPU check.

Each variant is a rosepo run (its config plus overrides, every stage on the GPU: ``use_gpu=true``,
one training worker, one scoring actor) whose stages run one after the other while a thread polls
``nvidia-smi``; per stage it reports the seconds, the peak GPU memory of the card and the
throughput the stage's manifest records (training: samples/s and MFU of the last step, and over
the whole stage; pairs and eval: samples/s), then the run's evaluation table. Plans:

``check`` (the default; ~6 min on an H200 with Ray's start): the tiny default with ZeRO-2, the same
with ZeRO-3, and the Gemma GPU config (`configs/ml100k-gemma3-270m-gpu.yaml`) at a small budget.

``claims``: the RosePO paper's protocol on Gemma-3-270M: SFT on the whole train split (one
epoch), pairs from the train split, then `rosepo compare` of sft, dpo, sdpo and rosepo over two
seeds on all 475 test samples; text-only prompts first, then the hybrid item tokens. Results are
written as they come (``--out``), so a run cut short keeps what finished; ``--methods`` and
``--seeds`` cut it down (methods before seeds).

``--cpu`` runs a plan's variants on the CPU at the smoke config's size: the same code path but
the device. ``smoke`` (with ``--cpu``) runs `configs/smoke.yaml` as it is, plus the overrides given
after the options (what `make test` runs over its finished smoke run, whose stages it then finds).

    python -m bench gpu-pipeline --out /tmp/gpu-check
    python -m bench gpu-pipeline --plan claims --out /tmp/gpu-claims
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from rosepo import runtime
from rosepo.config import load_config
from rosepo.pipeline import GRAPH, run_folder, run_stage
from rosepo.storage import atomic_write_text, read_manifest

#: What every GPU variant sets: the run on the GPU, one worker and one actor per stage (one card),
#: TF-IDF titles (the MiniLM package is not on an offline GPU box).
ON_GPU = ("use_gpu=true", "sft.num_workers=1", "align.num_workers=1", "pairs.num_actors=1", "eval.num_actors=1",
          "pairs.embedder=tfidf")
GEMMA = "configs/ml100k-gemma3-270m-gpu.yaml"
#: plan -> [(variant, config, overrides)].
PLANS = {
    "check": [
        ("tiny-zero2", "configs/ml100k-tiny.yaml", ["sft.micro_batch_size=32", "align.micro_batch_size=16"]),
        ("tiny-zero3", "configs/ml100k-tiny.yaml", ["sft.micro_batch_size=32", "align.micro_batch_size=16",
                                                     "sft.zero_stage=3", "align.zero_stage=3"]),
        ("gemma-small", GEMMA, ["sft.max_samples=4096", "pairs.max_samples=512", "pairs.eval_samples=64",
                                "align.max_steps=40", "align.eval_every=20", "eval.max_samples=100"]),
    ],
    "claims": [
        ("gemma-text", GEMMA, ["pairs.max_samples=4000", "compare.align_steps=250"]),
        ("gemma-hybrid", GEMMA, ["model.item_embeddings=sasrec", "pairs.max_samples=4000",
                                 "compare.align_steps=250"]),
    ],
    "smoke": [("smoke", "configs/smoke.yaml", [])],
}
#: ``--cpu``: each variant at the smoke config's size.
CPU_SIZE = ("sft.max_samples=64", "sft.max_steps=4", "oracle.max_steps=4", "pairs.max_samples=16",
            "pairs.eval_samples=8", "align.max_steps=2", "eval.max_samples=8", "sft.num_workers=1",
            "align.num_workers=1", "pairs.num_actors=1", "eval.num_actors=1", "pairs.embedder=tfidf",
            "compare.align_steps=2")
CLAIMS_METHODS = ("dpo", "sdpo", "rosepo")


class GpuMemory:
    """Polls ``nvidia-smi`` for the card's used memory every ``every`` seconds; `peak` since the
    last `reset` (MiB, None without nvidia-smi). The stages run in Ray's processes, so the card,
    not this process, is measured."""

    def __init__(self, every: float = 0.25):
        self.every, self.high, self._stop = every, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = _nvidia_smi("memory.used")
            if used is not None:
                self.high = max(self.high or 0, used)
            self._stop.wait(self.every)

    def reset(self) -> None:
        self.high = _nvidia_smi("memory.used")

    def stop(self) -> None:
        self._stop.set()


def _nvidia_smi(field: str) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def card() -> dict:
    """The GPU and software this runs on."""
    import ray
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "ray": ray.__version__}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()}
    return info


def stage_throughput(stage: str, folder: Path) -> dict:
    """What a finished stage's manifest says of its speed."""
    m = read_manifest(folder)
    if stage in ("sft", "align"):
        last = m.get("metrics", {})
        steps = len(m.get("history", []))
        return {"steps": steps, "step samples/s": last.get("perf/samples_per_second"),
                "step tokens/s": last.get("perf/tokens_per_second"), "mfu": last.get("perf/mfu")}
    if stage == "pairs":
        samples = sum(s["samples"] for s in m["splits"].values())
        return {"samples": samples, "samples/s": samples / max(m["seconds"], 1e-9)}
    if stage == "eval":
        return {"samples/s": read_manifest(folder / "aligned").get("samples_per_second")}
    if stage == "oracle":
        return {"steps": m.get("steps"), "fit seconds": m.get("fit_seconds")}
    return {}


def run_variant(name: str, config: str, overrides: list[str], storage: Path, memory: GpuMemory,
                until: str | None = None) -> dict:
    """Every stage of one variant in order (up to ``until``), each timed and measured; the eval
    table when the eval stage ran."""
    cfg = load_config(config, [*overrides, f"storage={storage}", f"name={name}"])
    runtime.check_gpus(cfg.gpu_demand())
    ready: dict = {}
    stages = {}
    for stage in GRAPH:
        memory.reset()
        t0 = time.perf_counter()
        out = run_stage(cfg, stage, _ready=ready)
        seconds = time.perf_counter() - t0
        stages[stage] = {"seconds": round(seconds, 1), "peak GPU MiB": memory.high,
                         **stage_throughput(stage, out)}
        print(f"[gpu-pipeline] {name} {stage}: {json.dumps(stages[stage])}", flush=True)
        if stage == until:
            break
    report = {"config": config, "overrides": overrides, "stages": stages, "run": str(run_folder(cfg))}
    if "eval" in ready:
        report["results"] = read_manifest(ready["eval"])["results"]
    return report


def run_claims(name: str, config: str, overrides: list[str], storage: Path, memory: GpuMemory,
               methods: tuple[str, ...], seeds: int) -> dict:
    """The paper's protocol for one variant: the pipeline through SFT and its timing, then `rosepo
    compare` of ``methods`` over ``seeds`` seeds on the config's evaluation split."""
    from rosepo.experiments.compare import run_compare

    base = run_variant(name, config, overrides, storage, memory, until="sft")
    cfg = load_config(config, [*overrides, f"storage={storage}", f"name={name}", f"compare.seeds={seeds}",
                               f"compare.methods=[{','.join(methods)}]"])
    t0 = time.perf_counter()
    paths = run_compare(cfg)
    return {**base, "compare_seconds": round(time.perf_counter() - t0, 1),
            "table": Path(paths["table"]).read_text(), "results": json.loads(Path(paths["results"]).read_text())}


def markdown(report: dict) -> str:
    """The report as Markdown: the card, then per variant its stages and its evaluation table."""
    lines = [f"card: {json.dumps(report['card'])}", ""]
    for name, v in report["variants"].items():
        if "error" in v:
            lines += [f"## {name}: failed", "", f"    {v['error']}", ""]
            continue
        keys = sorted({k for s in v["stages"].values() for k in s} - {"seconds", "peak GPU MiB"})
        lines += [f"## {name}", "", "| stage | seconds | peak GPU MiB | " + " | ".join(keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for stage, s in v["stages"].items():
            lines.append(f"| {stage} | {s['seconds']} | {s['peak GPU MiB']} | "
                         + " | ".join(_fmt(s.get(k)) for k in keys) + " |")
        if "table" in v:
            lines += ["", v["table"]]
        elif "results" in v:
            lines += ["", "| method | hr@1 | valid_ratio | rank/hr@1 |", "|---|---|---|---|"]
            lines += [f"| {m} | {_fmt(r.get('eval/hr@1'))} | {_fmt(r.get('eval/valid_ratio'))} | "
                      f"{_fmt(r.get('eval/rank/hr@1'))} |" for m, r in v["results"].items()]
        lines.append("")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def run(argv: list[str] | None = None) -> int:
    """Run a plan (module docstring); write ``gpu-pipeline.json`` and ``.md`` into ``--out``."""
    p = argparse.ArgumentParser(prog="python -m bench gpu-pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), default="check")
    p.add_argument("--out", default="runs/gpu-pipeline", help="where the report goes")
    p.add_argument("--storage", default="", help="the runs' storage (default: <out>/runs)")
    p.add_argument("--variant", action="append", default=[], help="run only these variants (repeatable)")
    p.add_argument("--methods", default=",".join(CLAIMS_METHODS), help="claims: the compared methods")
    p.add_argument("--seeds", type=int, default=2, help="claims: alignment seeds per method")
    p.add_argument("--cpu", action="store_true", help="on the CPU at the smoke config's size (the code path)")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="start Ray without its dashboard (a Ray installed without the dashboard's packages)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every variant")
    a = p.parse_args(argv if argv is not None else [])
    if argv is None or (not argv and not a.cpu):  # `python -m bench all`: this one needs a GPU
        import torch

        if not torch.cuda.is_available():
            print("bench gpu-pipeline: no CUDA device here, skipped (see --cpu)")
            return 0
    out = Path(a.out)
    storage = Path(a.storage) if a.storage else out / "runs"
    variants = [v for v in PLANS[a.plan] if not a.variant or v[0] in a.variant]
    runtime.init_ray(dashboard=a.dashboard)
    memory = GpuMemory()
    report = {"plan": a.plan, "card": card(), "variants": {}}
    t0 = time.perf_counter()
    try:
        for name, config, overrides in variants:
            if not a.cpu:
                overrides = [*ON_GPU, *overrides]
            elif a.plan != "smoke":
                overrides = [*overrides, *CPU_SIZE]
            overrides = [*overrides, *a.overrides]
            try:
                if a.plan == "claims":
                    methods = tuple(m for m in a.methods.split(",") if m)
                    report["variants"][name] = run_claims(name, config, overrides, storage, memory, methods, a.seeds)
                else:
                    report["variants"][name] = run_variant(name, config, overrides, storage, memory)
            except Exception as e:  # a variant that fails is reported; the next one still runs
                report["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:4000]}
            report["seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(out / "gpu-pipeline.json", json.dumps(report, indent=2, default=str))
            atomic_write_text(out / "gpu-pipeline.md", markdown(report))
    finally:
        memory.stop()
    print(markdown(report))
    return 1 if any("error" in v for v in report["variants"].values()) else 0
