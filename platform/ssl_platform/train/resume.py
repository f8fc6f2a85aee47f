"""Where a resumed run continues in its data, and what the resume cost (issue 18).

A checkpoint of an ordered corpus (``data.ordered``) records the epoch, the steps taken in it and
the data fingerprint (``TrainState.data``). :func:`place_in_epoch` continues there when the
fingerprint is this run's, and otherwise refuses in one line (:func:`inexact_resume`) or, with
``train.resume=steps_only``, starts a fresh epoch. :func:`resume_cost` and :func:`resume_line`
say where the run continued and how many logged steps it trains again, for the run's output and
its summary.
"""

from __future__ import annotations

from pathlib import Path

from ssl_platform.data.ordered import fingerprint_change
from ssl_platform.train.checkpoint import TrainState
from ssl_platform.train.metrics import read_metrics


def place_in_epoch(state: TrainState, fingerprint: dict, resuming: bool, cfg) -> None:
    """Where an ordered corpus's stream starts: at ``state``'s position in its epoch when the
    checkpoint's data fingerprint is this run's; else (data, seed or batch size changed) refuse
    with one line, or with ``train.resume=steps_only`` start a fresh epoch at the checkpoint's step."""
    change = fingerprint_change(state.data, fingerprint) if resuming else None
    if change and cfg.train.resume == "exact":
        raise ValueError(inexact_resume(cfg.name, state.step, change))
    if change:
        state.epoch, state.epoch_step = state.epoch + 1, 0
    state.data = fingerprint


def inexact_resume(run: str, step: int | None, change: str) -> str:
    """The one line that refuses a resume whose data position no longer holds (``step`` None: unknown)."""
    at = f"step {step}" if step is not None else "its newest checkpoint"
    return (f"cannot resume run {run} exactly from {at}: {change}; restore those settings, or pass "
            f"train.resume=steps_only to go on from {'that step' if step is None else at} with a fresh epoch")


def resume_cost(state: TrainState, batch_size: int, run_dir: str) -> dict[str, int]:
    """Where a resume continues (step, epoch, first record of the epoch it reads) and the steps
    the interrupted attempt had logged past the checkpoint, which are trained again."""
    path = Path(run_dir) / "metrics.jsonl"
    logged = max((r.get("step", 0) for r in read_metrics(path)), default=0) if path.exists() else 0
    return {"resumed_step": state.step, "resumed_epoch": state.epoch,
            "resumed_record": state.epoch_step * batch_size,
            "repeated_steps": max(0, logged - state.step)}


def resume_line(resumed: dict[str, int]) -> str:
    """"resumed from step 137, epoch 3 record 5,120: 0 steps repeated" (the run's output and summary)."""
    n = resumed["repeated_steps"]
    return (f"resumed from step {resumed['resumed_step']}, epoch {resumed['resumed_epoch']} "
            f"record {resumed['resumed_record']:,}: {n} step{'s' * (n != 1)} repeated")
