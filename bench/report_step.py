"""SFT step time with a ``ray.train.report`` every step (what rosepo did before) against reports
at evaluations and checkpoints only (what it does now), alternated in one process (A B A B ...).

The pipeline builds the config's samples, oracle and model (cached like any run); the SFT training
set is tokenised once, as the sft stage tokenises it; then each round runs `rosepo.train.loop.fit`
of the SFT task twice, one run per variant (``report_every_step`` on and off), on the same Ray. A
step's time is the wall-clock gap between rank 0's TensorBoard writes of consecutive steps (so the
report round trip is in it); the first step (warm-up) and the last (the final checkpoint) are left
out. One JSON line per run, then the medians.

    python -m bench report --rounds 3 --steps 40
    python -m bench report --rounds 1 --steps 4   # a check of the code, not a measurement
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

from rosepo.config import load_config

VARIANTS = {"every-step": True, "evals-only": False}


def run(argv: list[str] | None = None) -> int:
    """Parse the options, run the rounds, print each run and the medians; exit code."""
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    cfg = load_config(a.config, [*a.overrides, f"sft.max_steps={a.steps}", "sft.checkpoint_every=0",
                                 "sft.tensorboard=true", "sft.logging_steps=0"])
    runs = measure(cfg, a.rounds)
    for name in VARIANTS:
        ms = [r["step_ms_median"] for r in runs if r["variant"] == name]
        print(json.dumps({"variant": name, "step_ms_median_of_runs": round(statistics.median(ms), 1),
                          "min": round(min(ms), 1), "max": round(max(ms), 1)}))
    ratios = [e["step_ms_median"] / q["step_ms_median"] for e, q in zip(runs[::2], runs[1::2])]
    print(json.dumps({"every-step / evals-only": round(statistics.median(ratios), 2),
                      "per-round": [round(r, 2) for r in ratios]}))
    return 0


def measure(cfg, rounds: int) -> list[dict]:
    """``rounds`` x both variants of SFT `fit`, alternated; one dict per run."""
    import ray

    from rosepo.layout import base_model_path, find_items
    from rosepo.pipeline import run_stage
    from rosepo.runtime import init_ray
    from rosepo.train.loop import fit
    from rosepo.train.sft import SFTTask, for_data_size, sft_dataset, sft_samples

    init_ray(cfg.ray_address)
    model_stage = run_stage(cfg, "model")
    base, items = base_model_path(model_stage), find_items(model_stage)
    samples = run_stage(cfg, "samples")
    train = sft_samples(cfg.sft, samples)
    # As the sft stage tokenises them: item tokens with the model's item file, the oracle's scores
    # where the config distils them, the decoys where it has them.
    oracle = run_stage(cfg, "oracle")
    cfg = dataclasses.replace(cfg, sft=for_data_size(cfg.sft, len(train)))
    dataset = sft_dataset(cfg, ray.data.from_arrow(train), base, items, oracle, str(samples))
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for r in range(rounds):
            for name, every_step in VARIANTS.items():
                t0 = time.perf_counter()
                fit(SFTTask(cfg.sft), cfg.model, model_path=base, adapter=None, datasets={"train": dataset},
                    output_dir=out, run_name=f"{name}-{r}", report_every_step=every_step, items_path=items)
                gaps = step_gaps(Path(out) / f"{name}-{r}" / "tensorboard")  # of n steps: n - 1, less 2
                runs.append({"variant": name, "round": r, "steps": len(gaps) + 3,
                             "step_ms_median": 1000 * statistics.median(gaps),
                             "fit_s": round(time.perf_counter() - t0, 1)})
                print(json.dumps(runs[-1] | {"step_ms_median": round(runs[-1]["step_ms_median"], 1)}), flush=True)
    return runs


def step_gaps(folder: Path, tag: str = "loss") -> list[float]:
    """Seconds between consecutive steps' ``tag`` scalars in the TensorBoard event files of
    ``folder``, without the first step's and the last step's."""
    from tensorboardX.proto import event_pb2

    wall: dict[int, float] = {}
    for f in folder.glob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos < len(data):  # TFRecord: length (u64), its CRC, the record, the record's CRC
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if any(v.tag == tag for v in event.summary.value):
                wall[event.step] = event.wall_time
    steps = sorted(wall)
    return [wall[b] - wall[a] for a, b in zip(steps[1:-2], steps[2:-1])]
