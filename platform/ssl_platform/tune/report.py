"""What a finished sweep leaves in its directory: the trial table, the best config, the plots.

- ``trials.md`` / ``trials.csv``: one row per trial, sorted by the metric (the trials that ran
  to ``train.max_steps`` first, then those ASHA stopped early, then failed ones), with the
  swept values, the last reported metric, the step it was reported at and the status.
- ``best.yaml``: the best complete trial's config as a preset that ``sslp run best.yaml``
  accepts as is: a fresh run name (``SWEEP-best``) in the sweep's ``runs_dir`` and the base
  preset's own ``eval`` settings (the trials' online-evaluation cadence and disabled final
  evaluation were for the sweep).
- ``metric_vs_<key>.png``: the metric against each swept value (log axis for log-uniform keys,
  hollow markers for trials stopped early), and ``curves.png``: the metric against the step
  for every trial, where ASHA's stops are visible.

Figures use matplotlib's object-oriented API (``Figure`` + ``savefig``), as evaluate/report.py.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from ssl_platform.config import from_dict, load_config
from ssl_platform.tune.spec import SweepSpec, trial_raw

COMPLETE, STOPPED, FAILED = "complete", "stopped early", "failed"


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]  # swept key -> value
    metric: float | None  # last reported value
    step: int | None  # the step of the last report
    status: str  # COMPLETE, STOPPED or FAILED
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) of every report


def trial_rows(results, spec: SweepSpec) -> list[TrialRow]:
    """Rows of a Tune ResultGrid, sorted best first (see the module docstring)."""
    rows = []
    for result in results:
        values = {p.key: (result.config or {}).get(p.key) for p in spec.space}
        metrics = result.metrics or {}
        max_steps = int(values.get("train.max_steps") or spec.base.train.max_steps)
        step = metrics.get("step")
        metric = metrics.get(spec.metric)
        error = ""
        if result.error is not None:
            error = (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1]
        status = trial_status(step, max_steps, failed=result.error is not None)
        curve = []
        frame = result.metrics_dataframe
        if frame is not None and spec.metric in frame and "step" in frame:
            curve = [(int(s), float(m)) for s, m in zip(frame["step"], frame[spec.metric], strict=True)
                     if not math.isnan(m)]
        rows.append(TrialRow(Path(result.path).name, values, None if metric is None else float(metric),
                             None if step is None else int(step), status, error, curve))
    return sort_rows(rows, spec.mode)


def trial_status(step: int | None, max_steps: int, failed: bool) -> str:
    """A trial that ended: FAILED, COMPLETE (it reached ``max_steps``) or STOPPED (ASHA stopped it before)."""
    if failed:
        return FAILED
    return COMPLETE if step is not None and step >= max_steps else STOPPED


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    order = {COMPLETE: 0, STOPPED: 1, FAILED: 2}
    sign = -1.0 if mode == "max" else 1.0

    def key(row: TrialRow):
        missing = row.metric is None or math.isnan(row.metric)
        return order[row.status], missing, 0.0 if missing else sign * row.metric

    return sorted(rows, key=key)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The first complete trial with a metric (rows are sorted); None when no trial completed."""
    return next((r for r in rows if r.status == COMPLETE and r.metric is not None), None)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[TrialRow], spec: SweepSpec) -> str:
    keys = [p.key for p in spec.space]
    header = ["rank", "trial", f"{spec.metric} ({spec.mode})", "step", *keys, "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows, 1):
        status = row.status if row.status != FAILED else f"failed: {row.error[:80]}"
        if row.status == STOPPED:
            status = f"stopped early (ASHA, step {fmt(row.step)})"
        cells = [str(i), row.trial, fmt(row.metric), fmt(row.step), *(fmt(row.values[k]) for k in keys), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[TrialRow], spec: SweepSpec) -> None:
    keys = [p.key for p in spec.space]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", spec.metric, "step", *keys, "status", "error"])
        for i, row in enumerate(rows, 1):
            w.writerow([i, row.trial, row.metric, row.step, *(row.values[k] for k in keys), row.status, row.error])


def write_best_config(path: Path, row: TrialRow, spec: SweepSpec) -> Path:
    """``best.yaml``: the trial's config with a fresh name and the base preset's eval settings."""
    preset_eval = load_config(spec.preset).to_dict()["eval"]
    raw = trial_raw(spec.base, row.values, name=f"{spec.name}-best", runs_dir=str(path.parent.parent))
    raw["eval"] = preset_eval
    cfg = from_dict(raw)  # the file must load as it is
    chosen = ", ".join(f"{k}={fmt(v)}" for k, v in row.values.items())
    header = (f"# Best trial {row.trial} of sweep {spec.name}: {spec.metric}={fmt(row.metric)} ({spec.mode}) "
              f"at step {row.step}; {chosen}.\n"
              f"# Base preset {spec.preset} with the sweep's fixed overrides; eval settings are the preset's.\n"
              f"# It trains at lr {cfg.train.effective_lr()[1]}.\n"
              f"#   sslp run {path}\n")
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def plot_params(sweep_dir: Path, rows: list[TrialRow], spec: SweepSpec) -> list[Path]:
    """One PNG per swept key: the metric against the key's value; plus curves.png."""
    paths = []
    scored = [r for r in rows if r.metric is not None and r.status != FAILED]
    best = best_row(rows)
    for p in spec.space:
        fig = Figure(figsize=(5.2, 3.8), dpi=110, layout="constrained")
        ax = fig.subplots()
        numeric = all(isinstance(r.values[p.key], (int, float)) and not isinstance(r.values[p.key], bool)
                      for r in scored)
        labels = sorted({str(r.values[p.key]) for r in scored}, key=lambda s: (len(s), s))

        def x_of(row: TrialRow, key: str = p.key, numeric: bool = numeric, labels: list[str] = labels):
            return row.values[key] if numeric else labels.index(str(row.values[key]))

        for status, filled in ((COMPLETE, True), (STOPPED, False)):
            group = [r for r in scored if r.status == status]
            if group:
                ax.scatter([x_of(r) for r in group], [r.metric for r in group], s=36, label=status,
                           facecolors="C0" if filled else "none", edgecolors="C0")
        if best is not None:
            ax.scatter([x_of(best)], [best.metric], s=140, marker="*", color="C3", label=f"best ({best.trial})",
                       zorder=3)
        if p.log_scale:
            ax.set_xscale("log")
        elif numeric:
            ax.locator_params(axis="x", nbins=5)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"{spec.metric} (last report)")
        ax.set_title(f"{spec.name}: {spec.metric} vs {p.key}", fontsize=10)
        if scored:
            ax.legend(fontsize=8)
        path = sweep_dir / f"metric_vs_{p.key}.png"
        fig.savefig(path, format="png")
        paths.append(path)

    fig = Figure(figsize=(6.0, 4.0), dpi=110, layout="constrained")
    ax = fig.subplots()
    for row in rows:
        if row.curve:
            steps, values = zip(*row.curve, strict=True)
            ax.plot(steps, values, marker=".", linestyle="-" if row.status == COMPLETE else "--", label=row.trial)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.name}: {spec.metric} per trial (dashed: stopped early)", fontsize=10)
    if any(r.curve for r in rows) and len(rows) <= 12:
        ax.legend(fontsize=7)
    path = sweep_dir / "curves.png"
    fig.savefig(path, format="png")
    paths.append(path)
    return paths


def write_report(sweep_dir: Path, rows: list[TrialRow], spec: SweepSpec) -> dict[str, Path]:
    """Write trials.md, trials.csv, best.yaml (when a trial completed) and the plots."""
    out = {"trials.md": sweep_dir / "trials.md", "trials.csv": sweep_dir / "trials.csv"}
    table = markdown_table(rows, spec)
    best = best_row(rows)
    note = (f"\n\nBest: trial {best.trial}, {spec.metric}={fmt(best.metric)}; config in best.yaml "
            f"(`sslp run {sweep_dir / 'best.yaml'}`).\n" if best else "\n\nNo trial ran to train.max_steps.\n")
    out["trials.md"].write_text(f"# Sweep {spec.name}\n\n{table}{note}")
    write_csv(out["trials.csv"], rows, spec)
    if best is not None:
        out["best.yaml"] = write_best_config(sweep_dir / "best.yaml", best, spec)
    for path in plot_params(sweep_dir, rows, spec):
        out[path.name] = path
    return out
