"""A rebuild (``--force``) that fails or is killed keeps the finished output: a data stage refused
on its input, a data stage and a training stage killed mid-way. The old folder stays whole until
the new one replaces it; what a killed writer leaves behind is removed by the next rebuild."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rosepo.storage import read_manifest
from tests.conftest import COMMAND_ENV, REPO, SMOKE_ARGS, rosepo_command


def _csv_input(folder: Path, users: int = 40, events: int = 12) -> Path:
    """A small interaction log and catalog (CSV) and a config reading them; returns the config."""
    folder.mkdir(parents=True, exist_ok=True)
    items = 60
    (folder / "items.csv").write_text("item_id,title\n" + "".join(f"{i},Film number {i}\n" for i in range(items)))
    rows = [f"u{u},{(7 * u + 3 * k) % items},{1_700_000_000 + 60 * k}" for u in range(users) for k in range(events)]
    (folder / "events.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    config = folder / "config.yaml"
    config.write_text(f"name: rebuild\nstorage: {folder / 'runs'}\n"
                      f"data: {{format: csv, interactions: {folder / 'events.csv'}, catalog: {folder / 'items.csv'}, "
                      "num_candidates: 10}\n")
    return config


def _samples_folder(config: Path) -> Path:
    return next((config.parent / "runs" / "rebuild").glob("samples-*"))


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(rosepo_command(*args), cwd=REPO, env=COMMAND_ENV, capture_output=True, text=True,
                          timeout=timeout)


def _kill_when(args: list[str], ready, timeout: float = 240) -> None:
    """Start ``rosepo ARGS`` in its own process group; SIGKILL the group (its local Ray too) as soon
    as ``ready()`` is true."""
    proc = subprocess.Popen(rosepo_command(*args), cwd=REPO, env=COMMAND_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"rosepo {' '.join(args)} ended (exit {proc.returncode}) before the kill"
            assert time.time() < deadline, "the rebuild never reached the point to kill it at"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_refused_or_killed_data_rebuild_keeps_the_samples(tmp_path):
    config = _csv_input(tmp_path / "in")
    assert _run("data", "build", "--config", str(config)).returncode == 0
    samples = _samples_folder(config)
    before = read_manifest(samples)
    files = sorted(p.relative_to(samples) for p in samples.rglob("*"))

    # The input goes bad; --force refuses it, naming the row, and the finished samples stay.
    events = tmp_path / "in" / "events.csv"
    good = events.read_text()
    events.write_text(good + "u1,not-an-item,123\n")
    refused = _run("data", "build", "--config", str(config), "--force")
    assert refused.returncode == 2 and "rosepo: error:" in refused.stderr and "row" in refused.stderr
    assert read_manifest(samples) == before and sorted(p.relative_to(samples) for p in samples.rglob("*")) == files

    # Killed once it writes its temporary folder: the samples stay, and a rerun finds them finished.
    events.write_text(good)
    _kill_when(["data", "build", "--config", str(config), "--force"],
               lambda: any(samples.parent.glob(".tmp-samples-*")))
    assert read_manifest(samples) == before
    again = _run("data", "build", "--config", str(config))
    assert again.returncode == 0 and "done earlier" in again.stderr and read_manifest(samples) == before
    # The next rebuild removes what the killed one left, and replaces the samples whole.
    assert _run("data", "build", "--config", str(config), "--force").returncode == 0
    assert not list(samples.parent.glob(".tmp-*"))
    assert read_manifest(samples)["content_hash"] == before["content_hash"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_training_rebuild_keeps_the_model(smoke_run, tmp_path):
    """``rosepo sft --force`` on a copy of the smoke run, killed once its new Ray Train run has
    started: the finished SFT model and its manifest are untouched, and ``rosepo run`` then finds
    every stage finished."""
    storage = tmp_path / "runs"
    run = storage / "smoke"
    shutil.copytree(smoke_run[2], run)
    sft = next(run.glob("sft-*"))
    before = read_manifest(sft)
    weights = {p.name: p.read_bytes() for p in (sft / "model").iterdir() if p.is_file()}
    work = run / ".work" / sft.name
    _kill_when(["sft", "--force", *SMOKE_ARGS, f"storage={storage}"], lambda: (work / "sft").is_dir())
    assert read_manifest(sft) == before
    assert {p.name: p.read_bytes() for p in (sft / "model").iterdir() if p.is_file()} == weights
    rerun = _run("run", *SMOKE_ARGS, f"storage={storage}", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("done earlier") == 7
