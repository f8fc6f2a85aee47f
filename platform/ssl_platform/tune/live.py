"""What ``sslp sweep`` shows while Tune runs: one table of the trials (swept values, step, metric,
status), updated in place on a terminal; in a pipe, CI or a Ray job log, a plain line per trial
start, result and finish. It replaces Tune's periodic status dumps (``RunConfig(verbose=0)``).

:class:`TrialTable` is a Tune callback on the driver; it writes through the command's console
(``train.console``), which keeps everything Ray and the trials print in the sweep's ray.log.
``Tuner.restore`` brings the callback back from the pickled run config, so it holds plain data
only and finds the console when called.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ssl_platform.train import console
from ssl_platform.tune.report import FAILED, fmt, trial_status
from ssl_platform.tune.spec import SweepSpec

RUNNING = "running"
STATUS_OF = {"PENDING": "pending", "RUNNING": RUNNING, "PAUSED": "paused"}  # Tune's before a trial ends


class TrialTable(tune.Callback):
    """The sweep's live trial table (see module). Tune calls it on the driver."""

    def __init__(self, spec: SweepSpec):
        self.keys = [p.key for p in spec.space]
        self.metric, self.mode = spec.metric, spec.mode
        self.max_steps = spec.max_steps
        # Trial id -> its last reported step and metric (not every result has the metric; Tune
        # calls on_trial_result before the trial's last_result holds the result).
        self._step_of: dict[str, int] = {}
        self._metric: dict[str, float] = {}
        self._ended: dict[str, str] = {}  # trial id -> its status once it ended in this invocation

    # -- Tune's hooks --------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.pop(trial.trial_id, None)
        self._changed(trials, trial, "started")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if self.metric in result:
            self._metric[trial.trial_id] = float(result[self.metric])
        if "step" in result:
            self._step_of[trial.trial_id] = int(result["step"])
            self._changed(trials, trial, self._progress(trial, result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        step = self._step(trial)
        status = trial_status(step, self._max_steps(trial), failed=False)
        self._ended[trial.trial_id] = status
        self._changed(trials, trial, f"{status} at step {fmt(step)}{self._metric_text(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = FAILED
        self._changed(trials, trial, f"{FAILED} at step {fmt(self._step(trial))}: {error_line(trial)}")

    # -- the display ---------------------------------------------------------------------------
    def _changed(self, trials: list, trial, what: str) -> None:
        shown = console.active()
        line = f"trial {trial.trial_id} ({self._values(trial)}): {what}"
        if shown is None:  # run_sweep on a caller's Ray connection: plain lines, as in a pipe
            print(line, flush=True)
        elif shown.live:
            shown.table(self.lines(trials))
        else:
            shown.show(line)

    def lines(self, trials: list) -> list[str]:
        """The table: a header, then one row per trial in Tune's order, columns padded to align."""
        header = ["trial", *self.keys, "step", f"{self.metric} ({self.mode})", "status"]
        rows = [header]
        for trial in trials:
            config = trial.config or {}
            rows.append([trial.trial_id, *(fmt(config.get(k)) for k in self.keys), fmt(self._step(trial)),
                         fmt(self._metric.get(trial.trial_id, (trial.last_result or {}).get(self.metric))),
                         self._status(trial)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]

    def _status(self, trial) -> str:
        if trial.trial_id in self._ended:
            return self._ended[trial.trial_id]
        if trial.status == "TERMINATED":  # ended before a resume: judged by its last step, as trials.md
            return trial_status(self._step(trial), self._max_steps(trial), failed=False)
        if trial.status == "ERROR":
            return FAILED
        return STATUS_OF.get(trial.status, trial.status.lower())

    def _progress(self, trial, result: dict) -> str:
        return f"step {fmt(result.get('step'))}/{self._max_steps(trial)}{self._metric_text(trial)}"

    def _metric_text(self, trial) -> str:
        value = self._metric.get(trial.trial_id)
        return "" if value is None else f" | {self.metric} {fmt(value)}"

    def _values(self, trial) -> str:
        config = trial.config or {}
        return ", ".join(f"{k}={fmt(config.get(k))}" for k in self.keys)

    def _step(self, trial) -> Any:
        return self._step_of.get(trial.trial_id, (trial.last_result or {}).get("step"))

    def _max_steps(self, trial) -> int:
        return int((trial.config or {}).get("train.max_steps") or self.max_steps)


def error_line(trial) -> str:
    """The last line of a failed trial's error (Tune keeps the whole of it in the trial's error file)."""
    try:
        error = trial.get_error()
    except Exception:  # a missing or unreadable error file: the status says enough
        error = None
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1] if lines else "see ray.log"
