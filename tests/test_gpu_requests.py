"""GPU runs on a machine without one: every stage asks Ray for the GPUs its config names, a run
whose GPUs cannot come stops before any stage, and a cluster that may grow is waited for.

A local Ray can declare GPUs it does not have (``ray.init(num_gpus=2)``): Ray then places the
actors and workers that ask for one, and they fail only where CUDA itself is touched. That shows
the request without a GPU: the scoring actors' device check names the GPU Ray gave them; the
training workers get NCCL, which Ray Train picks only for workers that hold a GPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from rosepo import pipeline, runtime
from rosepo.config import RunConfig, load_config
from rosepo.errors import ConfigError
from tests.conftest import COMMAND_ENV, REPO, rosepo_command

#: Run in a process of its own (one Ray per process): each stage of a finished smoke run again with
#: its own ``use_gpu``, on a Ray that declares eight GPUs; prints stage -> what it raised.
FAKE_GPUS = r"""
import json, sys
import ray
from rosepo.config import load_config
from rosepo import pipeline

run = sys.argv[1]
# CPUs to spare: a trainer whose workers fail to start (NCCL) leaks its placement group.
ray.init(num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
out = {}
for stage in ("pairs", "eval", "oracle", "sft"):
    cfg = load_config(f"{run}/config.yaml", [f"{stage}.use_gpu=true"])
    try:
        pipeline.run_stage(cfg, stage)
        out[stage] = "ran"
    except Exception as e:
        out[stage] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
"""


def test_the_run_level_switch_fills_every_stage_unless_it_says_otherwise():
    cfg = load_config("configs/smoke.yaml", ["use_gpu=true", "eval.use_gpu=false"])
    assert [getattr(cfg, s).use_gpu for s in ("oracle", "sft", "pairs", "align", "eval")] == [True] * 4 + [False]
    assert cfg.gpu_demand() == {"oracle": 1, "sft": 2, "pairs": 1, "align": 2}
    assert load_config("configs/smoke.yaml").gpu_demand() == {}
    # Only the stages a command runs count: `rosepo run --until sft` asks for no alignment GPU.
    assert cfg.gpu_demand(pipeline.stages_until("sft")) == {"oracle": 1, "sft": 2}
    assert pipeline.stages_until("model") == ("samples", "oracle", "model")
    assert pipeline.stages_until(None) == tuple(pipeline.GRAPH)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_asking_for_gpus_a_local_ray_lacks_stops_before_any_stage(tmp_path):
    """rosepo's own local Ray on a machine without a GPU cannot get one: one error line, exit 2,
    and no stage folder (measured before: the samples, oracle and model stages ran, then the run
    waited silently)."""
    proc = subprocess.run(rosepo_command("run", "--config", "configs/smoke.yaml", f"storage={tmp_path}",
                                         f"data.data_dir={REPO / 'data'}", "use_gpu=true"),
                          cwd=REPO, env=COMMAND_ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rosepo: error: the run asks for GPUs (oracle 1, sft 2, pairs 1, align 2, eval 1) but this machine's " \
           "Ray has 0" in proc.stderr
    assert not any(tmp_path.rglob("manifest.json"))


def test_a_cluster_that_may_grow_is_waited_for(ray_session, monkeypatch, caplog):
    """Joined by address, a cluster with no GPU now may be autoscaling (a CPU-only head is normal):
    a warning that the stages wait, not a refusal; the same demand on a Ray started here is refused."""
    demand = {"sft": 2}
    monkeypatch.setattr(runtime, "_started_here", False)
    with caplog.at_level(logging.WARNING, logger="rosepo"):
        runtime.check_gpus(demand)
    assert "wait for the autoscaler to add GPU nodes" in caplog.text
    monkeypatch.setattr(runtime, "_started_here", True)
    with pytest.raises(ConfigError, match=r"asks for GPUs \(sft 2\)"):
        runtime.check_gpus(demand)
    runtime.check_gpus({})  # a CPU run asks nothing


def test_tune_warns_instead_of_refusing_on_a_cluster_that_may_grow(caplog):
    from rosepo.experiments.search import check_search, validate_search

    cfg = RunConfig().validate()
    cfg.align.use_gpu = True
    search = validate_search({"metric": "eval/rewards/accuracies", "space": {"align.beta": {"grid": [0.1]}}})
    with pytest.raises(ConfigError, match="one trial needs 2 GPUs"):
        check_search(cfg, search, {"CPU": 8.0})
    with caplog.at_level(logging.WARNING, logger="rosepo"):
        check_search(cfg, search, {"CPU": 8.0}, can_grow=True)
    assert "wait for the autoscaler" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_trainer_and_actor_pool_asks_for_its_gpus(smoke_run):
    """On a Ray that declares 8 GPUs, each stage re-run with its ``use_gpu``: the oracle's and the
    SFT stage's Ray Train workers start NCCL (Ray Train's backend for workers that hold a GPU), and
    the pair-scoring and evaluation actors are given a GPU (their device check names it)."""
    run = smoke_run[2]
    proc = subprocess.run([sys.executable, "-c", FAKE_GPUS, str(run)], cwd=REPO, env=COMMAND_ENV,
                          capture_output=True, text=True, timeout=560)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    for stage in ("oracle", "sft"):
        assert "NCCL" in result[stage], (stage, result[stage][:2000])
    for stage in ("pairs", "eval"):
        assert f"config key '{stage}.use_gpu' asks for a GPU" in result[stage], (stage, result[stage][:2000])
        assert "'GPU': 1.0" in result[stage], (stage, result[stage][:2000])
