"""jobs/train.py as users run it: `ray start --head`, `ray job submit`, kill and resubmit.

A separate Ray cluster (own ports, auth disabled: a throwaway local test cluster) is started with
the `ray` CLI, so this exercises the real job path: working-dir packaging, the driver joining the
cluster through RAY_ADDRESS, stage outputs on shared storage (an absolute path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosepo.runtime import free_port
from tests.conftest import copy_stages

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
PORTS: dict[str, int] = {}


def _dashboard() -> str:
    return f"http://127.0.0.1:{PORTS['dashboard']}"


def _env() -> dict:
    # Not the test session's Ray settings: its `ray.init` exports RAY_AUTH_MODE=token, RAY_API_SERVER_ADDRESS
    # and more into this process, and a head started with them turns token auth on whatever we ask.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    # `python` in the job's entrypoint is the cluster's: this virtualenv's, as on an installed node.
    env.update(RAY_AUTH_MODE="disabled", RAY_ADDRESS=_dashboard(),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local head node on its own ports, in its own process group, killed at the end.

    Not `ray stop`: that stops every Ray on the machine, the test session's own included.
    """
    temp = tmp_path_factory.mktemp("raytmp")
    # Every port of this cluster is its own: the test session's Ray (and any other) uses the defaults,
    # and a clash leaves the job agent down ("No available agent to submit job").
    PORTS.update({name: free_port() for name in ("gcs", "dashboard", "client", "agent", "grpc", "metrics",
                                                  "runtime_env")})
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={PORTS['gcs']}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={PORTS['dashboard']}",
                             f"--ray-client-server-port={PORTS['client']}",
                             f"--dashboard-agent-listen-port={PORTS['agent']}",
                             f"--dashboard-agent-grpc-port={PORTS['grpc']}",
                             f"--metrics-export-port={PORTS['metrics']}",
                             f"--runtime-env-agent-port={PORTS['runtime_env']}",
                             "--min-worker-port=21000", "--max-worker-port=21999", f"--temp-dir={temp}",
                             "--disable-usage-stats"],
                            env={k: v for k, v in _env().items() if k != "RAY_ADDRESS"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # The job server comes up a few seconds after the head: wait until it takes requests.
        deadline = time.time() + 300
        while subprocess.run([RAY, "job", "list", "--address", _dashboard()], env=_env(), capture_output=True,
                             timeout=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited\n" + _head_logs(temp)
            assert time.time() < deadline, "the Ray job server did not come up\n" + _head_logs(temp)
            time.sleep(2)
        yield _dashboard()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # Whatever of this cluster outlived its group (workers start their own sessions) names its
        # temp dir on the command line; nothing else does.
        subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)


def _head_logs(temp: Path) -> str:
    """The tails of the head's dashboard and agent logs: why a job server is not up."""
    out = []
    for name in ("dashboard.log", "dashboard_agent.log", "dashboard_agent.err", "gcs_server.err", "raylet.err"):
        for f in sorted(temp.glob(f"session_*/logs/{name}"))[-1:]:
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out) or f"no logs under {temp}"


def _submit(args: list[str], *, wait: bool = True, timeout: int = 900) -> subprocess.CompletedProcess | str:
    cmd = [RAY, "job", "submit", "--address", _dashboard(), "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", "data", ".git", ".hypothesis"]})]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", "jobs/train.py", *args]
    for _ in range(30):  # the head's job agent may still be starting: Ray says so, and we retry
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    if wait:
        return proc
    for line in proc.stdout.splitlines():
        if "submitted successfully" in line:
            return line.split("'")[1]
    raise AssertionError(proc.stdout + proc.stderr)


def _smoke_args(storage: Path) -> list[str]:
    return ["--config", "configs/smoke.yaml", f"storage={storage}", f"data.data_dir={REPO / 'data'}"]


def _sft_losses(run: Path) -> list[float]:
    manifest = json.loads(next(run.glob("sft-*/manifest.json")).read_text())
    return [h["loss"] for h in manifest["history"]]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_job_resumes_without_redoing_finished_stages_and_succeeds(text_run, cluster, tmp_path):
    """`ray job submit` of jobs/train.py through SFT, stopped while SFT runs: no partial stage
    folder is ever visible; the resubmitted job skips the finished stages, finishes SFT and
    succeeds, and the run folder holds every stage's output. The samples, oracle and model are the
    session's text run's (the same config: its run folder copied), so the first job goes straight
    to SFT. (One job pair, not an extra unbroken job: each costs ~1 min here, and SFT's exact
    resume is tests/train's.)"""
    args = _smoke_args(tmp_path) + ["--until", "sft"]
    run = tmp_path / "smoke"
    copy_stages(text_run, run, "samples", "oracle", "model")
    job = _submit(args, wait=False)
    deadline = time.time() + 600
    while not list(run.glob(".work/sft-*")):  # the SFT stage's Ray Train run has started
        assert time.time() < deadline, "the SFT stage did not start in time"
        time.sleep(0.5)
    time.sleep(4)  # its workers starting or training: stopped before the stage can finish
    subprocess.run([RAY, "job", "stop", "--address", _dashboard(), job], env=_env(), capture_output=True, timeout=120)
    assert not list(run.glob("sft-*")), "a partial SFT output is visible"
    proc = _submit(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    for stage in ("samples", "oracle", "model"):
        assert f"{stage}: done earlier, skipped" in proc.stdout
    assert "sft: running" in proc.stdout
    assert list(run.glob("sft-*/manifest.json")) and not list(run.glob(".tmp-*"))
    manifest = json.loads((next(run.glob("samples-*")) / "manifest.json").read_text())
    # 100,000 ratings, less the 307 a user gave both listings of a film listed twice (merged)
    assert manifest["users"] == 943 and manifest["interactions"] == 99693
    assert (next(run.glob("model-*")) / "hf" / "model.safetensors").is_file()
    losses = _sft_losses(run)
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)  # configs/smoke.yaml: sft.max_steps 4
    assert f"run folder: {run}" in proc.stdout
