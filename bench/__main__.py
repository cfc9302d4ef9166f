"""``python -m bench NAME [options]``: run one named benchmark; ``python -m bench all`` runs every one.

The registry below maps a name to ``(module, help)``; the module's ``run(argv) -> int`` parses its
own options. To add a benchmark, write ``bench/<module>.py`` with such a ``run``, add one line, and
give it a tiny-size case in ``tests/bench/test_bench_smoke.py`` (a test there fails until it has one).
"""

from __future__ import annotations

import importlib
import sys
import time

#: name -> (module under bench/, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "data": ("bench.data_pipeline", "sample building: rosepo (Ray Data) vs a single-process pandas baseline"),
    "align": ("bench.align_step", "RosePO step time with vs without prefix sharing, and MFU"),
    "trl": ("bench.trl_align", "RosePO step vs TRL's DPOTrainer (online and precomputed reference), and MFU"),
    "eval": ("bench.eval_throughput", "ranking and generation evaluation, prompts/s, vs naive variants"),
    "sft-probe": ("bench.sft_probe", "SFT learning curves of the tiny model: ValidRatio, rank HR@1 per step"),
    "gpu": ("bench.gpu_step", "RosePO step of a ~1B Llama on one GPU (bf16; LoRA and full; prefix sharing on/off)"),
    "report": ("bench.report_step", "SFT step time, ray.train.report every step vs at evaluations/checkpoints"),
    "gpu-sft": ("bench.gpu_sft", "Gemma config's SFT variants on one GPU without Ray: pack here, train there"),
    "gpu-pipeline": ("bench.gpu_pipeline", "every stage on one GPU through Ray + DeepSpeed: times, GPU memory, tables"),
    "fusion": ("bench.fusion", "the LLM's and SASRec's candidate scores fused: does the LLM add to its oracle"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by ``argv[0]`` with the remaining arguments (``all``: each in turn,
    with its defaults); print the list of benchmarks when no name is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] not in BENCHMARKS and argv[0] != "all"):
        print(__doc__.splitlines()[0] + "\n\nbenchmarks:")
        width = max(map(len, BENCHMARKS))
        for name, (_, text) in BENCHMARKS.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    names = list(BENCHMARKS) if argv[0] == "all" else [argv[0]]
    rc, start = 0, time.perf_counter()
    for name in names:
        print(f"== bench {name} ==", flush=True)
        module = importlib.import_module(BENCHMARKS[name][0])
        rc = max(rc, module.run(argv[1:] if argv[0] != "all" else []))
    if len(names) > 1:
        print(f"== {len(names)} benchmarks in {(time.perf_counter() - start) / 60:.1f} min ==")
    return rc


if __name__ == "__main__":
    sys.exit(main())
