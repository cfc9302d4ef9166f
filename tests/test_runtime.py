"""The quiet console's filters on Ray Data's own console handler (`rosepo.runtime`)."""

import logging

import pytest


def _record(name: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_quiet_ray_data_drops_the_issue_detectors_reports_and_keeps_other_warnings():
    """Ray Data's issue detectors repeat a high-memory report every 30 s while a pretrained LLM's
    evaluation runs; the quiet console drops those and nothing else of Ray Data's warnings."""
    pytest.importorskip("ray.data")
    from rosepo import runtime

    runtime._quiet_ray_data()
    runtime._quiet_ray_data()  # idempotent: a worker and the driver may both call it
    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
    assert handlers, "Ray Data no longer configures a console handler: revisit _quiet_ray_data"
    report = _record("ray.data._internal.issue_detection.issue_detector_manager")
    other = _record("ray.data._internal.execution.streaming_executor")
    for h in handlers:
        assert h.filters.count(runtime._not_issue_report) == 1
        assert not h.filter(report)
        assert h.filter(other)
        assert h.level == logging.WARNING
