"""The quiet console's filters (`rosepo.runtime`): on Ray Data's own console handler, and on the
worker lines Ray forwards to the driver; and a rosepo error raised in a Ray Data task as the CLI
shows it."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _record(name: str, level: int = logging.WARNING, msg: str = "message", exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, exc_info)


def test_quiet_ray_data_drops_the_issue_detectors_reports_and_keeps_other_warnings():
    """Ray Data's issue detectors repeat a high-memory report every 30 s while a pretrained LLM's
    evaluation runs, and it warns of no available CPU when one dataset starts right after another
    (its resource view lags); the quiet console drops those and no other of its warnings."""
    pytest.importorskip("ray.data")
    from rosepo import runtime

    runtime._quiet_ray_data()
    runtime._quiet_ray_data()  # idempotent: a worker and the driver may both call it
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    assert handlers, "Ray Data no longer configures a console handler: revisit _quiet_ray_data"
    report = _record("ray.data._internal.issue_detection.issue_detector_manager")
    no_cpu = _record("ray.data.dataset", msg="Warning: The Ray cluster currently does not have any available CPUs. "
                                             "The Dataset job will hang unless more CPUs are freed up.")
    other = _record("ray.data._internal.execution.streaming_executor")
    for h in handlers:
        assert h.filters.count(runtime._shown) == 1
        assert not h.filter(report) and not h.filter(no_cpu)
        assert h.filter(other)
        assert h.level == logging.WARNING


def test_quiet_ray_data_drops_its_notices_of_a_user_code_error_not_an_internal_one():
    """A task's user-code error: Ray Data's two ERROR lines before it (one promising a stack trace
    that goes to its log file only) are dropped; the same notice with a traceback (an error of Ray's
    own, or one of ``max_errored_blocks`` ignored) stays."""
    from rosepo import runtime

    name = "ray.data._internal.execution.streaming_executor_state"
    task = 'An exception was raised from a task of operator "MapBatches(f)". Dataset execution will now abort.'
    user = "Exception occurred in user code, with the abbreviated stack trace below."
    assert not runtime._shown(_record(name, logging.ERROR, task))
    assert not runtime._shown(_record("ray.data.exceptions", logging.ERROR, user))
    try:
        raise RuntimeError("internal")
    except RuntimeError:
        assert runtime._shown(_record(name, logging.ERROR, task, sys.exc_info()))


def test_quiet_console_skips_the_preemption_watcher_notice_of_every_training_stage():
    """Ray's core worker reports at ERROR level, once per training stage, that Ray Train's
    ``PreemptionWatcher`` actor has constructor arguments in the object store and max_restarts > 0;
    the quiet console's skip pattern (Ray's own ``RAY_DEDUP_LOGS_SKIP_REGEX``) drops that line as
    Ray's log forwarding reads it, and no other core-worker error."""
    from ray._private.ray_logging import LogDeduplicator

    from rosepo import runtime

    notice = ("[2026-12-04 23:10:36,694 E 10900 10953] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: 'fe268ee580d09fdf1023b32501000000' has constructor arguments in the "
              "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
              "lost, the actor restart will fail.")
    other = "[2026-12-04 23:10:36,694 E 10900 10953] core_worker.cc:1234: Failed to connect to the raylet."
    dedup = LogDeduplicator(5, None, runtime.SKIP_WORKER_LINES)
    out = dedup.deduplicate({"ip": "127.0.0.1", "pid": 10900, "lines": [notice, other]})
    assert [line for batch in out for line in batch["lines"]] == [other]


@pytest.mark.timeout(300)
def test_rosepo_error_in_a_ray_data_task_is_the_one_console_line(tmp_path):
    """A CSV row with a bad timestamp is refused in a Ray Data read task: ``rosepo data build``
    says so in one ``rosepo: error:`` line naming the file, row and column (exit 2), with none of
    Ray Data's ERROR lines before it (one advising ``max_errored_blocks``, one promising a stack
    trace that never follows) and no traceback."""
    inter, items = tmp_path / "inter.csv", tmp_path / "items.csv"
    rows = [f"{u},{(u * 7 + t) % 20},{'soon' if (u, t) == (3, 4) else t}" for u in range(8) for t in range(8)]
    inter.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    items.write_text("item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(20)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own local Ray
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "rosepo.cli", "data", "build", f"storage={tmp_path / 'runs'}", "data.format=csv",
         f"data.interactions={inter}", f"data.catalog={items}", "data.max_history=5", "data.num_candidates=5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 2, proc.stderr
    assert re.search(rf"^rosepo: error: file {re.escape(str(inter))}, row 29, column 'timestamp': .*'soon'"
                     r" \(an integer is optionally signed decimal digits\)$",
                     proc.stderr, re.M), proc.stderr
    assert not re.search(r"\bERROR\b|Traceback|max_errored_blocks", proc.stderr), proc.stderr
