"""The results report of a run: results.json, results.md and report.png in the run directory.

A results row is ``{"encoder": str, "linear_probe_top1": float, "knn_top1": float}`` with
accuracies in 0..1; tables and plots show them in percent.

The figure is drawn with matplotlib's object-oriented API (``Figure`` + ``savefig``, which
renders PNG with Agg) and never touches pyplot, so it works headless, in Ray workers and in
loops without leaking pyplot's global figures or changing the caller's backend.
"""

from __future__ import annotations

import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

ROW_KEYS = ("encoder", "linear_probe_top1", "knn_top1")
COLUMNS = {"linear_probe_top1": "linear probe top-1", "knn_top1": "kNN top-1"}


def _check_rows(rows: list[dict]) -> list[dict]:
    """Rows with float accuracies, or a ValueError naming the bad row and key."""
    checked = []
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"results row {i} ({row.get('encoder', '?')!r}) lacks {missing}; "
                             f"each row needs {list(ROW_KEYS)}")
        clean = {**row, "encoder": str(row["encoder"])}
        for key in COLUMNS:
            value = float(row[key])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"results row {i} ({clean['encoder']!r}) has {key}={value}; "
                                 f"accuracies are fractions in 0..1, not percent")
            clean[key] = value
        checked.append(clean)
    return checked


def _to_json(value):
    # Extra keys a caller adds to a row may hold numpy scalars or arrays; store them as plain values.
    return value.tolist() if hasattr(value, "tolist") else str(value)


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table, accuracies in percent with one decimal.

    | encoder | linear probe top-1 | kNN top-1 |
    |---|---|---|
    | random init | 85.3 | 80.1 |
    """
    lines = ["| encoder | " + " | ".join(COLUMNS.values()) + " |", "|---" * (1 + len(COLUMNS)) + "|"]
    for row in _check_rows(rows):
        name = row["encoder"].replace("|", "\\|")  # a pipe would split the cell
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[k]:.1f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def read_loss_curve(metrics_path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) from a metrics.jsonl, sorted by step; empty arrays if there is none.

    Lines that are torn (a killed run) or lack a finite ``loss`` are skipped. A resumed run
    rewinds to its checkpoint and logs some steps twice; the later line wins.
    """
    if metrics_path is None or not Path(metrics_path).is_file():
        return np.zeros(0), np.zeros(0)
    by_step: dict[int, float] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), float(row["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if math.isfinite(loss):
            by_step[step] = loss
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points; the first points average what exists so far.

    Shape: (T,) -> (T,)
    """
    csum = np.cumsum(np.concatenate([[0.0], values]))  # (T + 1,)
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def _plot_loss(ax, steps: np.ndarray, losses: np.ndarray) -> None:
    ax.set_title("pretraining loss")
    if len(losses) == 0:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes,
                fontsize=12, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    window = max(1, min(50, len(losses) // 10))  # ~10% of the run, so the trend shows through noise
    if window > 1:
        ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="loss")
        ax.plot(steps, moving_average(losses, window), lw=2.2, color="C0", label=f"moving average ({window} points)")
    else:  # under 20 points there is nothing to smooth
        ax.plot(steps, losses, lw=2.2, color="C0", marker="o", ms=3, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def _plot_accuracies(ax, rows: list[dict]) -> None:
    ax.set_title("frozen-feature top-1 on held-out data")
    if not rows:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    x = np.arange(len(rows))
    width = 0.38
    for i, (key, label) in enumerate(COLUMNS.items()):
        values = [100 * row[key] for row in rows]
        bars = ax.bar(x + (i - 0.5) * width, values, width, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_xticks(x, [textwrap.fill(row["encoder"], 14) for row in rows], fontsize=9)
    center, half = (len(rows) - 1) / 2, max(len(rows), 3) / 2  # one or two encoders keep slim bars
    ax.set_xlim(center - half, center + half)
    ax.set_ylim(0, 112)  # room above 100 for the value labels
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, loc="upper left", ncols=2)


def plot_report(path: str | Path, rows: list[dict], metrics_path: str | Path | None = None, title: str = "") -> Path:
    """Write the two-panel report figure: loss curve (left), probe accuracies per encoder (right)."""
    rows = _check_rows(rows)
    fig = Figure(figsize=(12, 4.5), dpi=110, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2, width_ratios=(1, 1.25))
    _plot_loss(loss_ax, *read_loss_curve(metrics_path))
    _plot_accuracies(acc_ax, rows)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
    return Path(path)


def write_results(run_dir: str | Path, rows: list[dict], metrics_path: str | Path | None = None,
                  title: str = "") -> dict[str, Path]:
    """Write results.json, results.md and report.png into ``run_dir``; return their paths.

    ``metrics_path`` is the run's metrics.jsonl (rows with ``step`` and ``loss``); when it is
    missing or empty the loss panel says so instead of failing, so a report can be made for
    an evaluation without a training run.
    Keys of the returned dict: ``"json"``, ``"markdown"``, ``"figure"``.
    """
    rows = _check_rows(rows)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "results.json", "markdown": run_dir / "results.md", "figure": run_dir / "report.png"}

    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths["json"].write_text(json.dumps({"title": title, "created_at": created_at, "rows": rows}, indent=2,
                                        default=_to_json) + "\n")
    heading = f"# {title}\n\n" if title else ""
    paths["markdown"].write_text(heading + markdown_table(rows) + "\n")
    plot_report(paths["figure"], rows, metrics_path, title)
    return paths
