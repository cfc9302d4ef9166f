"""What `rosepo run` ends with: the summary, and its warning when the result is no recommender."""

from __future__ import annotations

from rosepo.config import RunConfig
from rosepo.experiments.summary import SUMMARY_FILE, health_warnings, write_summary
from rosepo.pipeline import run_folder
from rosepo.storage import write_manifest

#: The eval table of the run measured on a 2,467-sample data set with the MovieLens-sized budget:
#: the SFT model named a candidate 2% of the time.
FAILED = {"most_popular": {"eval/hr@1": 0.258, "eval/valid_ratio": 1.0, "eval/rank/hr@1": 0.246},
          "sasrec": {"eval/hr@1": 0.210, "eval/valid_ratio": 1.0, "eval/rank/hr@1": 0.210},
          "sft": {"eval/hr@1": 0.017, "eval/valid_ratio": 0.021, "eval/rank/hr@1": 0.263},
          "aligned (rosepo)": {"eval/hr@1": 0.017, "eval/valid_ratio": 0.020, "eval/rank/hr@1": 0.261}}


def test_a_run_that_is_no_recommender_says_so_in_the_console_and_the_summary(tmp_path):
    """The summary, which `rosepo run` prints last and writes to summary.md, ends with the warning."""
    cfg = RunConfig(storage=str(tmp_path)).validate()
    folder = run_folder(cfg)
    outs = {"sft": folder / "sft-x", "eval": folder / "eval-x"}
    write_manifest(outs["sft"], {"history": [{"step": s, "loss": 1.0} for s in range(1, 78)]})
    write_manifest(outs["eval"], {"split": "test", "results": FAILED})
    text = write_summary(cfg, outs)
    expected = ("WARNING: the SFT model names exactly one candidate in 2% of its answers: it is not a working "
                "recommender. Likely cause: too few training steps for this data (SFT trained 77 steps of 16 "
                "samples); raise sft.max_steps")
    assert expected in text and expected in (folder / SUMMARY_FILE).read_text()


def test_health_warnings_name_each_failure_and_stay_quiet_on_a_working_model():
    cfg = RunConfig().validate()
    working = {"most_popular": {"eval/rank/hr@1": 0.17}, "sft": {"eval/valid_ratio": 0.96, "eval/rank/hr@1": 0.40}}
    assert health_warnings(working, cfg, 1500) == []
    below = {"most_popular": {"eval/rank/hr@1": 0.25}, "sft": {"eval/valid_ratio": 0.93, "eval/rank/hr@1": 0.20}}
    (warning,) = health_warnings(below, cfg, 100)
    assert "ranks the candidates below most-popular (rank HR@1 0.200 against 0.250)" in warning
    assert len(health_warnings(FAILED, cfg, 77)) == 1  # its rank HR@1 (0.263) is above most-popular's
    assert "raise sft.max_steps (the default recipe trains 1,500)" in warning


def test_health_warnings_name_the_epoch_cap_when_it_stopped_sft():
    """When sft.max_epochs stopped SFT before sft.max_steps, the warning names that key."""
    cfg = RunConfig().validate()
    cfg.sft.max_steps, cfg.sft.max_epochs = 1500, 2.0
    (warning,) = health_warnings(FAILED, cfg, 77)
    assert warning.endswith("raise sft.max_epochs (the cap of 2 passes over the training rows stopped SFT before "
                            "sft.max_steps)")
    (warning,) = health_warnings(FAILED, cfg, 1500)
    assert warning.endswith("raise sft.max_steps (the default recipe trains 1,500)")
