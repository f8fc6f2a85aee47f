"""ASHA that stops a trial by letting its training run shut down, not by killing it.

When a Tune scheduler answers STOP, Tune ends the trial's actor at once. With Train V2 that
actor owns the Train controller, which dies with it before it can release the workers'
placement group (Ray's detached PlacementGroupCleaner would remove it, but it asks the state
API, which a cluster started without the dashboard does not serve): the next trial then waits
for CPUs that never come back. So the decision travels the other way:

1. :class:`GracefulASHA` (the Tune driver) makes ASHA's decision for every result of a trial
   and writes it to ``asha.json`` in the trial's run directory; it answers CONTINUE to Tune.
2. :class:`ReportAndObey` (the Train controller of the trial, next to ``TuneReportCallback``)
   forwards each report to Tune, waits for the decision on that step, and on "stop" aborts its
   own run the way Ctrl-C does (``TrainController.abort``: workers stopped, placement group
   removed). The trial function then returns and Tune records the trial as terminated at that
   step.

Rungs lie strictly before ``train.max_steps`` (``max_t = max_steps - 1``,
``stop_last_trials=False``): a trial that reaches its last step always finishes on its own,
writing its summary, so a re-run of the sweep never trains it again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

DECISION_FILE = "asha.json"
DECISION_TIMEOUT_S = 60.0  # a driver that does not answer in time lets the trial go on


def decision_path(trials_dir: str | Path, trial_id: str) -> Path:
    return Path(trials_dir) / trial_id / DECISION_FILE


class GracefulASHA(AsyncHyperBandScheduler):
    """ASHA on ``time_attr``; STOP decisions are written for the trial to act on (see module).

    ``Tuner.restore`` brings back the scheduler as it was pickled when the sweep started, with
    empty rungs; so the rungs (each trial's metric at each milestone) are also written to
    ``STATE_FILE`` beside the trials and read back when the scheduler is unpickled, and a
    resumed sweep judges new trials against the trials that ran before the interruption.
    """

    STATE_FILE = "asha_state.json"

    def __init__(self, trials_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.trials_dir = trials_dir
        self._stopped: dict[str, int] = {}  # trial id -> the step ASHA stopped it at

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        saved = read_decision(Path(self.trials_dir).parent / self.STATE_FILE)
        if not saved:
            return
        for bracket, rungs in zip(self._brackets, saved["rungs"], strict=False):
            recorded = {float(milestone): values for milestone, values in rungs}
            bracket._rungs = [(milestone, dict(recorded.get(float(milestone), {}))) for milestone, _ in bracket._rungs]
        self._stopped = dict(saved["stopped"])

    def _save_state(self) -> None:
        path = Path(self.trials_dir).parent / self.STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"rungs": [[[m, recorded] for m, recorded in b._rungs] for b in self._brackets],
                 "stopped": self._stopped}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopped:
            action = TrialScheduler.STOP
        else:
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self._stopped[trial.trial_id] = int(result.get(self._time_attr, -1))
        if self._time_attr in result:
            path = decision_path(self.trials_dir, trial.trial_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": result[self._time_attr], "stop": action == TrialScheduler.STOP,
                                       "stopped_at": self._stopped.get(trial.trial_id)}))
            tmp.replace(path)  # atomic: the trial never reads half a decision
            self._save_state()
        return TrialScheduler.CONTINUE

    def stopped(self) -> dict[str, int]:
        return dict(self._stopped)


def read_decision(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class ReportAndObey(TuneReportCallback):
    """``TuneReportCallback`` that also carries out the driver's ASHA decision on each report."""

    def __init__(self, decision_file: str, step_key: str = "step", poll_s: float = 0.2):
        super().__init__()
        self.decision_file = decision_file
        self.step_key = step_key
        self.poll_s = poll_s

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, metrics, checkpoint)
        step = (metrics[0] if metrics else {}).get(self.step_key)
        if step is None:
            return
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        decision = read_decision(Path(self.decision_file))
        while (decision is None or decision["step"] < step) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
            decision = read_decision(Path(self.decision_file))
        if decision and decision["stop"]:
            import ray

            print(f"ASHA stops this trial at step {step}; shutting its workers down", flush=True)
            # This runs inside the Train controller; abort() is what Ctrl-C calls: the workers
            # stop and their placement group is removed before the controller exits.
            ray.get_runtime_context().current_actor.abort.remote()
