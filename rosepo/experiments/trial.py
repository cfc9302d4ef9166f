"""One trial of ``rosepo tune``, run in a Tune actor: align with the trial's values and report
every evaluation to Tune."""

from __future__ import annotations

import os
from pathlib import Path

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from rosepo.config import AlignConfig, RunConfig, apply_values
from rosepo.train.align import fit_align
from rosepo.train.schedule import finished_state

#: Per-trial resource of the trial function itself (it only waits on its TorchTrainer, whose
#: workers ask for the CPUs). ``{"CPU": 0}`` is refused by Tune, hence a small memory request.
TRIAL_RESOURCES = {"memory": 64 * 1024 ** 2}
#: Fault injection (tests): when this variable names a file that does not exist in the
#: driver's environment, the first trial to start creates it and raises once.
FAULT_ENV = "ROSEPO_TUNE_FAULT"
#: A trial's start count, in its folder (restarts = starts - 1).
STARTS = "starts"


class EvalReportCallback(TuneReportCallback):
    """A Train V2 callback forwarding to Tune only the reports that carry the metric (the
    evaluation steps): Tune's strict metric check refuses results without it, and one Tune
    iteration per evaluation is what ASHA's rungs should count."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def tune_trial(config: dict, *, base: RunConfig, inputs: dict, metric: str, experiment: str,
               fault: str | None = None) -> None:
    """One Tune trial: ``base`` with the trial's values, aligned with `fit` on the shared pairs
    (``align.strategies`` of the train pairs, all valid pairs) into
    ``<experiment>/trials/<trial id>/align`` (checkpoints, TensorBoard; a restarted trial
    resumes from there), evaluations reported to Tune. A trial whose training had finished
    (the driver died before Tune recorded it) only reports its evaluations again.

    ``fault``: a file path; when it does not exist, this trial creates it and raises (`FAULT_ENV`).
    """
    cfg = apply_values(base, config)
    out_dir = Path(experiment) / "trials" / ray.tune.get_context().get_trial_id()
    if _replay_finished(out_dir / "align", cfg.align):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    starts = out_dir / STARTS
    starts.write_text(str(int(starts.read_text()) + 1 if starts.is_file() else 1))
    if fault:
        try:
            os.close(os.open(fault, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            raise RuntimeError(f"fault injected by {FAULT_ENV} ({fault})")
    fit_align(cfg, inputs["pairs"], inputs["model_path"], inputs["adapter"], str(out_dir), pad_id=inputs["pad_id"],
              callbacks=[EvalReportCallback(metric)])


def _replay_finished(ray_run_dir: Path, align: AlignConfig) -> bool:
    """When the trial's align run already finished (killed driver: Tune had not yet recorded
    the trial as done), report its evaluations to Tune again instead of retraining; True if so."""
    state = finished_state(ray_run_dir, align)
    for evaluation in (state or {}).get("eval_history", []):
        if evaluation["step"] > 0:  # fit logs step 0 but does not report it
            ray.tune.report(evaluation)
    return state is not None
